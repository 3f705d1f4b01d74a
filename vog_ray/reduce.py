"""The reduce step, Ray-free: class moments, class normalisation and ranks (DESIGN.md §1 step 6).

The same functions serve the single-process :func:`vog_ray.score` (one block) and the Ray
pipeline (many blocks, merged in a deterministic order), so both give the same numbers.

Score-table columns (one row per example):

``id`` (string), ``split``, ``label`` (true label, -1 if unknown), ``target_label`` (the class
used as target index and for normalisation), ``pred`` (prediction of the last checkpoint),
``correct`` (null if the label is unknown), ``vog_<window>_<target>`` (raw VoG),
``z_<window>_<target>`` (normalised), ``score`` (the ranked one of those), ``rank`` (1 = highest
score in the split; ties broken by id), ``class_rank`` (within split and class), ``percentile``
(100 = highest), ``decile`` (10 = highest VoG), and the per-checkpoint signals
``sig_<name>`` (a list with one value per checkpoint).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .moments import ClassMoments, class_normalize

__all__ = ["partial_class_moments", "merge_class_moments", "normalize", "rank_table",
           "rank_columns", "vog_col", "z_col", "class_lookup"]

RANK_COLUMNS = ("rank", "class_rank", "percentile", "decile")
rank_columns = RANK_COLUMNS


def _classes_of(table: pa.Table) -> np.ndarray:
    """The class column as int64 (-1 where null, e.g. rejected rows)."""
    if "target_label" not in table.column_names:
        return np.full(table.num_rows, -1, np.int64)
    return pc.fill_null(table.column("target_label"), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def vog_col(key: str) -> str:
    return f"vog_{key}"


def z_col(key: str) -> str:
    return f"z_{key}"


def partial_class_moments(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Per (split, class) moments of raw VoG in one block, plus error counts.

    ``first_id`` (the block's smallest id in that class) orders partials for a deterministic merge.
    """
    if table.num_rows == 0:
        return _empty_partials(keys)
    splits = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    cls = _classes_of(table)
    ids = table.column("id").to_numpy(zero_copy_only=False).astype(str)
    correct = table.column("correct")
    known = pc.is_valid(correct).to_numpy(zero_copy_only=False)
    corr = pc.fill_null(correct, False).to_numpy(zero_copy_only=False).astype(bool)
    pairs = np.rec.fromarrays([splits, cls], names="s,c")
    uniq, inv = np.unique(pairs, return_inverse=True)
    G = len(uniq)
    out: dict[str, Any] = {
        "split": [str(u[0]) for u in uniq],
        "class": [int(u[1]) for u in uniq],
        "first_id": [min(ids[inv == g]) for g in range(G)],
        "n_labelled": np.bincount(inv, weights=known, minlength=G).astype(np.int64),
        "n_errors": np.bincount(inv, weights=known & ~corr, minlength=G).astype(np.int64),
    }
    for k in keys:
        v = table.column(vog_col(k)).to_numpy(zero_copy_only=False).astype(np.float64)
        st = ClassMoments.from_groups(v, inv, G)
        out["n"] = st.n.astype(np.int64)
        out[f"mean_{k}"] = st.mean
        out[f"m2_{k}"] = st.m2
    return pa.table(out)


def _empty_partials(keys: Sequence[str]) -> pa.Table:
    cols = {"split": pa.array([], pa.string()), "class": pa.array([], pa.int64()),
            "first_id": pa.array([], pa.string()), "n_labelled": pa.array([], pa.int64()),
            "n_errors": pa.array([], pa.int64()), "n": pa.array([], pa.int64())}
    for k in keys:
        cols[f"mean_{k}"] = pa.array([], pa.float64())
        cols[f"m2_{k}"] = pa.array([], pa.float64())
    return pa.table(cols)


