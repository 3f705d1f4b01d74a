"""Stage 2 (the reduce) on Ray: the raw per-example table → class moments → z → ranks, with
nothing per-example collected into the driver.

The raw table is read once into the object store by Ray tasks (:func:`read_raw`, per-split
counts on the way); class moments are exact per-block sums (``core.classes``: the same bits
however the table is blocked); ranks come from the sample sort (:mod:`.sort`) and per-partition
offsets; ids read from an ``id_column`` are checked for duplicates with the same sort. The
per-block functions here run in Ray workers: this module imports neither torch nor (at module
level) Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.classes import class_lookup, exact_class_means, exact_class_sums, exact_class_table
from ..core.ranking import SORT_KEYS, assign_ranks, block_counts, normalize, rank_offsets
from ..storage import StorageOptions, list_files, redact_url, resolve
from .cluster import remote_task
from .merge import MOMENT_PREFIXES
from .sort import adjacent_duplicates, block_refs, merge_sorted, partitions_for, sample_sort

__all__ = ["Reduced", "reduce_raw", "read_raw", "check_unique_ids", "filter_status", "filter_splits",
           "rejected_of_group0", "rejected_columns", "sigs_to_lists", "status_counts", "RAW_ROWS_PER_READ"]

RAW_ROWS_PER_READ = 50_000   # rows of the raw table per read task
IDS_PER_PARTITION = 1_000_000  # the id-uniqueness sort moves two short columns: large partitions


# ---------------------------------------------------------------- per-block functions
def filter_status(t: pa.Table, ok: bool) -> pa.Table:
    m = pc.equal(t["status"], "ok")
    return t.filter(m if ok else pc.invert(m))


def filter_splits(t: pa.Table, splits: list[str]) -> pa.Table:
    return t.filter(pc.is_in(t["split"], value_set=pa.array(splits, pa.string())))


def rejected_of_group0(t: pa.Table) -> pa.Table:
    t = filter_status(t, ok=False)
    t = t.filter(pc.equal(t["group"], 0))
    return t.select([c for c in t.column_names if c == "id" or c in ("split", "label", "status")
                     or not (c.startswith((*MOMENT_PREFIXES, "sig_")) or c in ("group", "target_label", "pred"))])


def drop_status(t: pa.Table) -> pa.Table:
    return t.drop_columns(["status"]) if "status" in t.column_names else t


def sigs_to_lists(t: pa.Table) -> pa.Table:
    """Ray may hand list columns back as tensor extensions; store plain fixed-size lists."""
    for i, f in enumerate(t.schema):
        if isinstance(f.type, pa.ExtensionType):
            arr = t.column(i).combine_chunks()
            try:
                np_arr = arr.to_numpy_ndarray()
            except AttributeError:
                np_arr = np.stack(arr.to_pylist())
            flat = pa.array(np_arr.reshape(len(np_arr), -1).ravel())
            t = t.set_column(i, f.name, pa.FixedSizeListArray.from_arrays(flat, int(np.prod(np_arr.shape[1:])) or 1))
    return t


def rejected_columns(t: pa.Table | None) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("split", pa.string()), ("label", pa.int64()), ("reason", pa.string())])
    if t is None:
        return schema.empty_table()
    return pa.table({"id": t["id"], "split": t["split"], "label": t["label"], "reason": t["status"]}, schema=schema)


def normalize_block(t: pa.Table, lookup, keys, method, primary) -> pa.Table:
    """z and ``score`` for a block of scored rows."""
    return normalize(drop_status(t), lookup, keys, method, primary)


def status_counts(t: pa.Table) -> pa.Table:
    """Rows per (split, scored or rejected) in one block."""
    if t.num_rows == 0:
        return pa.table({"split": pa.array([], pa.string()), "ok": pa.array([], pa.bool_()),
                         "n": pa.array([], pa.int64())})
    g = pa.table({"split": t["split"], "ok": pc.equal(t["status"], "ok")}).group_by(["split", "ok"]).aggregate(
        [([], "count_all")])
    return pa.table({"split": g["split"].cast(pa.string()), "ok": g["ok"], "n": g["count_all"].cast(pa.int64())})


# ---------------------------------------------------------------- reading the raw table
def read_parquet_files(paths: list[str], url: str, storage: dict[str, Any]) -> pa.Table:
    """Parquet files (paths in the filesystem of ``url``) → one table; list columns as plain
    fixed-size lists; files whose columns differ (a batch of rejected rows only) are unified."""
    import pyarrow.parquet as pq

    fs, _ = resolve(url, StorageOptions(**storage))
    tables = []
    for p in paths:
        with fs.open(p, "rb") as f:
            tables.append(sigs_to_lists(pq.read_table(f)))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def read_counted(paths: list[str], url: str, storage: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
    """:func:`read_parquet_files` and the block's rows per (split, scored or rejected)."""
    t = read_parquet_files(paths, url, storage)
    return t, status_counts(t)


