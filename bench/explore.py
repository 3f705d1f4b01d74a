"""Benchmark the explorer's queries on a 1,000,000-row run.

Makes a synthetic raw table the way ``bench/reduce.py`` does (2 splits, 10 classes, 3 windows ×
2 targets), plus per-checkpoint signals (K = 5) and a boolean ``is_noisy`` keep column, and
publishes it through the real Ray reduce (``reduce_and_publish``, with a ``flags`` section). Then,
on that run, it times (median of ``--reps`` after one cold call):

  * the explorer's DuckDB queries (``explore.queries.RunTables``): the first page, a filtered
    page (label, label ≠ prediction, a flag, a percentile range), a deep page, a page sorted by a
    signal, the class summary, one example with its rank under every key;
  * the same first and filtered pages with ``pyarrow.dataset`` (read the needed columns with the
    filter pushed down, top-k, take the page): the alternative engine, side by side;
  * the results page over HTTP from the running explorer (query + HTML), first and filtered.

Last line: one JSON object.

    .venv/bin/python bench/explore.py [--rows 1000000] [--reps 5] [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

K = 5
KEYS = [f"{w}_{t}" for w in ("early", "late", "all") for t in ("logit", "softmax")]
PRIMARY = "late_logit"


def make_raw(path: str, rows: int, files: int, seed: int = 0) -> None:
    """The raw table stage 1 writes: ids, labels, raw VoG per key, per-checkpoint signals."""
    from vog_ray.core.options import SIGNALS

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
            "is_noisy": pa.array(rng.random(n) < 0.1),
        }
        for k in KEYS:
            cols[f"vog_{k}"] = pa.array(rng.gamma(2.0, 1.0 + label / 10, n))
        for s in SIGNALS:
            if s in ("pred", "correct"):
                v = np.repeat(pred[:, None], K, 1) if s == "pred" else np.repeat((pred == label)[:, None], K, 1)
                typ = pa.int64() if s == "pred" else pa.int8()
            else:
                v, typ = rng.random((n, K)), pa.float32()
            flat = pa.array(v.reshape(-1).astype(typ.to_pandas_dtype()), typ)
            cols[f"sig_{s}"] = pa.FixedSizeListArray.from_arrays(flat, K)
        pq.write_table(pa.table(cols), f"{path}/part-{f:04d}.parquet")


def publish_run(tmp: str, rows: int, files: int) -> str:
    """The synthetic raw table → the real Ray reduce → a published run; returns its URL."""
    import ray
    import ray.data

    from vog_ray.config import validate
    from vog_ray.core.options import VogOptions
    from vog_ray.distributed.audit import Plan, reduce_and_publish

    raw = f"{tmp}/raw"
    t = time.time()
    make_raw(raw, rows, files)
    print(f"synthetic raw table: {rows:,} rows in {files} files ({time.time() - t:.1f} s)", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    split = {"format": "npz", "url": "unused", "keep_columns": ["is_noisy"]}
    cfg = validate({"data": {"splits": {"train": split, "test": split}}, "model": "lenet", "checkpoints": "unused",
                    "output": {"url": f"{tmp}/out"},
                    "vog": {"windows": {"early": "first:3", "late": "last:3", "all": "all"},
                            "targets": ["logit", "softmax"]},
                    "flags": {"top_percent": 5, "ground_truth": "is_noisy"}, "report": {"enabled": False}})
    counts = pq.ParquetDataset(raw).read(columns=["split"]).column("split").value_counts().to_pylist()
    windows = {"early": [0, 1, 2], "late": [K - 3, K - 2, K - 1], "all": list(range(K))}
    plan = Plan(cfg, cfg.storage.options(), VogOptions(windows=cfg.vog.windows, targets=cfg.vog.targets),
                [f"ck{i}" for i in range(K)], [], windows, KEYS, PRIMARY, f"{tmp}/out",
                {d["values"]: d["counts"] for d in counts})
    t = time.time()
    res = reduce_and_publish(plan, raw, run_id="bench", t0=t, score_wall=1.0, extra={}, report=False)
    print(f"published through the Ray reduce in {time.time() - t:.1f} s: {res.run_url}", flush=True)
    ray.shutdown()
    return res.run_url


def timed(fn, reps: int) -> tuple[float, float, object]:
    """(cold seconds, median warm seconds, last result)."""
    t = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - t
    warm = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        warm.append(time.perf_counter() - t)
    return cold, statistics.median(warm), out


FILTER = {"split": "train", "label": 3, "mismatch": True, "keep": {"is_noisy": True}, "pct_min": 50.0}


def arrow_page(run_url: str, filtered: bool, per_page: int = 50) -> tuple[int, list[str]]:
    """The same page with pyarrow.dataset: filtered scan of the needed columns, top-k, take."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ds = pads.dataset(f"{run_url}/scores", format="parquet")
    cond = pc.field("split") == "train"
    if filtered:
        cond = cond & (pc.field("label") == 3) & (pc.field("label") != pc.field("pred")) \
            & (pc.field("is_noisy") == True) & (pc.field("percentile") >= 50.0)  # noqa: E712
    t = ds.to_table(columns=["id", "split", "score"], filter=cond)
    idx = pc.select_k_unstable(t, per_page, [("score", "descending"), ("id", "ascending")])
    return t.num_rows, t.take(idx).column("id").to_pylist()


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="100k rows")
    ap.add_argument("--keep", default=None, help="keep the run in this directory (reused when it is there)")
    a = ap.parse_args()
    if a.quick:
        a.rows = 100_000
    from vog_ray.explore.queries import Filters, RunTables
    from vog_ray.runs import open_run

    tmp = a.keep or tempfile.mkdtemp(prefix="vog-bench-explore-")
    have = os.path.exists(f"{tmp}/out/runs/bench/_SUCCESS")
    run_url = f"{tmp}/out/runs/bench" if have else publish_run(tmp, a.rows, a.files)
    run = open_run(run_url)
    assert run.manifest["rows"]["scored"] == a.rows, run.manifest["rows"]

    t = time.perf_counter()
    tables = RunTables(run)
    t_open = time.perf_counter() - t
    fig: dict[str, float] = {}
    res: dict[str, object] = {}
    n_train = tables.page(Filters(split="train"), per_page=1).total
    probe = tables.page(Filters(split="train"), page=n_train // 100, per_page=50).rows[0]   # mid-split
    cases = {
        "first_page": lambda: tables.page(Filters(split="train")),
        "filtered_page": lambda: tables.page(Filters(**FILTER)),
        "deep_page": lambda: tables.page(Filters(split="train"), page=10_000),
        "signal_sort_page": lambda: tables.page(Filters(split="train"), sort="sig_loss"),
        "class_summary": lambda: tables.classes("train"),
        "example_by_id": lambda: tables.example("train", probe["id"]),
        "example_from_a_page": lambda: tables.example("train", probe["id"], rank=probe["rank"]),
        "key_ranks": lambda: tables.key_ranks(probe),
        "arrow_first_page": lambda: arrow_page(run_url, False),
        "arrow_filtered_page": lambda: arrow_page(run_url, True),
    }
    for name, fn in cases.items():
        cold, warm, res[name] = timed(fn, a.reps)
        fig[f"{name}_cold_s"], fig[f"{name}_s"] = round(cold, 4), round(warm, 4)
        print(f"{name:24s} cold {cold * 1000:8.1f} ms   warm (median of {a.reps}) {warm * 1000:8.1f} ms", flush=True)
    duck_first, duck_filt = res["first_page"], res["filtered_page"]
    same = ([r["id"] for r in duck_first.rows] == res["arrow_first_page"][1]
            and [r["id"] for r in duck_filt.rows] == res["arrow_filtered_page"][1]
            and duck_filt.total == res["arrow_filtered_page"][0])
    print(f"filtered page: {duck_filt.total:,} of {duck_first.total:,} train rows; DuckDB and pyarrow.dataset "
          f"give the same rows: {same}")
    fig.update(http_figures(run_url, a.reps))
    out = {"rows": a.rows, "open_s": round(t_open, 3), **fig,
           "filtered_vs_first": round(fig["filtered_page_s"] / fig["first_page_s"], 3),
           "deep_vs_first": round(fig["deep_page_s"] / fig["first_page_s"], 3),
           "duckdb_vs_arrow_first": round(fig["first_page_s"] / fig["arrow_first_page_s"], 3),
           "duckdb_vs_arrow_filtered": round(fig["filtered_page_s"] / fig["arrow_filtered_page_s"], 3),
           "same_rows": same, "cpus": os.cpu_count()}
    print(json.dumps(out))
    return 0 if same else 1


def http_figures(run_url: str, reps: int) -> dict[str, float]:
    """The results page over HTTP (query + HTML) from the explorer running in this process."""
    from urllib.parse import urlencode

    from vog_ray.explore.server import ExplorerServer

    with ExplorerServer(run_url, port=0) as srv:
        srv.explorer.wait_warm()   # the heat-map models load in the background at start: not timed here
        first = f"{srv.url}/?{urlencode({'split': 'train'})}"
        filt = f"{srv.url}/?{urlencode({'split': 'train', 'label': 3, 'mismatch': 1, 'keep.is_noisy': 'true', 'pct_min': 50})}"
        out = {}
        for name, url in (("http_first_page", first), ("http_filtered_page", filt)):
            cold, warm, _ = timed(lambda u=url: http_get(u), reps)
            out[f"{name}_cold_s"], out[f"{name}_s"] = round(cold, 4), round(warm, 4)
            print(f"{name:24s} cold {cold * 1000:8.1f} ms   warm (median of {reps}) {warm * 1000:8.1f} ms", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