def merge_class_moments(partials: pa.Table | Iterable[pa.Table], keys: Sequence[str]) -> pa.Table:
    """Merge partial class moments (Chan) into the class table, in a deterministic order.

    Partials are merged per (split, class) in the order of ``first_id``, so the result is the
    same bit for bit however the blocks were scheduled. Output columns: ``split``, ``class``,
    ``count``, ``error_rate`` (null if no labels), ``mean_<key>``, ``std_<key>`` (population),
    ``degenerate_<key>`` (std is 0: every z of that class is 0).
    """
    if not isinstance(partials, pa.Table):
        partials = pa.concat_tables(list(partials)) if partials else _empty_partials(keys)
    if partials.num_rows == 0:
        return _class_table({}, keys)
    partials = partials.sort_by([("split", "ascending"), ("class", "ascending"),
                                 ("first_id", "ascending")])
    cols = partials.to_pydict()
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (s, c) in enumerate(zip(cols["split"], cols["class"])):
        groups.setdefault((s, c), []).append(i)
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for g, rows in groups.items():
        rec: dict[str, Any] = {
            "count": int(sum(cols["n"][i] for i in rows)),
            "n_labelled": int(sum(cols["n_labelled"][i] for i in rows)),
            "n_errors": int(sum(cols["n_errors"][i] for i in rows)),
        }
        for k in keys:
            st = ClassMoments.empty()
            for i in rows:
                st = st.merge(ClassMoments(np.float64(cols["n"][i]), np.float64(cols[f"mean_{k}"][i]),
                                           np.float64(cols[f"m2_{k}"][i])))
            m, s = st.finalize()
            rec[f"mean_{k}"] = float(m)
            rec[f"std_{k}"] = float(s)
        merged[g] = rec
    return _class_table(merged, keys)


def _class_table(merged: dict[tuple[str, int], dict[str, Any]], keys: Sequence[str]) -> pa.Table:
    order = sorted(merged)
    out: dict[str, Any] = {
        "split": pa.array([g[0] for g in order], pa.string()),
        "class": pa.array([g[1] for g in order], pa.int64()),
        "count": pa.array([merged[g]["count"] for g in order], pa.int64()),
        "error_rate": pa.array([merged[g]["n_errors"] / merged[g]["n_labelled"]
                                if merged[g]["n_labelled"] else None for g in order], pa.float64()),
    }
    for k in keys:
        out[f"mean_{k}"] = pa.array([merged[g][f"mean_{k}"] for g in order], pa.float64())
        out[f"std_{k}"] = pa.array([merged[g][f"std_{k}"] for g in order], pa.float64())
        out[f"degenerate_{k}"] = pa.array(
            [not (np.isfinite(merged[g][f"std_{k}"]) and merged[g][f"std_{k}"] > 0) for g in order])
    return pa.table(out)