def read_raw(url: str, storage: StorageOptions, num_blocks: int):
    """A directory of Parquet files → (dataset, rows per split scored, rows per split rejected),
    read by ``num_blocks`` Ray tasks into the object store (nothing reaches the driver but the
    per-split counts)."""
    import ray
    import ray.data

    _, files = list_files(url, storage)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {redact_url(url)}")
    chunks = [list(c) for c in np.array_split(np.array(files, dtype=object), min(num_blocks, len(files))) if len(c)]
    # S3 answers that s3fs's own retries did not absorb (throttling, 5xx) are retried here
    read = remote_task(read_counted, num_returns=2, max_retries=3, retry_exceptions=[OSError])
    outs = [read.remote(c, url, dataclasses.asdict(storage)) for c in chunks]
    scored: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for counts in ray.get([o[1] for o in outs]):
        for row in counts.to_pylist():
            d = scored if row["ok"] else rejected
            d[row["split"]] = d.get(row["split"], 0) + int(row["n"])
    return ray.data.from_arrow_refs([o[0] for o in outs]), scored, rejected


# ---------------------------------------------------------------- ids, class moments, ranks
def merge_duplicates(sort_keys: list[tuple[str, str]], *parts: pa.Table) -> pa.Table:
    """The sample sort's merge step for the id check: a partition's repeated ``(split, id)``."""
    return adjacent_duplicates(merge_sorted(list(parts), sort_keys))


def check_unique_ids(raw: Any, n_rows: int) -> None:
    """Ids must be unique within a split: a duplicate is an error naming it. One distributed sort
    of the ``split``/``id`` columns; each sorted partition reports its repeats (equal keys always
    share a partition, so that is all there is; nothing per-example reaches the driver)."""
    import ray

    keys = [("split", "ascending"), ("id", "ascending")]
    parts = sample_sort(block_refs(raw.select_columns(["split", "id"])), keys,
                        partitions_for(n_rows, IDS_PER_PARTITION), merge_duplicates)
    dups = {(r["split"], r["id"]): r["n"] for t in ray.get(parts) for r in t.to_pylist()}
    if dups:
        listed = ", ".join(f"{i!r} in split {s!r}" + (f" ({n} rows)" if n > 2 else "")
                           for (s, i), n in sorted(dups.items())[:5])
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise ValueError(f"duplicate example ids: {listed}{more}; ids must be unique within a split "
                         "(check the split's id_column, or a manifest's image URIs)")


def class_table_exact(ok: Any, keys: list[str]) -> pa.Table:
    """The class table from exact per-block sums (two passes over the scored rows): the same bit
    for bit however the raw table is blocked (see ``core.classes.exact_class_sums``)."""
    kw = {"batch_format": "pyarrow", "batch_size": None}
    first = ok.map_batches(exact_class_sums, fn_kwargs={"vog_keys": list(keys)}, **kw).take_all()
    means = exact_class_means(first, keys)
    second = ok.map_batches(exact_class_sums, fn_kwargs={"vog_keys": list(keys), "means": means}, **kw).take_all()
    return exact_class_table(first, second, keys)


