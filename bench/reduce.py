"""Benchmark the reduce stage (class moments → z → distributed sort → ranks → publish) at scale.

Runs, in one process and on the same synthetic raw table (default 1,000,000 rows, 2 splits,
10 classes, 3 windows × 2 targets; ``--rows`` up to 10,000,000), side by side:

  (a) vog-ray's reduce (``distributed.audit.reduce_and_publish``): nothing per-example is
      collected into the driver;
  (b) a Ray Data pipeline doing the same job with Ray Data's own operators: ``read_parquet`` →
      ``groupby(split, target_label)`` count/mean/std (one hash partition per CPU) → a vectorised
      normalise ``map_batches`` → ``sort(split, score desc, id)`` → ``write_parquet`` with the
      Parquet options of (a) (no rank columns: a lower bound on what ranking with Ray Data's sort
      costs);
  (c) a naive in-driver reduce with pandas (read everything, groupby, z, sort, rank), the thing
      (a) exists to avoid; it is the reference the ranks are checked against. Skipped above
      ``--pandas-max-rows`` (default 2,000,000: the driver would hold the whole table), and then
      (a)'s ranks are checked against (b)'s order instead;
  (d) ``vog-ray verify`` of the published run (the run validator on threads in this process,
      streaming the score files): its time and the driver's peak RSS growth. (a) includes the
      publishing gate (the same validator as Ray tasks), reported as its ``validate`` step.

It prints wall time and the driver's peak RSS growth of each, (a)'s own step timings, and the
ratios; the last line is one JSON object (``reduce_vs_raydata`` = (b) time / (a) time: > 1 means
vog-ray's reduce is faster).

    .venv/bin/python bench/reduce.py [--rows 1000000] [--files 20] [--quick] [--skip-raydata]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

KEYS = [f"{w}_{t}" for w in ("early", "late", "all") for t in ("logit", "softmax")]
PRIMARY = "late_logit"
ID_DIGITS = 8  # ids "ex00000000" … "ex99999999": fixed width, so their order is the numeric order
MAX_ROWS = 10 ** ID_DIGITS


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


def id_array(start: int, n: int) -> pa.Array:
    """``ex<8 digits>`` for ``start … start + n - 1`` as a string array, built from digit bytes."""
    width = 2 + ID_DIGITS
    v = np.arange(start, start + n, dtype=np.int64)
    chars = np.empty((n, width), np.uint8)
    chars[:, 0], chars[:, 1] = ord("e"), ord("x")
    for p in range(ID_DIGITS):
        chars[:, width - 1 - p] = ord("0") + (v // 10 ** p) % 10
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * width).tobytes())
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(chars.tobytes()))


def make_raw(path: str, rows: int, files: int, keys: list[str], seed: int = 0) -> None:
    """A raw table as stage 1 writes it (ok rows only), vectorised: ~1 s per million rows."""
    rng = np.random.default_rng(seed)
    per = rows // files
    os.makedirs(path, exist_ok=True)
    for f in range(files):
        n = per if f < files - 1 else rows - per * (files - 1)
        label = rng.integers(0, 10, n)
        pred = np.where(rng.random(n) < 0.9, label, rng.integers(0, 10, n))
        split = pa.array(["test", "train"]).take(pa.array((rng.random(n) < 0.8).astype(np.int8)))
        cols = {
            "id": id_array(f * per, n), "split": split,
            "label": pa.array(label), "target_label": pa.array(label), "pred": pa.array(pred),
            "correct": pa.array(pred == label), "status": pa.array(["ok"]).take(pa.array(np.zeros(n, np.int8))),
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


def raydata_normalize(t: pa.Table, stats: dict, keys: list[str], primary: str) -> pa.Table:
    """z per key from the per-(split, class) mean/std, vectorised: one lookup index per row."""
    code = pc.index_in(pc.binary_join_element_wise(t["split"], pc.cast(t["target_label"], pa.string()), ":"),
                       value_set=pa.array(stats["group"])).to_numpy(zero_copy_only=False)
    for k in keys:
        m, s = np.asarray(stats[f"mean_{k}"])[code], np.asarray(stats[f"std_{k}"])[code]
        v = t[f"vog_{k}"].to_numpy()
        z = np.where(s > 0, (v - m) / np.where(s > 0, s, 1.0), 0.0)
        t = t.append_column(f"z_{k}", pa.array(z))
    return t.append_column("score", t[f"z_{primary}"])


def raydata_reduce(raw: str, out: str, keys: list[str], primary: str) -> None:
    """(b): the reduce with Ray Data's own groupby and sort."""
    import ray.data
    from ray.data.aggregate import Count, Mean, Std

    from vog_ray.core.table import dictionary_columns

    ds = ray.data.read_parquet(raw)
    aggs = [Count()] + [a for k in keys for a in (Mean(on=f"vog_{k}"), Std(on=f"vog_{k}", ddof=0))]
    # 20 groups: hash-partition them across the CPUs, not into Ray Data's default 200 partitions
    rows = ds.groupby(["split", "target_label"], num_partitions=os.cpu_count()).aggregate(*aggs).take_all()
    stats = {"group": [f"{r['split']}:{r['target_label']}" for r in rows]}
    for k in keys:
        stats[f"mean_{k}"] = [r[f"mean(vog_{k})"] for r in rows]
        stats[f"std_{k}"] = [r[f"std(vog_{k})"] for r in rows]
    # the Parquet options vog-ray writes its score table with (the columns added here are floats:
    # not dictionary-encoded), so that what is compared is the sorts
    use_dictionary = dictionary_columns(ds.schema().base_schema)
    ds.map_batches(raydata_normalize, fn_kwargs={"stats": stats, "keys": keys, "primary": primary},
                   batch_format="pyarrow", batch_size=None) \
      .sort(["split", "score", "id"], descending=[False, True, False]) \
      .write_parquet(out, use_dictionary=use_dictionary)