def class_lookup(classes: pa.Table, keys: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """``split -> {"mean_<key>": array indexed by class, "std_<key>": ...}`` for normalising."""
    out: dict[str, dict[str, np.ndarray]] = {}
    d = classes.to_pydict()
    if not d.get("class"):
        return out
    C = max(d["class"]) + 1
    for i, s in enumerate(d["split"]):
        e = out.setdefault(s, {f"{p}_{k}": np.full(C, np.nan) for k in keys for p in ("mean", "std")})
        c = d["class"][i]
        for k in keys:
            e[f"mean_{k}"][c] = d[f"mean_{k}"][i]
            e[f"std_{k}"][c] = d[f"std_{k}"][i]
    return out


def normalize(table: pa.Table, lookup: dict[str, dict[str, np.ndarray]], keys: Sequence[str],
              method: str, primary: str) -> pa.Table:
    """Add ``z_<key>`` for every key and ``score`` (= ``z_<primary>``)."""
    splits = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    cls = _classes_of(table)
    zs = {k: np.zeros(table.num_rows) for k in keys}
    for s in np.unique(splits):
        rows = splits == s
        e = lookup[s]
        for k in keys:
            v = table.column(vog_col(k)).to_numpy(zero_copy_only=False)[rows]
            zs[k][rows] = class_normalize(v, cls[rows], e[f"mean_{k}"], e[f"std_{k}"], method)
    for k in keys:
        table = _set(table, z_col(k), pa.array(zs[k], pa.float64()))
    return _set(table, "score", pa.array(zs[primary], pa.float64()))


def _set(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)


SORT_KEYS = [("split", "ascending"), ("score", "descending"), ("id", "ascending")]


def assign_ranks(sorted_table: pa.Table, split_offset: dict[str, int], class_offset: dict[tuple[str, int], int],
                 split_size: dict[str, int]) -> pa.Table:
    """Ranks for a block of a table sorted by :data:`SORT_KEYS`, given the number of rows of
    each split (and split × class) that precede the block."""
    n = sorted_table.num_rows
    splits = sorted_table.column("split").to_numpy(zero_copy_only=False).astype(str)
    cls = _classes_of(sorted_table)
    rank = _cumcount(splits) + np.array([split_offset.get(s, 0) for s in splits], np.int64)
    pairs = np.char.add(np.char.add(splits, "\x00"), cls.astype(str)) if n else splits
    crank = _cumcount(pairs) + np.array(
        [class_offset.get((s, int(c)), 0) for s, c in zip(splits, cls)], np.int64)
    size = np.array([split_size[s] for s in splits], np.int64) if n else np.zeros(0, np.int64)
    pct = 100.0 * (size - rank + 1) / np.maximum(size, 1)
    dec = 10 - np.floor_divide(10 * (rank - 1), np.maximum(size, 1))
    t = sorted_table
    t = _set(t, "rank", pa.array(rank, pa.int64()))
    t = _set(t, "class_rank", pa.array(crank, pa.int64()))
    t = _set(t, "percentile", pa.array(pct, pa.float64()))
    return _set(t, "decile", pa.array(dec.astype(np.int64), pa.int64()))


def _cumcount(keys: np.ndarray) -> np.ndarray:
    """1-based running count of each key's occurrences, in order."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64)
    _, inv = np.unique(keys, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    sorted_inv = inv[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_inv)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) - group_start + 1
    return out


def block_counts(sorted_table: pa.Table) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Rows per split and per (split, class) in a block."""
    splits = sorted_table.column("split").to_numpy(zero_copy_only=False).astype(str)
    cls = _classes_of(sorted_table)
    s_counts = {str(k): int(v) for k, v in zip(*np.unique(splits, return_counts=True))}
    c_counts: dict[tuple[str, int], int] = {}
    if len(splits):
        pairs = np.rec.fromarrays([splits, cls], names="s,c")
        for u, v in zip(*np.unique(pairs, return_counts=True)):
            c_counts[(str(u[0]), int(u[1]))] = int(v)
    return s_counts, c_counts


def rank_offsets(counts: list[tuple[dict[str, int], dict[tuple[str, int], int]]]):
    """From the :func:`block_counts` of consecutive sorted blocks: the rows of each split, and for
    every block the rows of each split and of each (split, class) before it — the arguments of
    :func:`assign_ranks`."""
    sizes: dict[str, int] = {}
    for s_c, _ in counts:
        for s, v in s_c.items():
            sizes[s] = sizes.get(s, 0) + v
    s_off: dict[str, int] = {}
    c_off: dict[tuple[str, int], int] = {}
    offsets = []
    for s_c, c_c in counts:
        offsets.append((dict(s_off), dict(c_off)))
        for s, v in s_c.items():
            s_off[s] = s_off.get(s, 0) + v
        for k, v in c_c.items():
            c_off[k] = c_off.get(k, 0) + v
    return sizes, offsets


def rank_table(table: pa.Table) -> pa.Table:
    """Sort one in-memory table by :data:`SORT_KEYS` and add the rank columns."""
    t = table.sort_by(SORT_KEYS)
    s_counts, _ = block_counts(t)
    return assign_ranks(t, {}, {}, s_counts)


# ---------------------------------------------------------------- sample sort (the steps of the Ray reduce's sort)
# A distributed sort in three steps of per-block tasks, none of which sees more than one block or
# one partition: (1) each block sends a few evenly spaced sort keys; (2) P - 1 boundaries are
# picked from those samples and each block is cut into P parts by them (a row equal to boundary p
# goes to part p, in every block); (3) part p of every block is merged and sorted. The P sorted
# partitions, in order, are the sorted table.
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


# ---------------------------------------------------------------- per-block UDFs of the Ray reduce
# (here, not in pipeline.py: a Ray worker that runs them imports only numpy/pyarrow, never torch)
def _filter_status(t: pa.Table, ok: bool) -> pa.Table:
    m = pc.equal(t["status"], "ok")
    return t.filter(m if ok else pc.invert(m))


def _filter_splits(t: pa.Table, splits: list[str]) -> pa.Table:
    return t.filter(pc.is_in(t["split"], value_set=pa.array(splits, pa.string())))


def _rejected_of_group0(t: pa.Table) -> pa.Table:
    t = _filter_status(t, ok=False)
    t = t.filter(pc.equal(t["group"], 0))
    return t.select([c for c in t.column_names if c == "id" or c in ("split", "label", "status")
                     or not (c.startswith(("mn_", "mmean_", "mm2_", "sig_")) or c in ("group", "target_label", "pred"))])


def _drop_status(t: pa.Table) -> pa.Table:
    return t.drop_columns(["status"]) if "status" in t.column_names else t


def _sigs_to_lists(t: pa.Table) -> pa.Table:
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


def _rejected_columns(t: pa.Table | None) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("split", pa.string()), ("label", pa.int64()), ("reason", pa.string())])
    if t is None:
        return schema.empty_table()
    return pa.table({"id": t["id"], "split": t["split"], "label": t["label"], "reason": t["status"]}, schema=schema)


