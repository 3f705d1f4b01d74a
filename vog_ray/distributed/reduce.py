"""Stage 2 (the reduce) on Ray: the raw per-example table → class moments → z → ranks, with
nothing per-example collected into the driver.

The raw table is read once into the object store by Ray tasks (:func:`read_raw`, per-split
counts on the way); class moments are exact per-block sums (``core.classes``: the same bits
however the table is blocked), one task per raw block; ranks come from the sample sort
(:mod:`.sort`), whose tasks filter and normalise each raw block themselves (nothing normalised
is materialised before the sort), and per-partition offsets; ids read from an ``id_column`` are
checked for duplicates with the same sort. The per-block functions here run in Ray workers: this
module imports neither torch nor (at module level) Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.classes import class_lookup, exact_class_means, exact_class_sums, exact_class_table
from ..core.options import written_column
from ..core.ranking import SORT_KEYS, add_counts, assign_ranks, block_counts, check_reference, normalize, \
    rank_offsets, unreferenced
from ..storage import StorageOptions, list_files, redact_url, resolve
from .cluster import remote_task
from .merge import MOMENT_PREFIXES
from .sort import Prepare, adjacent_duplicates, block_refs, cut_blocks, merge_sorted, partitions_for, sample_sort

__all__ = ["Reduced", "reduce_raw", "read_raw", "RawRead", "check_unique_ids", "filter_status", "filter_splits",
           "rejected_of_group0", "rejected_columns", "cast_carried", "sigs_to_lists", "status_counts", "rank_dataset",
           "class_table_exact", "normalize_block", "RAW_ROWS_PER_READ"]

RAW_ROWS_PER_READ = 50_000   # rows of the raw table per read task
ROWS_PER_PARTITION = 100_000  # rows per sorted partition of the ranking sort
IDS_PER_PARTITION = 1_000_000  # the id-uniqueness sort moves two short columns: large partitions


# ---------------------------------------------------------------- per-block functions
def filter_status(t: pa.Table, ok: bool) -> pa.Table:
    """The scored (``ok``) or the rejected rows of a block (the block itself when all are)."""
    m = pc.equal(t["status"], "ok")
    if t.num_rows and pc.all(m if ok else pc.invert(m)).as_py():
        return t
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


def cast_carried(t: pa.Table, types: dict[str, pa.DataType]) -> pa.Table:
    """The carried columns of a block in their source types (``types``; a block of rows whose
    split lacks a column holds it as all-null of another type). A column missing from the block
    is added as nulls."""
    for c, typ in types.items():
        i = t.schema.get_field_index(c)
        if i < 0:
            t = t.append_column(c, pa.nulls(t.num_rows, typ))
        elif t.schema.field(i).type != typ and not pa.types.is_null(typ):
            t = t.set_column(i, c, t.column(i).cast(typ))
    return t


def rejected_columns(t: pa.Table | None, carried: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Rejected rows as published: ``id``, ``split``, ``label``, ``reason`` and the carried columns
    (``carried``: name → type, null when unknown; a block's own carried columns otherwise)."""
    base = [("id", pa.string()), ("split", pa.string()), ("label", pa.int64()), ("reason", pa.string())]
    if t is None:
        return pa.schema(base + list((carried or {}).items())).empty_table()
    cols = {"id": t["id"], "split": t["split"], "label": t["label"], "reason": t["status"]}
    out = pa.table(cols, schema=pa.schema(base))
    keep = list(carried) if carried is not None else [c for c in t.column_names if not written_column(c)]
    for c in keep:
        out = out.append_column(c, t[c] if c in t.column_names else pa.nulls(t.num_rows))
    return cast_carried(out, carried or {})


def normalize_block(t: pa.Table, lookup, keys, method, primary, reference=None) -> pa.Table:
    """The scored rows of a raw block with z and ``score`` (against the split ``reference`` when given)."""
    return normalize(drop_status(filter_status(t, ok=True)), lookup, keys, method, primary, reference)


def id_keys(t: pa.Table, splits: list[str] | None) -> pa.Table:
    """``split`` and ``id`` of a block's rows (of ``splits`` only, if given)."""
    t = t.select(["split", "id"])
    return t if splits is None else filter_splits(t, splits)