def order_of_files(path: str) -> pa.Table:
    """``split``, ``id`` of a sorted output written as unranked files: each file is sorted, so the
    files ordered by their first row's (split, score desc, id) give the whole order."""
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
    tables = [t for t in (pq.read_table(f, columns=["split", "score", "id"]) for f in files) if t.num_rows]
    tables.sort(key=lambda t: (t["split"][0].as_py(), -t["score"][0].as_py(), t["id"][0].as_py()))
    return pa.concat_tables(tables).select(["split", "id"])


def ranked_order(run_scores: str) -> pa.Table:
    """``split``, ``id`` of vog-ray's score table in rank order."""
    return pq.read_table(run_scores, columns=["split", "rank", "id"]).sort_by(
        [("split", "ascending"), ("rank", "ascending")]).select(["split", "id"])


def same_order(a: pa.Table, b: pa.Table) -> bool:
    return a.num_rows == b.num_rows and a["split"].equals(b["split"]) and a["id"].equals(b["id"])


def timed(label: str, fn, *args):
    """``(result, seconds, driver peak RSS growth in MiB)`` of ``fn(*args)``, printed."""
    with PeakRSS() as mem:
        t = time.time()
        out = fn(*args)
        dt = time.time() - t
    print(f"{label:<26}{dt:8.1f} s   driver peak RSS growth {mem.growth_mb:8.1f} MiB", flush=True)
    return out, dt, mem.growth_mb


