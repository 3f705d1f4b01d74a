"""Benchmark the reduce stage (class moments → z → distributed sort → ranks → publish) at scale.

Runs, in one process and on the same synthetic raw table (default 1,000,000 rows, 2 splits,
10 classes, 3 windows × 2 targets), side by side:

  (a) vog-ray's Ray reduce (``pipeline.reduce_and_publish``): nothing per-example is collected
      into the driver;
  (b) a naive in-driver reduce with pandas (read everything, groupby, z, sort, rank), the thing
      (a) exists to avoid;
  (c) ``vog-ray verify`` of the published run (the run validator on threads in this process,
      streaming the score files): its time and the driver's peak RSS growth.

It reports wall time and the driver's peak RSS growth for each, their ratios, and checks that
(a) and (b) give the same ranks and that (c) finds every invariant holds. Last line: one JSON object.

    .venv/bin/python bench/reduce.py [--rows 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


class PeakRSS:
    """Samples this process's RSS every 20 ms; ``.peak - .start`` is the growth."""

    def __init__(self) -> None:
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def __enter__(self) -> "PeakRSS":
        self.t.start()
        return self

    def __exit__(self, *a) -> None:
        self._stop.set()
        self.t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def make_raw(path: str, rows: int, files: int, keys: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = rows // files
    os.makedirs(path, exist_ok=True)
    for f in range(files):
        n = per if f < files - 1 else rows - per * (files - 1)
        base = f * per
        label = rng.integers(0, 10, n)
        pred = np.where(rng.random(n) < 0.9, label, rng.integers(0, 10, n))
        cols = {
            "id": pa.array([f"ex{base + i:08d}" for i in range(n)]),
            "split": pa.array(np.where(rng.random(n) < 0.8, "train", "test")),
            "label": pa.array(label), "target_label": pa.array(label), "pred": pa.array(pred),
            "correct": pa.array(pred == label), "status": pa.array(["ok"] * n),
        }
        for k in keys:
            cols[f"vog_{k}"] = pa.array(rng.gamma(2.0, 1.0 + label / 10, n))
        pq.write_table(pa.table(cols), f"{path}/part-{f:04d}.parquet")


def naive_reduce(raw: str, keys: list[str], primary: str):
    import pandas as pd

    df = pd.read_parquet(raw)
    for k in keys:
        g = df.groupby(["split", "target_label"])[f"vog_{k}"]
        m, s = g.transform("mean"), g.transform(lambda v: v.std(ddof=0))
        df[f"z_{k}"] = np.where(s > 0, (df[f"vog_{k}"] - m) / s.where(s > 0, 1), 0.0)
    df["score"] = df[f"z_{primary}"]
    df = df.sort_values(["split", "score", "id"], ascending=[True, False, True], kind="mergesort")
    df["rank"] = df.groupby("split").cumcount() + 1
    df["class_rank"] = df.groupby(["split", "target_label"]).cumcount() + 1
    return df[["id", "split", "rank", "class_rank", "score"]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="100k rows")
    a = ap.parse_args()
    if a.quick:
        a.rows = 100_000
    import ray

    from vog_ray.config import validate
    from vog_ray.distributed.audit import Plan, reduce_and_publish
    from vog_ray.core.options import VogOptions

    keys = [f"{w}_{t}" for w in ("early", "late", "all") for t in ("logit", "softmax")]
    primary = "late_logit"
    tmp = tempfile.mkdtemp(prefix="vog-bench-reduce-")
    raw = f"{tmp}/raw"
    t = time.time()
    make_raw(raw, a.rows, a.files, keys)
    print(f"synthetic raw table: {a.rows:,} rows in {a.files} files ({time.time() - t:.1f} s)", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = validate({"data": {"splits": {"train": {"format": "npz", "url": "x"}, "test": {"format": "npz", "url": "y"}}},
                    "model": "lenet", "checkpoints": "unused", "output": {"url": f"{tmp}/out"},
                    "vog": {"windows": {"early": "first:3", "late": "last:3", "all": "all"}, "targets": ["logit", "softmax"]},
                    "report": {"enabled": False}})
    counts = pq.ParquetDataset(raw).read(columns=["split"]).column("split").value_counts().to_pylist()
    rows_in = {d["values"]: d["counts"] for d in counts}
    opts = VogOptions(windows=cfg.vog.windows, targets=cfg.vog.targets)
    windows = {"early": [0, 1, 2], "late": [7, 8, 9], "all": list(range(10))}
    plan = Plan(cfg, cfg.storage.options(), opts, [f"ck{i}" for i in range(10)], [], windows, keys, primary,
                f"{tmp}/out", rows_in)

    with PeakRSS() as mem_ray:
        t = time.time()
        # the synthetic raw table has no source to read again: the validator checks the tables only
        res = reduce_and_publish(plan, raw, run_id="bench", t0=t, score_wall=1.0, extra={}, report=False,
                                 verify_source=False)
        t_ray = time.time() - t
    t_gate = res.manifest["timings_s"]["validate"]
    print(f"(a) ray reduce:    {t_ray:7.1f} s   driver peak RSS growth {mem_ray.growth_mb:8.1f} MiB "
          f"(of which the run validator, Ray tasks: {t_gate:.1f} s)", flush=True)
    from vog_ray.verify import verify_run

    with PeakRSS() as mem_verify:
        t = time.time()
        verdict = verify_run(res.run_url, source=False)
        t_verify = time.time() - t
    print(f"(c) vog-ray verify (threads in this process): {t_verify:7.1f} s   driver peak RSS growth "
          f"{mem_verify.growth_mb:8.1f} MiB   every invariant holds: {verdict.ok}", flush=True)
    with PeakRSS() as mem_naive:
        t = time.time()
        df = naive_reduce(raw, keys, primary)
        t_naive = time.time() - t
    print(f"(b) pandas driver: {t_naive:7.1f} s   driver peak RSS growth {mem_naive.growth_mb:8.1f} MiB", flush=True)

    got = pq.read_table(f"{res.run_url}/scores", columns=["id", "split", "rank", "class_rank"]).to_pandas()
    merged = got.merge(df, on=["id", "split"], suffixes=("", "_naive"))
    same = bool(len(merged) == a.rows and (merged["rank"] == merged["rank_naive"]).all()
                and (merged["class_rank"] == merged["class_rank_naive"]).all())
    print(f"ranks identical to the naive reduce: {same}")
    out = {"rows": a.rows, "ray_reduce_s": round(t_ray, 2), "naive_driver_s": round(t_naive, 2),
           "ray_vs_naive_time": round(t_ray / t_naive, 3),
           "ray_driver_peak_mib": round(mem_ray.growth_mb, 1), "naive_driver_peak_mib": round(mem_naive.growth_mb, 1),
           "driver_memory_ratio": round(mem_ray.growth_mb / max(mem_naive.growth_mb, 1e-9), 3),
           "ranks_identical": same, "cpus": os.cpu_count(), "validate_gate_s": t_gate,
           "verify_s": round(t_verify, 2), "verify_driver_peak_mib": round(mem_verify.growth_mb, 1),
           "verify_ok": verdict.ok}
    print(json.dumps(out))
    ray.shutdown()
    return 0 if same and verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
