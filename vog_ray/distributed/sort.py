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

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .cluster import remote_task

__all__ = ["SORT_SAMPLES", "sort_key_sample", "choose_boundaries", "partition_block", "merge_sorted",
           "adjacent_duplicates", "sample_sort", "block_refs", "partitions_for"]

SORT_SAMPLES = 64  # sort keys sampled per block to choose the partition boundaries
MAX_PARTITIONS = 200


def sort_key_sample(t: pa.Table, sort_keys: list[tuple[str, str]], k: int) -> pa.Table:
    """``k`` evenly spaced rows of the block's sort-key columns, in sort order."""
    keys = t.select([c for c, _ in sort_keys])
    if keys.num_rows <= k:
        return keys.sort_by(sort_keys)
    idx = pc.sort_indices(keys, sort_keys=sort_keys).to_numpy()
    pick = idx[np.linspace(0, len(idx) - 1, k).round().astype(np.int64)]
    return keys.take(pa.array(np.sort(pick))).sort_by(sort_keys)


def choose_boundaries(samples: list[pa.Table], sort_keys: list[tuple[str, str]], partitions: int) -> pa.Table:
    """``partitions - 1`` boundary keys at the quantiles of the pooled samples."""
    pooled = pa.concat_tables([s for s in samples if s.num_rows], promote_options="default").sort_by(sort_keys)
    if pooled.num_rows == 0 or partitions <= 1:
        return pooled.slice(0, 0)
    at = [int(round(pooled.num_rows * p / partitions)) for p in range(1, partitions)]
    return pooled.take(pa.array([min(max(a, 0), pooled.num_rows - 1) for a in at]))


def partition_block(t: pa.Table, sort_keys: list[tuple[str, str]], boundaries: pa.Table) -> list[pa.Table]:
    """Cut a block into ``len(boundaries) + 1`` parts: part p holds the rows whose key is above
    boundary p - 1 and at most boundary p."""
    parts = boundaries.num_rows + 1
    if parts == 1 or t.num_rows == 0:
        return [t] + [t.slice(0, 0)] * (parts - 1)
    names = [c for c, _ in sort_keys]
    data = t.select(names).append_column("__b", pa.array(np.zeros(t.num_rows, np.int8)))
    bnd = boundaries.select(names).cast(data.select(names).schema).append_column(
        "__b", pa.array(np.ones(boundaries.num_rows, np.int8)))
    both = pa.concat_tables([data, bnd])
    # a stable sort with the data rows first among equal keys: a row equal to a boundary sorts
    # just before it, and so falls in that boundary's part
    order = pc.sort_indices(both, sort_keys=[*sort_keys, ("__b", "ascending")]).to_numpy()
    is_b = both.column("__b").to_numpy()[order]
    part_sorted = np.cumsum(is_b) - is_b  # boundaries passed before each position
    pid = np.empty(both.num_rows, np.int64)
    pid[order] = part_sorted
    pid = pid[:t.num_rows]
    return [t.filter(pa.array(pid == p)) for p in range(parts)]


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


def _cut(block: pa.Table, sort_keys: list[tuple[str, str]], boundaries: pa.Table) -> Any:
    parts = partition_block(block, sort_keys, boundaries)
    return parts if len(parts) > 1 else parts[0]


def sample_sort(refs: list, sort_keys: list[tuple[str, str]], partitions: int, merge: Any,
                args: tuple = (), merge_options: dict[str, Any] | None = None) -> list:
    """Sort the blocks ``refs`` into ``partitions`` sorted partitions with Ray tasks; returns
    ``merge(sort_keys, *args, *parts)`` run as a task on each partition (its object refs), in sort
    order. ``merge`` is a module-level function (e.g. merge + count, merge + find duplicates);
    ``merge_options``: its ``ray.remote`` options (``num_returns``). The driver sees only the
    samples and the boundaries."""
    import ray

    if partitions > 1 and refs:
        sample = remote_task(sort_key_sample)
        samples = ray.get([sample.remote(r, sort_keys, SORT_SAMPLES) for r in refs])
        bounds = choose_boundaries(samples, sort_keys, partitions)
        partitions = bounds.num_rows + 1
    if partitions > 1 and refs:
        bref = ray.put(bounds)
        cut = remote_task(_cut, num_returns=partitions)
        pieces = [cut.remote(r, sort_keys, bref) for r in refs]
        columns = [[c[p] for c in pieces] for p in range(partitions)]
    else:
        columns = [list(refs)]
    task = remote_task(merge, **(merge_options or {}))
    return [task.remote(sort_keys, *args, *col) for col in columns]
