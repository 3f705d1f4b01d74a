"""A distributed sample sort with Ray tasks, none of which sees more than one block or one
partition (the shape of Ray Data's ``sort_task_spec``): (1) each block sends ``SORT_SAMPLES``
evenly spaced sort keys; (2) P - 1 boundaries are picked from the pooled samples in the driver
and each block is cut into P parts by them (a row equal to boundary p goes to part p, in every
block); (3) part p of every block is merged and sorted by one task. The P sorted partitions, in
order, are the sorted table; equal keys always share a partition.

The reduce ranks with it, checks that ids are unique, and merges partial moments by example.
The steps are pure functions (tested alone); :func:`sample_sort` runs them as Ray tasks. This
module imports neither torch nor Ray at module level.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .cluster import remote_task

__all__ = ["SORT_SAMPLES", "Prepare", "apply", "sort_key_sample", "choose_boundaries", "partition_ids",
           "partition_block", "merge_sorted", "adjacent_duplicates", "cut_blocks", "sample_sort", "block_refs",
           "partitions_for"]

SORT_SAMPLES = 64  # sort keys sampled per block to choose the partition boundaries
MAX_PARTITIONS = 200

# a per-block step the sort's tasks run first (``(function, keyword arguments)``): the reduce
# filters and normalises each raw block there instead of materialising a normalised copy
Prepare = Optional[tuple[Callable[..., pa.Table], dict[str, Any]]]


def apply(prepare: Prepare, t: pa.Table) -> pa.Table:
    return t if prepare is None else prepare[0](t, **prepare[1])


def sort_key_sample(t: pa.Table, sort_keys: list[tuple[str, str]], k: int, prepare: Prepare = None) -> pa.Table:
    """The sort keys of ``k`` evenly spaced rows of the block (after ``prepare``), in sort order:
    a sample of the block's key distribution, taken without sorting the block."""
    if t.num_rows > k:
        t = t.take(pa.array(np.unique(np.linspace(0, t.num_rows - 1, k).round().astype(np.int64))))
    return apply(prepare, t).select([c for c, _ in sort_keys]).sort_by(sort_keys)


def choose_boundaries(samples: list[pa.Table], sort_keys: list[tuple[str, str]], partitions: int) -> pa.Table:
    """``partitions - 1`` boundary keys at the quantiles of the pooled samples."""
    pooled = pa.concat_tables([s for s in samples if s.num_rows], promote_options="default").sort_by(sort_keys)
    if pooled.num_rows == 0 or partitions <= 1:
        return pooled.slice(0, 0)
    at = [int(round(pooled.num_rows * p / partitions)) for p in range(1, partitions)]
    return pooled.take(pa.array([min(max(a, 0), pooled.num_rows - 1) for a in at]))


_SIGN = np.uint64(1 << 63)
_NAN_KEY = np.uint64(np.iinfo(np.uint64).max)  # above every number's key: NaN sorts last, as in Arrow


def _numeric_order(values: np.ndarray, descending: bool) -> np.ndarray:
    """uint64 keys that sort numbers as Arrow does (-0.0 equal to 0.0; NaN last in both orders)."""
    if values.dtype.kind == "f":
        v = values.astype(np.float64) + 0.0  # -0.0 + 0.0 == +0.0
        u = v.view(np.uint64)
        key = np.where(u & _SIGN, ~u, u | _SIGN)  # the bits of an IEEE double, made monotone
        if descending:
            key = ~key
        return np.where(np.isnan(v), _NAN_KEY, key)
    key = values.astype(np.int64).view(np.uint64) ^ _SIGN  # ints and bools
    return ~key if descending else key