def _normalize_block(t: pa.Table, lookup, keys, method, primary) -> pa.Table:
    return normalize(_drop_status(t), lookup, keys, method, primary)


def _status_counts(t: pa.Table) -> pa.Table:
    """Rows per (split, scored or rejected) in one block."""
    if t.num_rows == 0:
        return pa.table({"split": pa.array([], pa.string()), "ok": pa.array([], pa.bool_()),
                         "n": pa.array([], pa.int64())})
    g = pa.table({"split": t["split"], "ok": pc.equal(t["status"], "ok")}).group_by(["split", "ok"]).aggregate(
        [([], "count_all")])
    return pa.table({"split": g["split"].cast(pa.string()), "ok": g["ok"], "n": g["count_all"].cast(pa.int64())})


# ---------------------------------------------------------------- exact, layout-independent class moments
# The Ray reduce sums per block and merges the blocks' sums. Floating-point sums depend on how the
# rows were split into blocks (a resumed stage 1, a retried block, another number of read tasks);
# these sums are EXACT — integers in units of 2**-_EXACT_SHIFT — so the merge is exactly
# associative and the class table (and every z-score) is the same bit for bit however the raw
# table is blocked. Two passes: exact sums of VoG give the means (correctly rounded), then exact
# sums of the float64 squared deviations from them give M2.
_EXACT_SHIFT = 1126  # 2**-1126 divides every float64 (smallest step 2**-1074, 53-bit mantissas)


def _exact_group_sums(values: np.ndarray, groups: np.ndarray, num_groups: int) -> tuple[list[int], np.ndarray]:
    """``(sums, bad)``: the exact sum of the finite ``values`` of each group (an int, in units of
    2**-_EXACT_SHIFT) and whether the group holds a non-finite value."""
    v = np.asarray(values, np.float64).ravel()
    g = np.asarray(groups, np.int64).ravel()
    finite = np.isfinite(v)
    bad = np.bincount(g[~finite], minlength=num_groups) > 0
    v, g = v[finite], g[finite]
    out = [0] * num_groups
    if v.size == 0:
        return out, bad
    m, e = np.frexp(v)                               # v = m * 2**e exactly, 0.5 <= |m| < 1
    mant = (m * 9007199254740992.0).astype(np.int64)  # m * 2**53: an exact 53-bit integer
    hi, lo = mant >> 26, mant & ((1 << 26) - 1)        # mant = hi * 2**26 + lo, |hi| < 2**27, 0 <= lo < 2**26
    uk, inv = np.unique(g * 4096 + (e.astype(np.int64) + 2048), return_inverse=True)
    # float64 bincount sums of integers below 2**27 are exact for < 2**26 rows per block
    s_hi = np.bincount(inv, weights=hi.astype(np.float64))
    s_lo = np.bincount(inv, weights=lo.astype(np.float64))
    for k, a, b in zip(uk.tolist(), s_hi.tolist(), s_lo.tolist()):
        grp, exp = divmod(k, 4096)
        out[grp] += ((int(a) << 26) + int(b)) << (exp - 2048 - 53 + _EXACT_SHIFT)
    return out, bad


