"""Per-block resume of the score stage (stage 1) after a crash of the driver.

Stage 1 writes the raw per-example table as many small Parquet files (one per written block)
under ``<output>/_work/<key>/raw``. A Parquet file is readable only once its footer — written
last — is there, and an object on S3/GCS appears only once its upload completed; so after a
crash every *readable* raw file holds finished rows, and an unreadable one is a half-written
file, deleted here. A rerun of the same audit (same work key):

1. :func:`scan_partial_raw` reads the ``split``/``id`` columns of the readable raw files in a Ray
   task (the keys go to the object store as one sorted array; nothing per-example reaches the
   driver) and deletes unreadable files;
2. the score stage drops the rows whose ``(split, id)`` is done (:func:`skip_done`, right after
   the read, before decoding) and appends only the new rows to ``raw``;
3. the manifest records ``resume = {"rows_scored_now", "rows_from_earlier", "files_removed"}``.

Why not ``ray.data.checkpoint.CheckpointConfig`` (Ray 2.60)? Its filter runs right after the
*read* operator, so the id column must exist in the reader's output and be unique across the
whole dataset (ids are unique only within a split here, and image folders are read by Ray's own
reader), and its filter is an extra actor pool that reserves 1 CPU and 1 GiB per actor — on a
small cluster that starves the scorer pool. The raw files are the checkpoint here: there is
nothing else to keep consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["PartialRaw", "scan_partial_raw", "skip_done", "row_keys", "count_new_rows", "KEY_SEP"]

KEY_SEP = "\x1f"  # unit separator: never part of a split name (config-checked) and rare in ids


@dataclass
class PartialRaw:
    """What an interrupted earlier invocation left in ``raw``."""

    files: list[str] = field(default_factory=list)    # readable raw files (finished rows)
    rows: int = 0                                     # rows in them
    removed: list[str] = field(default_factory=list)  # unreadable (half-written) files, deleted
    done: Any = None                                  # ObjectRef: sorted bytes keys, or None


def row_keys(t: pa.Table) -> np.ndarray:
    """``split + KEY_SEP + id`` of every row, as a numpy bytes array (for searchsorted)."""
    if t.num_rows == 0:
        return np.array([], dtype="S1")
    joined = pc.binary_join_element_wise(t.column("split").cast(pa.string()),
                                         t.column("id").cast(pa.string()), KEY_SEP)
    return np.array([s.encode("utf-8") for s in joined.to_pylist()], dtype=object).astype(bytes)


def _load_done_keys(fs: Any, files: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    import pyarrow.parquet as pq

    keys, good, bad, rows = [], [], [], 0
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                t = pq.read_table(fh, columns=["split", "id"])
        except Exception:  # noqa: BLE001 - any unreadable file is a half-written one
            bad.append(f)
            continue
        good.append(f)
        rows += t.num_rows
        keys.append(row_keys(t))
    arr = np.sort(np.concatenate(keys)) if keys else np.array([], dtype="S1")
    return arr, {"good": good, "bad": bad, "rows": rows}


def scan_partial_raw(fs: Any, raw_path: str) -> PartialRaw:
    """Find what an interrupted run left at ``raw_path``; delete its half-written files."""
    import ray

    if not fs.exists(raw_path):
        return PartialRaw()
    files = sorted(f for f in fs.find(raw_path) if f.endswith(".parquet"))
    if not files:
        return PartialRaw()
    keys_ref, meta_ref = ray.remote(num_returns=2)(_load_done_keys).options(num_cpus=0.5).remote(fs, files)
    meta = ray.get(meta_ref)
    for f in meta["bad"]:
        fs.rm(f)
    return PartialRaw(meta["good"], int(meta["rows"]), meta["bad"], keys_ref if meta["rows"] else None)


_DONE_CACHE: dict[str, np.ndarray] = {}


def skip_done(t: pa.Table, done: Any) -> pa.Table:
    """Drop the rows of a reader block whose ``(split, id)`` is in ``done`` (sorted keys)."""
    import ray

    if isinstance(done, ray.ObjectRef):
        h = done.hex()
        if h not in _DONE_CACHE:
            _DONE_CACHE.clear()
            _DONE_CACHE[h] = ray.get(done)
        done = _DONE_CACHE[h]
    if t.num_rows == 0 or len(done) == 0:
        return t
    k = row_keys(t)
    idx = np.minimum(np.searchsorted(done, k), len(done) - 1)
    hit = done[idx] == k
    return t.filter(pa.array(~hit)) if hit.any() else t


def count_new_rows(fs: Any, raw_path: str, earlier: list[str]) -> int:
    """Rows in the raw files that are not among ``earlier`` (written by this invocation)."""
    import pyarrow.parquet as pq

    if not fs.exists(raw_path):
        return 0
    old = set(earlier)
    n = 0
    for f in fs.find(raw_path):
        if f.endswith(".parquet") and f not in old:
            with fs.open(f, "rb") as fh:
                n += pq.ParquetFile(fh).metadata.num_rows
    return n