def ok_class_sums(t: pa.Table, vog_keys: list[str], means: dict[str, list] | None = None) -> pa.Table:
    """``core.classes.exact_class_sums`` of a raw block's scored rows."""
    return exact_class_sums(filter_status(t, ok=True), vog_keys, means)


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


def read_counted(paths: list[str], url: str, storage: dict[str, Any],
                 class_keys: list[str] | None = None) -> tuple[pa.Table, pa.Table, pa.Table | None]:
    """:func:`read_parquet_files`, the block's rows per (split, scored or rejected) and, with
    ``class_keys``, the first pass of the exact class sums of its scored rows (:func:`ok_class_sums`)."""
    t = read_parquet_files(paths, url, storage)
    return t, status_counts(t), (ok_class_sums(t, class_keys) if class_keys is not None else None)


class RawRead(NamedTuple):
    """What :func:`read_raw` returns."""

    ds: Any                         # ray.data.Dataset: the raw blocks in the object store
    scored: dict[str, int]          # rows per split scored
    rejected: dict[str, int]        # rows per split rejected
    first: list[dict[str, Any]] | None  # the first pass of the exact class sums (``class_keys``), else None


def read_raw(url: str, storage: StorageOptions, num_blocks: int, class_keys: list[str] | None = None) -> RawRead:
    """A directory of Parquet files → the raw blocks and their rows per split, scored and
    rejected, read by ``num_blocks`` Ray tasks into the object store (nothing reaches the driver
    but the per-split counts). With ``class_keys``, the same tasks also make the first pass of the
    exact class sums while each block is in hand (rows of :func:`ok_class_sums`, for
    :func:`class_table_exact`)."""
    import ray
    import ray.data

    _, files = list_files(url, storage)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {redact_url(url)}")
    chunks = [list(c) for c in np.array_split(np.array(files, dtype=object), min(num_blocks, len(files))) if len(c)]
    # S3 answers that s3fs's own retries did not absorb (throttling, 5xx) are retried here
    read = remote_task(read_counted, num_returns=3, max_retries=3, retry_exceptions=[OSError])
    outs = [read.remote(c, url, dataclasses.asdict(storage), class_keys) for c in chunks]
    scored: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for counts in ray.get([o[1] for o in outs]):
        for row in counts.to_pylist():
            d = scored if row["ok"] else rejected
            d[row["split"]] = d.get(row["split"], 0) + int(row["n"])
    first = None if class_keys is None else [r for t in ray.get([o[2] for o in outs]) for r in t.to_pylist()]
    return RawRead(ray.data.from_arrow_refs([o[0] for o in outs]), scored, rejected, first)


# ---------------------------------------------------------------- ids, class moments, ranks
def merge_duplicates(sort_keys: list[tuple[str, str]], *parts: pa.Table) -> pa.Table:
    """The sample sort's merge step for the id check: a partition's repeated ``(split, id)``."""
    return adjacent_duplicates(merge_sorted(list(parts), sort_keys))


def check_unique_ids(raw: Any, n_rows: int, splits: list[str] | None = None) -> None:
    """Ids must be unique within a split (of ``splits``, default all): a duplicate is an error
    naming it. One distributed sort of the ``split``/``id`` columns; each sorted partition reports
    its repeats (equal keys always share a partition, so that is all there is; nothing
    per-example reaches the driver)."""
    import ray

    keys = [("split", "ascending"), ("id", "ascending")]
    parts = sample_sort(block_refs(raw), keys, partitions_for(n_rows, IDS_PER_PARTITION), merge_duplicates,
                        prepare=(id_keys, {"splits": splits}))
    dups = {(r["split"], r["id"]): r["n"] for t in ray.get(parts) for r in t.to_pylist()}
    if dups:
        listed = ", ".join(f"{i!r} in split {s!r}" + (f" ({n} rows)" if n > 2 else "")
                           for (s, i), n in sorted(dups.items())[:5])
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise ValueError(f"duplicate example ids: {listed}{more}; ids must be unique within a split "
                         "(check the split's id_column, or a manifest's image URIs)")