def vog_plan(tmp: str, raw: str):
    from vog_ray.config import validate
    from vog_ray.core.options import VogOptions
    from vog_ray.distributed.audit import Plan

    cfg = validate({"data": {"splits": {"train": {"format": "npz", "url": "x"}, "test": {"format": "npz", "url": "y"}}},
                    "model": "lenet", "checkpoints": "unused", "output": {"url": f"{tmp}/out"},
                    "vog": {"windows": {"early": "first:3", "late": "last:3", "all": "all"},
                            "targets": ["logit", "softmax"]},
                    "report": {"enabled": False}})
    counts = pq.ParquetDataset(raw).read(columns=["split"]).column("split").value_counts().to_pylist()
    rows_in = {d["values"]: d["counts"] for d in counts}
    opts = VogOptions(windows=cfg.vog.windows, targets=cfg.vog.targets)
    windows = {"early": [0, 1, 2], "late": [7, 8, 9], "all": list(range(10))}
    return Plan(cfg, cfg.storage.options(), opts, [f"ck{i}" for i in range(10)], [], windows, KEYS, PRIMARY,
                f"{tmp}/out", rows_in)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="100k rows")
    ap.add_argument("--pandas-max-rows", type=int, default=2_000_000,
                    help="skip the pandas reference above this many rows (it holds the table in the driver)")
    ap.add_argument("--skip-raydata", action="store_true", help="only (a) and (c)")
    a = ap.parse_args()
    if a.quick:
        a.rows = 100_000
    if not 0 < a.rows < MAX_ROWS:
        ap.error(f"--rows must be in 1 … {MAX_ROWS - 1}")
    import ray
    import torch  # noqa: F401 - an audit's driver has torch loaded (it checked the checkpoints): not timed here

    from vog_ray.distributed.audit import reduce_and_publish

    tmp = tempfile.mkdtemp(prefix="vog-bench-reduce-")
    raw = f"{tmp}/raw"
    t = time.time()
    make_raw(raw, a.rows, a.files, KEYS)
    print(f"synthetic raw table: {a.rows:,} rows in {a.files} files ({time.time() - t:.1f} s)", flush=True)
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average, {os.cpu_count()} CPUs)", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    plan = vog_plan(tmp, raw)
    res, t_vog, mem_vog = timed("(a) vog-ray reduce:", lambda: reduce_and_publish(
        plan, raw, run_id="bench", t0=time.time(), score_wall=1.0, extra={}, report=False,
        verify_source=False))  # the synthetic raw table has no source to read again: tables only
    steps = {k: v for k, v in res.manifest["timings_s"].items() if k != "score"}
    print("    steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()), flush=True)
    out = {"rows": a.rows, "files": a.files, "reduce_s": round(t_vog, 2), "reduce_driver_peak_mib": round(mem_vog, 1),
           "reduce_steps_s": steps}
    vog_order = ranked_order(f"{res.run_url}/scores")
    from vog_ray.verify import verify_run

    verdict, t_verify, mem_verify = timed("(d) vog-ray verify:", lambda: verify_run(res.run_url, source=False))
    print(f"    every invariant holds: {verdict.ok}", flush=True)
    out.update(validate_gate_s=steps.get("validate"), verify_s=round(t_verify, 2),
               verify_driver_peak_mib=round(mem_verify, 1), verify_ok=verdict.ok)
    checks = [verdict.ok]
    if not a.skip_raydata:
        _, t_rd, mem_rd = timed("(b) Ray Data pipeline:", raydata_reduce, raw, f"{tmp}/raydata", KEYS, PRIMARY)
        same_rd = same_order(vog_order, order_of_files(f"{tmp}/raydata"))
        print(f"    order identical to vog-ray's ranks: {same_rd}", flush=True)
        out.update(raydata_s=round(t_rd, 2), raydata_driver_peak_mib=round(mem_rd, 1),
                   reduce_vs_raydata=round(t_rd / t_vog, 3), raydata_order_identical=same_rd)
    ray.shutdown()
    if a.rows <= a.pandas_max_rows:
        df, t_pd, mem_pd = timed("(c) pandas in the driver:", naive_reduce, raw, KEYS, PRIMARY)
        got = pq.read_table(f"{res.run_url}/scores", columns=["id", "split", "rank", "class_rank"]).to_pandas()
        merged = got.merge(df, on=["id", "split"], suffixes=("", "_naive"))
        same = bool(len(merged) == a.rows and (merged["rank"] == merged["rank_naive"]).all()
                    and (merged["class_rank"] == merged["class_rank_naive"]).all())
        print(f"    ranks identical to the pandas reference: {same}", flush=True)
        out.update(pandas_s=round(t_pd, 2), pandas_driver_peak_mib=round(mem_pd, 1),
                   reduce_vs_pandas_time=round(t_vog / t_pd, 3), ranks_identical=same)
        checks.append(same)
    else:
        print(f"(c) pandas in the driver: skipped ({a.rows:,} rows > --pandas-max-rows {a.pandas_max_rows:,}: "
              "the driver would hold the whole table); ranks checked against (b)'s order", flush=True)
        out.update(pandas_s=None, ranks_identical=out.get("raydata_order_identical"))
        checks.append(bool(out.get("raydata_order_identical")))
    print(f"load after: {os.getloadavg()[0]:.2f}", flush=True)
    out.update(cpus=os.cpu_count(), load_1min_after=round(os.getloadavg()[0], 2))
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