class _Key:
    """One sort key of a block and of the boundary rows, as ascending integer order keys.

    Numbers through :func:`_numeric_order`; strings through their place among the boundaries'
    sorted distinct values (2i + 1 for the i-th, 2i for what lies between the (i-1)-th and the
    i-th): ints that order a row's string and a boundary's exactly as the strings do, computed
    only for the rows that get that far (an id is looked at only on a tie of the keys before it)."""

    def __init__(self, col: pa.ChunkedArray, bounds: pa.Array, descending: bool):
        self.col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        self.sign = -1 if descending else 1
        self._all: np.ndarray | None = None
        if pa.types.is_string(self.col.type) or pa.types.is_large_string(self.col.type):
            self.values = np.array(sorted(set(bounds.to_pylist())), dtype=object)
            self.bounds = self.sign * (2 * np.searchsorted(self.values, np.array(bounds.to_pylist(), dtype=object)) + 1)
        else:
            self.bounds = _numeric_order(bounds.to_numpy(zero_copy_only=False), descending)
            self._all = _numeric_order(self.col.to_numpy(zero_copy_only=False), descending)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The order keys of rows ``idx``."""
        if self._all is None and 4 * len(idx) >= len(self.col):  # most rows: every row at once
            self._all = self._codes(self.col)
        if self._all is not None:
            return self._all[idx]
        return self._codes(self.col.take(pa.array(idx)))

    def _codes(self, arr: pa.Array) -> np.ndarray:
        uniq = pc.unique(arr)
        if 2 * len(uniq) <= len(arr):  # repeated values (a split column): each distinct value once
            return self._codes(uniq)[pc.index_in(arr, value_set=uniq).to_numpy(zero_copy_only=False)]
        vals = arr.to_numpy(zero_copy_only=False)
        at = np.searchsorted(self.values, vals)
        hit = np.zeros(len(vals), np.int64)
        inside = at < len(self.values)
        hit[inside] = self.values[at[inside]] == vals[inside]
        return self.sign * (2 * at + hit)


def partition_ids(t: pa.Table, sort_keys: list[tuple[str, str]], boundaries: pa.Table) -> np.ndarray:
    """For every row, the number of boundaries that sort strictly before it: its part (a row equal
    to boundary p goes to part p). A lexicographic search over the sorted boundaries, key by key:
    ``searchsorted`` of the first key over all boundaries; a row equal to boundaries ``[lo, hi)``
    on a key is searched on the next key among those only (a handful of ranges: the splits, and
    the rare ties of a score)."""
    n, nb = t.num_rows, boundaries.num_rows
    pid = np.zeros(n, np.int64)
    if nb == 0 or n == 0:
        return pid
    keys = [_Key(t.column(c), boundaries.column(c).combine_chunks().cast(t.schema.field(c).type),
                 order == "descending") for c, order in sort_keys]
    ranges = [(np.arange(n), 0, nb)]  # rows, and the boundaries [lo, hi) they equal on the keys so far
    for k in keys:
        ties = []
        for rows, lo, hi in ranges:
            bk, rk = k.bounds[lo:hi], k.rows(rows)
            first, last = lo + np.searchsorted(bk, rk, "left"), lo + np.searchsorted(bk, rk, "right")
            pid[rows] = first
            tied = np.flatnonzero(first < last)
            if len(tied):  # one range per tied value: group the tied rows by their lower bound
                tied = tied[np.argsort(first[tied], kind="stable")]
                starts = np.r_[0, np.flatnonzero(np.diff(first[tied])) + 1]
                for a, b in zip(starts, np.r_[starts[1:], len(tied)]):
                    ties.append((rows[tied[a:b]], int(first[tied[a]]), int(last[tied[a]])))
        ranges = ties
        if not ranges:
            break
    return pid


def partition_block(t: pa.Table, sort_keys: list[tuple[str, str]], boundaries: pa.Table) -> list[pa.Table]:
    """Cut a block into ``len(boundaries) + 1`` parts: part p holds the rows whose key is above
    boundary p - 1 and at most boundary p (:func:`partition_ids`). One gather puts the parts one
    after the other; each part is a slice of it (Ray serialises only a slice's own rows)."""
    parts = boundaries.num_rows + 1
    if parts == 1 or t.num_rows == 0:
        return [t] + [t.slice(0, 0)] * (parts - 1)
    pid = partition_ids(t, sort_keys, boundaries)
    grouped = t.take(pa.array(np.argsort(pid, kind="stable")))
    ends = np.cumsum(np.bincount(pid, minlength=parts))
    return [grouped.slice(a, b - a) for a, b in zip(np.r_[0, ends[:-1]], ends)]


def merge_sorted(parts: list[pa.Table], sort_keys: list[tuple[str, str]]) -> pa.Table:
    """One partition: its parts from every block, sorted. ("permissive": the partial rows of
    checkpoint groups of different sizes hold signal lists of different fixed sizes.)"""
    return pa.concat_tables(parts, promote_options="permissive").sort_by(sort_keys)


def adjacent_duplicates(t: pa.Table) -> pa.Table:
    """For one partition of a table sorted by (split, id): the keys that repeat, with their count.
    (The sample sort puts equal keys in one partition, so no repeat spans two.)"""
    schema = pa.schema([("split", pa.string()), ("id", pa.string()), ("n", pa.int64())])
    if t.num_rows < 2:
        return schema.empty_table()
    s = t.column("split").to_numpy(zero_copy_only=False).astype(object)
    i = t.column("id").to_numpy(zero_copy_only=False).astype(object)
    same = (s[1:] == s[:-1]) & (i[1:] == i[:-1])
    rows: dict[tuple[str, str], int] = {}
    for j in np.flatnonzero(same):
        key = (str(s[j]), str(i[j]))
        rows[key] = rows.get(key, 1) + 1
    return pa.table({"split": [k[0] for k in rows], "id": [k[1] for k in rows], "n": list(rows.values())},
                    schema=schema)


def partitions_for(n_rows: int, rows_per_partition: int = 100_000) -> int:
    """How many partitions (or read tasks) for ``n_rows``: one per ``rows_per_partition``, 1–200."""
    return int(max(1, min(MAX_PARTITIONS, -(-n_rows // rows_per_partition))))


def block_refs(ds: Any) -> list:
    """The blocks of a dataset as object refs, in order (it is executed; nothing reaches the driver)."""
    return [r for bundle in ds.materialize().iter_internal_ref_bundles() for r in bundle.block_refs]


def _cut(block: pa.Table, sort_keys: list[tuple[str, str]], boundaries: pa.Table, prepare: Prepare,
         count: Optional[Callable[[pa.Table], Any]]) -> Any:
    parts: list[Any] = partition_block(apply(prepare, block), sort_keys, boundaries)
    if count is not None:
        parts.append([count(p) for p in parts])
    return parts if len(parts) > 1 else parts[0]


def cut_blocks(refs: list, sort_keys: list[tuple[str, str]], partitions: int, prepare: Prepare = None,
               count: Optional[Callable[[pa.Table], Any]] = None) -> tuple[list[list], list]:
    """Steps (1) and (2) of the sort as Ray tasks: ``(parts, counts)`` — for each of the (at most)
    ``partitions`` partitions, in sort order, the refs of its part of every block; and, when
    ``count`` is given, for each block a ref to ``[count(part) for part in its parts]`` (what the
    merges will hold, known before they run). Blocks go through ``prepare`` first."""
    import ray

    bounds = pa.table({})
    if partitions > 1 and refs:
        sample = remote_task(sort_key_sample)
        samples = ray.get([sample.remote(r, sort_keys, SORT_SAMPLES, prepare) for r in refs])
        bounds = choose_boundaries(samples, sort_keys, partitions)
    partitions = bounds.num_rows + 1
    if not refs or (partitions == 1 and prepare is None and count is None):
        return [list(refs)], []
    bref = ray.put(bounds)
    cut = remote_task(_cut, num_returns=partitions + (count is not None))
    pieces = [cut.remote(r, sort_keys, bref, prepare, count) for r in refs]
    if count is None:
        return ([[c[p] for c in pieces] for p in range(partitions)] if partitions > 1 else [pieces]), []
    return [[c[p] for c in pieces] for p in range(partitions)], [c[partitions] for c in pieces]


def sample_sort(refs: list, sort_keys: list[tuple[str, str]], partitions: int, merge: Any,
                args: tuple = (), merge_options: dict[str, Any] | None = None, prepare: Prepare = None) -> list:
    """Sort the blocks ``refs`` into ``partitions`` sorted partitions with Ray tasks; returns
    ``merge(sort_keys, *args, *parts)`` run as a task on each partition (its object refs), in sort
    order. ``merge`` is a module-level function (e.g. merge + count, merge + find duplicates);
    ``merge_options``: its ``ray.remote`` options (``num_returns``); ``prepare``: run on each block
    first (:data:`Prepare`). The driver sees only the samples and the boundaries."""
    columns, _ = cut_blocks(refs, sort_keys, partitions, prepare)
    task = remote_task(merge, **(merge_options or {}))
    return [task.remote(sort_keys, *args, *col) for col in columns]
