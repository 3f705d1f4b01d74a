"""Per-example merges of partial pixel moments (checkpoint-sharded and incremental audits).

A moment row holds, per ``<window>_<target>`` key, ``mn_<key>`` (checkpoints folded), and the
per-pixel ``mmean_<key>`` / ``mm2_<key>`` as fixed-size lists, plus the per-checkpoint signals of
the checkpoints it covers. Rows of one example (one per checkpoint group, in group order) are
merged with :func:`vog_ray.core.moments.chan_merge`, vectorised over the examples of a sorted
partition; merged rows become fused-format score rows (raw VoG) with :func:`moments_to_table`.
Imports neither torch nor Ray at module level (its functions run in the reduce's workers).

Moments are stored as float64, float32 or float16 (:func:`moment_columns`, read back by
:func:`moments_of`); float16 rows are scaled into [-1, 1] first (a float32 scale per row and key
in ``mscale_<key>``: the mean's and M2's), so gradients of any magnitude keep float16's 11 bits of
relative precision instead of underflowing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ..core.moments import chan_merge
from ..core.options import SIGNALS
from ..core.table import result_to_table

__all__ = ["MOMENT_PREFIXES", "STATE_META", "MOMENT_DTYPES", "fixed_size_list", "list_values", "moment_columns",
           "moments_of", "moments_to_table", "merge_examples", "set_group"]

MOMENT_PREFIXES = ("mn_", "mmean_", "mm2_", "mscale_")
MOMENT_DTYPES = ("float16", "float32", "float64")
STATE_META = ("id", "split", "label", "status", "group", "target_label", "pred")


def fixed_size_list(values: np.ndarray) -> pa.Array:
    """A 2-D array as a fixed-size-list column."""
    values = np.asarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), max(1, values.shape[1]))


def list_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a 2-D numpy array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def moment_columns(key: str, mean: np.ndarray, m2: np.ndarray, dtype: str) -> dict[str, pa.Array]:
    """The stored columns of one key's per-pixel moments (``[E, P]`` arrays) in ``dtype``."""
    if dtype not in MOMENT_DTYPES:
        raise ValueError(f"moment dtype {dtype!r} is not one of {MOMENT_DTYPES}")
    mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
    if dtype != "float16":
        return {f"mmean_{key}": fixed_size_list(mean.astype(dtype)), f"mm2_{key}": fixed_size_list(m2.astype(dtype))}
    scales = np.stack([np.abs(mean).max(axis=1, initial=0.0), np.abs(m2).max(axis=1, initial=0.0)], axis=1)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        return {f"mmean_{key}": fixed_size_list((mean / scales[:, :1]).astype(np.float16)),
                f"mm2_{key}": fixed_size_list((m2 / scales[:, 1:]).astype(np.float16)),
                f"mscale_{key}": fixed_size_list(scales)}


def moments_of(t: pa.Table, key: str) -> tuple[np.ndarray, np.ndarray]:
    """One key's per-pixel ``(mean, M2)`` of a moment table as float64 ``[E, P]`` arrays."""
    mean = list_values(t[f"mmean_{key}"]).astype(np.float64)
    m2 = list_values(t[f"mm2_{key}"]).astype(np.float64)
    if f"mscale_{key}" in t.column_names:
        scales = list_values(t[f"mscale_{key}"]).astype(np.float64)
        mean, m2 = mean * scales[:, :1], m2 * scales[:, 1:]
    return mean, m2


class _Result:
    """The fields of the engine's ``BatchResult`` that :func:`result_to_table` reads (the engine
    module imports torch; this one must not)."""

    def __init__(self, status: np.ndarray, target_label: np.ndarray, pred: np.ndarray):
        self.status, self.target_label, self.pred = status, target_label, pred
        self.vog: dict[str, np.ndarray] = {}
        self.signals: dict[str, np.ndarray] = {}


def moments_to_table(t: pa.Table, vog_keys: list[str]) -> pa.Table:
    """Moment rows (ok rows of a state or merged shards) → fused-format score rows (raw VoG)."""
    n = t.num_rows
    res = _Result(np.array(["ok"] * n, object), t["target_label"].to_numpy().astype(np.int64),
                  t["pred"].to_numpy().astype(np.int64))
    for k in vog_keys:
        cnt = t[f"mn_{k}"].to_numpy().astype(np.float64)
        m2 = moments_of(t, k)[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.maximum(m2 / cnt[:, None], 0))
        res.vog[k] = np.where(cnt > 0, std.mean(axis=1) if n else np.zeros(0), np.nan)
    for s in SIGNALS:
        res.signals[s] = list_values(t[f"sig_{s}"])
    extra = {c: t[c] for c in t.column_names if c not in STATE_META and not c.startswith(MOMENT_PREFIXES)
             and not c.startswith("sig_")}
    return result_to_table(res, ids=t["id"].to_pylist(), split=t["split"].to_pylist(),  # type: ignore[arg-type]
                           labels=t["label"].to_numpy().astype(np.int64), keys=vog_keys, extra=extra)


