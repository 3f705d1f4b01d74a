"""Per-block resume of the score stage (stage 1) after a crash of the driver.

Stage 1 writes the raw per-example table as many small Parquet files (one per written block)
under ``<output>/_work/<key>/raw``. A Parquet file ends with its footer — written last — and the
``PAR1`` magic, and an object on S3/GCS appears only once its upload completed; so after a crash
every complete raw file holds finished rows, and a file *proven* incomplete (shorter than a
header and footer, or without the trailing magic, or whose footer length points outside the
file: :func:`incomplete_parquet`) is a half-written one, deleted here. Any other read error — a
timeout, a throttled or failed request — fails the audit and deletes nothing: a transient error
must never cost finished rows. A rerun of the same audit (same work key):

1. :func:`scan_partial_raw` reads the ``split``/``id`` columns of the complete raw files in a Ray
   task (the keys go to the object store as one sorted array; nothing per-example reaches the
   driver) and deletes the incomplete ones;
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

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["PartialRaw", "scan_partial_raw", "load_done_keys", "incomplete_parquet", "skip_done", "row_keys",
           "count_new_rows", "KEY_SEP", "PARQUET_MAGIC"]

KEY_SEP = "\x1f"  # unit separator: never part of a split name (config-checked) and rare in ids
PARQUET_MAGIC = b"PAR1"  # the first and the last 4 bytes of every complete Parquet file
_FOOTER_TAIL = 8         # a Parquet file ends with the footer's length (4 bytes, little-endian) + the magic


@dataclass
class PartialRaw:
    """What an interrupted earlier invocation left in ``raw``."""

    files: list[str] = field(default_factory=list)    # complete raw files (finished rows)
    rows: int = 0                                     # rows in them
    removed: list[str] = field(default_factory=list)  # files proven half-written, deleted
    done: Any = None                                  # ObjectRef: sorted bytes keys, or None


def row_keys(t: pa.Table) -> np.ndarray:
    """``split + KEY_SEP + id`` of every row, as a numpy bytes array (for searchsorted)."""
    if t.num_rows == 0:
        return np.array([], dtype="S1")
    joined = pc.binary_join_element_wise(t.column("split").cast(pa.string()),
                                         t.column("id").cast(pa.string()), KEY_SEP)
    return np.array([s.encode("utf-8") for s in joined.to_pylist()], dtype=object).astype(bytes)


def incomplete_parquet(fs: Any, path: str) -> str | None:
    """Why the file at ``path`` is proven not to be a complete Parquet file (too short, no leading
    or trailing ``PAR1``, a footer length that points outside the file), or ``None`` when its
    head and tail are those of a complete one. Read errors (``OSError``) propagate."""
    size = fs.size(path)
    if size < len(PARQUET_MAGIC) + _FOOTER_TAIL:
        return f"{size} bytes: shorter than a Parquet header and footer"
    with fs.open(path, "rb") as f:
        head = f.read(len(PARQUET_MAGIC))
        f.seek(size - _FOOTER_TAIL)
        tail = f.read(_FOOTER_TAIL)
    if len(tail) < _FOOTER_TAIL:
        raise OSError(f"{path}: read {len(tail)} of the last {_FOOTER_TAIL} bytes of a {size}-byte file")
    if head != PARQUET_MAGIC:
        return "no leading PAR1 magic"
    if tail[-len(PARQUET_MAGIC):] != PARQUET_MAGIC:
        return "no trailing PAR1 magic: the footer was never written"
    footer = int.from_bytes(tail[:4], "little")
    if footer + _FOOTER_TAIL + len(PARQUET_MAGIC) > size:
        return f"its footer length ({footer} bytes) points outside the {size}-byte file"
    return None


def load_done_keys(fs: Any, files: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The sorted keys (:func:`row_keys`) of the complete raw files, and ``{"good", "bad", "rows"}``
    (``bad``: the files proven incomplete, to delete). A complete file that cannot be read, or a
    read error (a timeout, a failed request), raises ``OSError`` naming the file."""
    import pyarrow.parquet as pq

    keys, good, bad, rows = [], [], [], 0
    for f in files:
        try:
            if incomplete_parquet(fs, f) is not None:
                bad.append(f)
                continue
            with fs.open(f, "rb") as fh:
                t = pq.read_table(fh, columns=["split", "id"])
        except Exception as e:  # noqa: BLE001 - a timeout, a throttled request, a corrupt footer …
            raise OSError(f"resume: could not read the raw part {f} ({type(e).__name__}: {e}); nothing was "
                          "deleted — rerun the audit once the store answers (it resumes from the parts "
                          "written so far)") from e
        good.append(f)
        rows += t.num_rows
        keys.append(row_keys(t))
    arr = np.sort(np.concatenate(keys)) if keys else np.array([], dtype="S1")
    return arr, {"good": good, "bad": bad, "rows": rows}


def scan_partial_raw(fs: Any, raw_path: str) -> PartialRaw:
    """Find what an interrupted run left at ``raw_path``; delete its files proven half-written
    (only once every file was checked: a read error deletes nothing)."""
    import ray

    if not fs.exists(raw_path):
        return PartialRaw()
    files = sorted(f for f in fs.find(raw_path) if f.endswith(".parquet"))
    if not files:
        return PartialRaw()
    # read-only, so a read error is retried (as the reduce retries its reads) before the audit fails
    scan = ray.remote(num_returns=2)(load_done_keys).options(num_cpus=0.5, max_retries=3, retry_exceptions=[OSError])
    keys_ref, meta_ref = scan.remote(fs, files)
    try:
        meta = ray.get(meta_ref)
    except Exception:
        with contextlib.suppress(Exception):  # the same error: fetched so Ray does not log it as unhandled
            ray.get(keys_ref)
        raise
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