def class_table_exact(raw: Any, keys: list[str], first: list[dict[str, Any]]) -> pa.Table:
    """The class table from exact sums over the scored rows of each raw block (two passes; the
    first made by the read, :func:`read_raw`, the second one task per block): the same bit for
    bit however the raw table is blocked (see ``core.classes.exact_class_sums``)."""
    import ray

    refs = block_refs(raw)
    sums = remote_task(ok_class_sums)
    means = ray.put(exact_class_means(first, keys))
    second = [r for t in ray.get([sums.remote(b, list(keys), means) for b in refs]) for r in t.to_pylist()]
    return exact_class_table(first, second, keys)


def merge_ranked(sort_keys: list[tuple[str, str]], split_offset: dict[str, int],
                 class_offset: dict[tuple[str, int], int], split_size: dict[str, int], *parts: pa.Table) -> pa.Table:
    """The sample sort's merge step for ranking: a partition sorted, with its ranks."""
    return assign_ranks(merge_sorted(list(parts), sort_keys), split_offset, class_offset, split_size)


def rank_dataset(ds: Any, num_rows: int, prepare: Prepare = None):
    """Distributed sort by (split, score desc, id) of the blocks of ``ds`` (after ``prepare``,
    e.g. :func:`normalize_block`) with ranks assigned as each partition is merged: the cut step
    reports the rows per split/class of every part, so every partition's rank offsets are known
    before its merge runs. Returns the ranked dataset and the rows per split."""
    import ray
    import ray.data

    columns, counts = cut_blocks(block_refs(ds), SORT_KEYS, partitions_for(num_rows, ROWS_PER_PARTITION), prepare,
                                 count=block_counts)
    per_block = ray.get(counts)
    sizes, offsets = rank_offsets([add_counts([b[p] for b in per_block]) for p in range(len(columns))])
    merge = remote_task(merge_ranked)
    out_refs = [merge.remote(SORT_KEYS, so, co, sizes, *col) for col, (so, co) in zip(columns, offsets)]
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
    unreferenced: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)  # split -> class -> rows

    @property
    def rows_scored(self) -> int:
        return sum(self.scored_by_split.values())

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_split.values())


def reduce_raw(raw_url: str, storage: StorageOptions, *, keys: list[str], primary: str, normalization: str,
               rows_in: int, id_splits: list[str], steps: Any, normalize_against: str | None = None) -> Reduced:
    """Stage 2: read the raw table once, check ids and row accounting, class moments → z →
    ranks (z against the split ``normalize_against`` when given: rows of a class it lacks get
    no z and no rank). ``steps`` times the named steps (``audit.Steps``)."""
    with steps("reduce: read raw table"):  # once, into the object store: every pass below reads that
        raw, scored_by_split, rejected_by_split, first = read_raw(
            raw_url, storage, partitions_for(rows_in, RAW_ROWS_PER_READ), class_keys=list(keys))
    rejected = raw.map_batches(filter_status, fn_kwargs={"ok": False}, batch_format="pyarrow")
    n_scored, n_rejected = sum(scored_by_split.values()), sum(rejected_by_split.values())
    # ids a reader makes ("<file>:<row>", image paths) are unique by construction; ids read from
    # an id_column are checked (a distributed sort of those splits' ids)
    if id_splits:
        with steps("reduce: unique ids"):
            check_unique_ids(raw, rows_in, id_splits)
    if rows_in != n_scored + n_rejected:
        raise RuntimeError(f"row accounting failed: {rows_in} rows in != {n_scored} scored + {n_rejected} rejected")
    if n_scored == 0:
        raise RuntimeError("no row could be scored (see the rejected rows for the reasons)")
    with steps("reduce: class moments"):
        classes = class_table_exact(raw, keys, first)
    check_reference(classes, normalize_against)
    missing = unreferenced(classes, normalize_against)
    z = (normalize_block, {"lookup": class_lookup(classes, keys), "keys": keys, "method": normalization,
                           "primary": primary, "reference": normalize_against})
    with steps("reduce: z, sort, ranks"):
        ranked, split_counts = rank_dataset(raw, n_scored, prepare=z)
    expected = {s: n - sum(missing.get(s, {}).values()) for s, n in scored_by_split.items()}
    if split_counts != {s: n for s, n in expected.items() if n}:
        raise RuntimeError(f"row accounting failed: ranked rows per split {split_counts} != scored {scored_by_split}"
                           f" less the rows without a reference class {missing}")
    return Reduced(ranked, rejected, classes, rows_in, scored_by_split, rejected_by_split, missing)