def merge_counted(sort_keys: list[tuple[str, str]], *parts: pa.Table):
    """The sample sort's merge step for ranking: a sorted partition and its rows per split/class."""
    t = merge_sorted(list(parts), sort_keys)
    return t, block_counts(t)


def rank_dataset(ds: Any, num_rows: int):
    """Distributed sort by (split, score desc, id), then ranks from per-partition offsets.
    Returns the ranked dataset and the rows per split."""
    import ray
    import ray.data

    merged = sample_sort(block_refs(ds), SORT_KEYS, partitions_for(num_rows), merge_counted,
                         merge_options={"num_returns": 2})
    counts = ray.get([m[1] for m in merged])
    sizes, offsets = rank_offsets(counts)
    assign = remote_task(assign_ranks)
    out_refs = [assign.remote(m[0], so, co, sizes) for m, (so, co) in zip(merged, offsets)]
    return ray.data.from_arrow_refs(out_refs), sizes


@dataclass
class Reduced:
    """What the reduce hands to publishing: lazy datasets and small tables."""

    ranked: Any                      # ray.data.Dataset: the ranked score rows
    rejected: Any                    # ray.data.Dataset: rejected rows (raw columns)
    classes: pa.Table
    rows_in: int
    scored_by_split: dict[str, int]
    rejected_by_split: dict[str, int]

    @property
    def rows_scored(self) -> int:
        return sum(self.scored_by_split.values())

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_split.values())


def reduce_raw(raw_url: str, storage: StorageOptions, *, keys: list[str], primary: str, normalization: str,
               rows_in: int, id_splits: list[str], steps: Any) -> Reduced:
    """Stage 2: read the raw table once, check ids and row accounting, class moments → z →
    ranks. ``steps`` times the named steps (``audit.Steps``)."""
    with steps("reduce: read raw table"):  # once, into the object store: every pass below reads that
        raw, scored_by_split, rejected_by_split = read_raw(raw_url, storage,
                                                           partitions_for(rows_in, RAW_ROWS_PER_READ))
    ok = raw.map_batches(filter_status, fn_kwargs={"ok": True}, batch_format="pyarrow")
    rejected = raw.map_batches(filter_status, fn_kwargs={"ok": False}, batch_format="pyarrow")
    n_scored, n_rejected = sum(scored_by_split.values()), sum(rejected_by_split.values())
    # ids a reader makes ("<file>:<row>", image paths) are unique by construction; ids read from
    # an id_column are checked (a distributed sort of those splits' ids)
    if id_splits:
        with steps("reduce: unique ids"):
            check_unique_ids(raw.map_batches(filter_splits, fn_kwargs={"splits": id_splits},
                                             batch_format="pyarrow"), rows_in)
    if rows_in != n_scored + n_rejected:
        raise RuntimeError(f"row accounting failed: {rows_in} rows in != {n_scored} scored + {n_rejected} rejected")
    if n_scored == 0:
        raise RuntimeError("no row could be scored (see the rejected rows for the reasons)")
    with steps("reduce: class moments"):
        classes = class_table_exact(ok, keys)
    normalized = ok.map_batches(normalize_block, fn_kwargs={"lookup": class_lookup(classes, keys), "keys": keys,
                                                            "method": normalization, "primary": primary},
                                batch_format="pyarrow")
    with steps("reduce: z, sort, ranks"):
        ranked, split_counts = rank_dataset(normalized, n_scored)
    if split_counts != scored_by_split:
        raise RuntimeError(f"row accounting failed: ranked rows per split {split_counts} != scored {scored_by_split}")
    return Reduced(ranked, rejected, classes, rows_in, scored_by_split, rejected_by_split)
