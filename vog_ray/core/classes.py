"""Class moments of raw VoG (DESIGN.md §1 step 6): per (split, class) count, error rate, mean and
population std, merged across blocks in a deterministic order; and the exact, layout-independent
per-block sums the Ray reduce uses, so the class table is the same bit for bit however the raw
table is blocked. Imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .moments import ClassMoments
from .table import vog_col

__all__ = ["classes_of", "split_codes", "group_codes", "partial_class_moments", "merge_class_moments", "class_table", "class_lookup",
           "exact_class_sums", "exact_class_means", "exact_class_table"]


def classes_of(table: pa.Table) -> np.ndarray:
    """The class column as int64 (-1 where null, e.g. rejected rows)."""
    if "target_label" not in table.column_names:
        return np.full(table.num_rows, -1, np.int64)
    return pc.fill_null(table.column("target_label"), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def split_codes(table: pa.Table) -> tuple[np.ndarray, list[str]]:
    """Each row's split as an index into the table's split names (sorted): per-row work on small
    ints instead of strings (a block holds a handful of splits)."""
    col = table.column("split")
    names = sorted(pc.unique(col).to_pylist())
    codes = pc.index_in(col, value_set=pa.array(names, col.type)).to_numpy(zero_copy_only=False)
    return codes.astype(np.int64, copy=False), names


# group codes come from a bincount over split × class when that grid has at most this many cells
# (a few MiB of counts), else from a sort of the rows' keys
_GROUP_GRID_MAX = 1 << 20


def group_codes(table: pa.Table) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, list[str]]:
    """Each row's (split, class) group as an int ``0 … G-1``, groups in (split, class) order:
    ``(codes, split of each group, class of each group, each row's split code, split names)``."""
    sidx, names = split_codes(table)
    cls = classes_of(table)
    if len(cls) == 0:
        return np.zeros(0, np.int64), [], np.zeros(0, np.int64), sidx, names
    lo = int(cls.min())
    span = int(cls.max()) - lo + 1
    key = sidx * span + (cls - lo)
    if len(names) * span <= _GROUP_GRID_MAX:
        present = np.flatnonzero(np.bincount(key, minlength=len(names) * span))
        remap = np.zeros(len(names) * span, np.int64)
        remap[present] = np.arange(len(present))
        codes, uniq = remap[key], present
    else:
        uniq, codes = np.unique(key, return_inverse=True)
    return codes, [names[u] for u in uniq // span], uniq % span + lo, sidx, names


def partial_class_moments(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Per (split, class) moments of raw VoG in one block, plus error counts.

    ``first_id`` (the block's smallest id in that class) orders partials for a deterministic merge.
    """
    if table.num_rows == 0:
        return _empty_partials(keys)
    inv, g_split, g_class, _, _ = group_codes(table)
    ids = table.column("id").to_numpy(zero_copy_only=False).astype(str)
    correct = table.column("correct")
    known = pc.is_valid(correct).to_numpy(zero_copy_only=False)
    corr = pc.fill_null(correct, False).to_numpy(zero_copy_only=False).astype(bool)
    G = len(g_split)
    out: dict[str, Any] = {
        "split": g_split,
        "class": [int(c) for c in g_class],
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
        return class_table({}, keys)
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
    return class_table(merged, keys)


def class_table(merged: dict[tuple[str, int], dict[str, Any]], keys: Sequence[str]) -> pa.Table:
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
    e = e.astype(np.int64)
    e_lo = int(e.min())
    span = int(e.max()) - e_lo + 1
    key = g * span + (e - e_lo)      # one cell per (group, exponent)
    if num_groups * span <= _GROUP_GRID_MAX:
        cells = np.flatnonzero(np.bincount(key, minlength=num_groups * span))
        remap = np.zeros(num_groups * span, np.int64)
        remap[cells] = np.arange(len(cells))
        inv = remap[key]
    else:
        cells, inv = np.unique(key, return_inverse=True)
    # float64 bincount sums of integers below 2**27 are exact for < 2**26 rows per block
    s_hi = np.bincount(inv, weights=hi.astype(np.float64), minlength=len(cells))
    s_lo = np.bincount(inv, weights=lo.astype(np.float64), minlength=len(cells))
    for k, a, b in zip(cells.tolist(), s_hi.tolist(), s_lo.tolist()):
        grp, exp = divmod(k, span)
        out[grp] += ((int(a) << 26) + int(b)) << (exp + e_lo - 53 + _EXACT_SHIFT)
    return out, bad


def exact_class_sums(table: pa.Table, vog_keys: Sequence[str],
                     means: dict[str, dict[str, list]] | None = None) -> pa.Table:
    """One block's exact per-(split, class) sums: of raw VoG (``means`` None), else of the squared
    deviations from ``means`` (``{"split": [...], "class": [...], "<key>": [...]}`` from
    :func:`exact_class_means`). Sums travel as decimal strings."""
    if table.num_rows == 0:
        return pa.table({"split": pa.array([], pa.string()), "class": pa.array([], pa.int64())})
    inv, g_split, g_class, _, _ = group_codes(table)
    G = len(g_split)
    out: dict[str, Any] = {"split": g_split, "class": [int(c) for c in g_class],
                           "n": np.bincount(inv, minlength=G).astype(np.int64)}
    if means is None:
        correct = table.column("correct")
        known = pc.is_valid(correct).to_numpy(zero_copy_only=False)
        corr = pc.fill_null(correct, False).to_numpy(zero_copy_only=False).astype(bool)
        out["n_labelled"] = np.bincount(inv, weights=known, minlength=G).astype(np.int64)
        out["n_errors"] = np.bincount(inv, weights=known & ~corr, minlength=G).astype(np.int64)
    else:
        index = {(s, int(c)): i for i, (s, c) in enumerate(zip(means["split"], means["class"]))}
        rows = np.array([index[(s, int(c))] for s, c in zip(g_split, g_class)], np.int64)
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
    return class_table(merged, vog_keys)