def exact_class_sums(table: pa.Table, vog_keys: Sequence[str],
                     means: dict[str, dict[str, list]] | None = None) -> pa.Table:
    """One block's exact per-(split, class) sums: of raw VoG (``means`` None), else of the squared
    deviations from ``means`` (``{"split": [...], "class": [...], "<key>": [...]}`` from
    :func:`exact_class_means`). Sums travel as decimal strings."""
    if table.num_rows == 0:
        return pa.table({"split": pa.array([], pa.string()), "class": pa.array([], pa.int64())})
    splits = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    cls = _classes_of(table)
    pairs = np.rec.fromarrays([splits, cls], names="s,c")
    uniq, inv = np.unique(pairs, return_inverse=True)
    G = len(uniq)
    out: dict[str, Any] = {"split": [str(u[0]) for u in uniq], "class": [int(u[1]) for u in uniq],
                           "n": np.bincount(inv, minlength=G).astype(np.int64)}
    if means is None:
        correct = table.column("correct")
        known = pc.is_valid(correct).to_numpy(zero_copy_only=False)
        corr = pc.fill_null(correct, False).to_numpy(zero_copy_only=False).astype(bool)
        out["n_labelled"] = np.bincount(inv, weights=known, minlength=G).astype(np.int64)
        out["n_errors"] = np.bincount(inv, weights=known & ~corr, minlength=G).astype(np.int64)
    else:
        index = {(s, int(c)): i for i, (s, c) in enumerate(zip(means["split"], means["class"]))}
        rows = np.array([index[(str(u[0]), int(u[1]))] for u in uniq], np.int64)
    for k in vog_keys:
        v = table.column(vog_col(k)).to_numpy(zero_copy_only=False).astype(np.float64)
        if means is not None:
            mu = np.asarray(means[k], np.float64)[rows][inv]
            v = (v - mu) ** 2
        sums, bad = _exact_group_sums(v, inv, G)
        out[f"sum_{k}"] = [str(x) for x in sums]
        out[f"bad_{k}"] = bad
    return pa.table(out)


def _merge_exact(rows: list[dict[str, Any]], vog_keys: Sequence[str]) -> dict[tuple[str, int], dict[str, Any]]:
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        m = merged.setdefault((r["split"], int(r["class"])), {"n": 0, "n_labelled": 0, "n_errors": 0,
                                                              **{f"sum_{k}": 0 for k in vog_keys},
                                                              **{f"bad_{k}": False for k in vog_keys}})
        m["n"] += int(r["n"])
        m["n_labelled"] += int(r.get("n_labelled") or 0)
        m["n_errors"] += int(r.get("n_errors") or 0)
        for k in vog_keys:
            m[f"sum_{k}"] += int(r[f"sum_{k}"])
            m[f"bad_{k}"] = m[f"bad_{k}"] or bool(r[f"bad_{k}"])
    return merged


def _exact_ratio(total: int, n: int) -> float:
    from fractions import Fraction

    return float(Fraction(total, n << _EXACT_SHIFT))  # correctly rounded


def exact_class_means(pass1: list[dict[str, Any]], vog_keys: Sequence[str]) -> dict[str, list]:
    """Class means (correctly rounded) from the blocks' :func:`exact_class_sums` (first pass)."""
    merged = _merge_exact(pass1, vog_keys)
    order = sorted(merged)
    out: dict[str, list] = {"split": [g[0] for g in order], "class": [g[1] for g in order]}
    for k in vog_keys:
        out[k] = [float("nan") if merged[g][f"bad_{k}"] else _exact_ratio(merged[g][f"sum_{k}"], merged[g]["n"])
                  for g in order]
    return out


def exact_class_table(pass1: list[dict[str, Any]], pass2: list[dict[str, Any]],
                      vog_keys: Sequence[str]) -> pa.Table:
    """The class table (as :func:`merge_class_moments` makes it) from both passes' exact sums."""
    m1, m2 = _merge_exact(pass1, vog_keys), _merge_exact(pass2, vog_keys)
    means = exact_class_means(pass1, vog_keys)
    at = {(s, c): i for i, (s, c) in enumerate(zip(means["split"], means["class"]))}
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for g, rec in m1.items():
        out = {"count": rec["n"], "n_labelled": rec["n_labelled"], "n_errors": rec["n_errors"]}
        for k in vog_keys:
            bad = rec[f"bad_{k}"] or m2[g][f"bad_{k}"]
            out[f"mean_{k}"] = float("nan") if bad else means[k][at[g]]
            out[f"std_{k}"] = float("nan") if bad else float(np.sqrt(_exact_ratio(m2[g][f"sum_{k}"], rec["n"])))
        merged[g] = out
    return _class_table(merged, vog_keys)


def _adjacent_duplicates(t: pa.Table) -> pa.Table:
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