def merge_examples(t: pa.Table, vog_keys: list[str], num_groups: int, dtype: str = "float64") -> pa.Table:
    """A table sorted by (split, id, group), ``num_groups`` rows per example → one merged moment
    row per example: :func:`chan_merge` over the groups in order, vectorised over the examples
    (the same float64 operations in the same order as merging one example at a time —
    tests check the bits); signals concatenated in checkpoint order, prediction and target from
    the last group (the run's last checkpoint). The merged moments are stored in ``dtype``."""
    n = t.num_rows
    if n == 0:
        return t
    s = t.column("split").to_numpy(zero_copy_only=False).astype(object)
    i = t.column("id").to_numpy(zero_copy_only=False).astype(object)
    starts = np.r_[0, np.flatnonzero((s[1:] != s[:-1]) | (i[1:] != i[:-1])) + 1, n]
    counts = np.diff(starts)
    if np.any(counts != num_groups):
        j = int(np.flatnonzero(counts != num_groups)[0])
        raise RuntimeError(f"example {i[starts[j]]!r}: expected {num_groups} partial rows, got {int(counts[j])}")
    E, G = len(counts), num_groups
    first, last = pa.array(starts[:-1]), pa.array(starts[1:] - 1)
    cols: dict[str, Any] = {c: t[c].take(last) for c in t.column_names
                            if c in ("id", "split", "label", "status", "target_label", "pred")}
    cols["group"] = pa.array(np.zeros(E, np.int64), pa.int64())
    for k in vog_keys:
        ns = t[f"mn_{k}"].to_numpy().astype(np.int64).reshape(E, G)
        means, m2s = moments_of(t, k)
        P = means.shape[1]
        means, m2s = means.reshape(E, G, P), m2s.reshape(E, G, P)
        n_acc, mean, m2 = ns[:, 0].copy(), means[:, 0].copy(), m2s[:, 0].copy()
        for g in range(1, G):
            n_acc, mean, m2 = chan_merge(n_acc, mean, m2, ns[:, g], means[:, g], m2s[:, g])
        cols[f"mn_{k}"] = pa.array(n_acc, pa.int64())
        cols.update(moment_columns(k, mean, m2, dtype))
    widths = [list_values(t["sig_loss"].take(pa.array(np.arange(g, n, G)))).shape[1] for g in range(G)] \
        if "sig_loss" in t.column_names else None
    for c in t.column_names:
        if c.startswith("sig_"):  # group g's rows hold that group's checkpoints, in order
            cols[c] = fixed_size_list(_signal_groups(t[c], n, G, widths))
    for c in t.column_names:
        if c not in cols and c not in STATE_META and not c.startswith(MOMENT_PREFIXES):
            cols[c] = t[c].take(first)
    return pa.table(cols)


def _signal_groups(col: pa.ChunkedArray, n: int, G: int, widths: list[int] | None) -> np.ndarray:
    """One signal's values of every group side by side (checkpoint order). A group whose rows hold
    no value — an incremental state written before that signal existed — gets NaN for its
    checkpoints (as many as its ``sig_loss`` has)."""
    parts: list[np.ndarray | None] = []
    for g in range(G):
        part = col.take(pa.array(np.arange(g, n, G)))
        parts.append(None if widths and part.null_count == len(part) else list_values(part))
    known = [p for p in parts if p is not None]
    dtype = np.result_type(known[0].dtype, np.float32) if known else np.float32
    E = n // G
    return np.concatenate([p if p is not None else np.full((E, widths[g]), np.nan, dtype)  # type: ignore[index]
                           for g, p in enumerate(parts)], axis=1)


def set_group(t: pa.Table, group: int) -> pa.Table:
    """Set every row's ``group`` (the incremental fold: 0 = the state, 1 = the new checkpoints)."""
    i = t.schema.get_field_index("group")
    col = pa.array([group] * t.num_rows, pa.int64())
    return t.set_column(i, "group", col) if i >= 0 else t.append_column("group", col)


def merge_partition(sort_keys: list[tuple[str, str]], vog_keys: list[str], num_groups: int, dtype: str,
                    *parts: pa.Table) -> tuple[pa.Table, int]:
    """The sample sort's merge step for partial moments: one partition sorted, then merged by
    example. Returns the merged rows and their count."""
    from .sort import merge_sorted

    t = merge_examples(merge_sorted(list(parts), sort_keys), vog_keys, num_groups, dtype)
    return t, t.num_rows


def merge_by_example(ds: Any, vog_keys: list[str], num_groups: int, num_rows: int, dtype: str = "float64") -> Any:
    """Partial moment rows (``group`` 0 … num_groups - 1 of each example) → one merged row per
    example, as a dataset (None if there is none): a distributed sort by (split, id, group), then
    each sorted partition merges its runs of equal ids (the merged moments stored in ``dtype``)."""
    import ray
    import ray.data

    from .sort import block_refs, partitions_for, sample_sort

    keys = [("split", "ascending"), ("id", "ascending"), ("group", "ascending")]
    merged = sample_sort(block_refs(ds), keys, partitions_for(num_rows, 20_000), merge_partition,
                         args=(vog_keys, num_groups, dtype), merge_options={"num_returns": 2})
    sizes = ray.get([m[1] for m in merged])
    refs = [m[0] for m, n in zip(merged, sizes) if n]
    return ray.data.from_arrow_refs(refs) if refs else None
