"""Class normalisation and ranks of the score table (DESIGN.md §1 step 6): z per key, the ranked
``score``, and ranks within a split and a class from a table sorted by :data:`SORT_KEYS` (one
block, or many consecutive blocks given the rows before each). The single-process audit and
the Ray reduce call the same functions, so both give the same numbers. Imports neither torch
nor Ray.

Score-table columns (one row per example): ``id`` (string), ``split``, ``label`` (true label,
-1 if unknown), ``target_label`` (the class used as target index and for normalisation),
``pred`` (prediction of the last checkpoint), ``correct`` (null if the label is unknown),
``vog_<window>_<target>`` (raw VoG), ``z_<window>_<target>`` (normalised), ``score`` (the
ranked one of those), ``rank`` (1 = highest score in the split; ties broken by id),
``class_rank`` (within split and class), ``percentile`` (100 = highest), ``decile`` (10 =
highest VoG), and the per-checkpoint signals ``sig_<name>`` (a list, one value per checkpoint).

With a reference split (``vog.normalize_against``), every split's z uses the reference split's
class moments. A row whose class has no example in the reference split has no reference moments:
its z (and ``score``) is NaN and its rank columns are null — it is not ranked, and the run
counts such rows (:func:`unreferenced`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from .classes import class_lookup, group_codes, merge_class_moments, partial_class_moments
from .moments import class_normalize
from .table import vog_col, z_col

__all__ = ["normalize", "set_column", "SORT_KEYS", "assign_ranks", "block_counts", "add_counts",
           "rank_offsets", "rank_table", "rank_in_memory", "unreferenced", "check_reference", "z_values"]


def normalize(table: pa.Table, lookup: dict[str, dict[str, np.ndarray]], keys: Sequence[str],
              method: str, primary: str, reference: str | None = None) -> pa.Table:
    """Add ``z_<key>`` for every key and ``score`` (= ``z_<primary>``): each row's class mean and
    std looked up through its (split, class) group (:func:`group_codes`) in its own split's class
    moments, or in those of the split ``reference`` (NaN for a class it lacks)."""
    codes, g_split, g_class, _, _ = group_codes(table)
    src = list(g_split) if reference is None else [reference] * len(g_split)
    zs = {}
    for k in keys:
        mean = np.array([lookup[s][f"mean_{k}"][c] for s, c in zip(src, g_class)], np.float64)
        std = np.array([lookup[s][f"std_{k}"][c] for s, c in zip(src, g_class)], np.float64)
        z = class_normalize(table.column(vog_col(k)).to_numpy(zero_copy_only=False), codes, mean, std, method)
        if reference is not None:
            z[~np.isfinite(mean)[codes]] = np.nan
        zs[k] = z
    for k in keys:
        table = set_column(table, z_col(k), pa.array(zs[k], pa.float64()))
    return set_column(table, "score", pa.array(zs[primary], pa.float64()))


def z_values(vog: np.ndarray, cls: np.ndarray, moments: dict[str, np.ndarray], key: str, method: str,
             referenced: bool = False) -> np.ndarray:
    """z of raw VoG ``vog`` of classes ``cls`` with one split's class moments (an entry of
    ``class_lookup``). ``referenced`` (the moments are another split's): NaN for a class without
    moments there, instead of the own-split rule z = 0 of an empty or degenerate class."""
    mean = moments[f"mean_{key}"]
    z = class_normalize(vog, cls, mean, moments[f"std_{key}"], method)
    if referenced:
        z[~np.isfinite(np.asarray(mean, np.float64)[np.asarray(cls, np.int64)])] = np.nan
    return z


def set_column(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)


SORT_KEYS = [("split", "ascending"), ("score", "descending"), ("id", "ascending")]


def _ranked(table: pa.Table) -> np.ndarray:
    """Which rows are ranked: those with a finite ``score`` (NaN sorts after every number)."""
    return np.isfinite(table.column("score").to_numpy(zero_copy_only=False).astype(np.float64))


def assign_ranks(sorted_table: pa.Table, split_offset: dict[str, int], class_offset: dict[tuple[str, int], int],
                 split_size: dict[str, int]) -> pa.Table:
    """Ranks for a block of a table sorted by :data:`SORT_KEYS`, given the number of ranked rows
    of each split (and split × class) that precede the block. Rows without a finite score get
    null ranks (they sort last in their split, so the offsets count ranked rows only)."""
    ok = _ranked(sorted_table)
    mask = None if ok.all() else ~ok
    codes, g_split, g_class, sidx, names = group_codes(sorted_table if mask is None else sorted_table.filter(ok))
    rank = _cumcount(sidx) + np.array([split_offset.get(s, 0) for s in names], np.int64)[sidx]
    crank = _cumcount(codes) + np.array(
        [class_offset.get((s, int(c)), 0) for s, c in zip(g_split, g_class)], np.int64)[codes]
    size = np.array([split_size[s] for s in names], np.int64)[sidx]
    pct = 100.0 * (size - rank + 1) / np.maximum(size, 1)
    dec = 10 - np.floor_divide(10 * (rank - 1), np.maximum(size, 1))

    def full(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        if mask is None:
            return pa.array(values, typ)
        out = np.zeros(len(ok), values.dtype)
        out[ok] = values
        return pa.array(out, typ, mask=mask)

    t = sorted_table
    t = set_column(t, "rank", full(rank, pa.int64()))
    t = set_column(t, "class_rank", full(crank, pa.int64()))
    t = set_column(t, "percentile", full(pct, pa.float64()))
    return set_column(t, "decile", full(dec.astype(np.int64), pa.int64()))


def _cumcount(codes: np.ndarray) -> np.ndarray:
    """1-based running count of each code's occurrences (small ints), in order."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) - group_start + 1
    return out


def block_counts(sorted_table: pa.Table) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Ranked rows (finite score) per split and per (split, class) in a block."""
    ok = _ranked(sorted_table)
    codes, g_split, g_class, sidx, names = group_codes(sorted_table if ok.all() else sorted_table.filter(ok))
    s_counts = {s: int(v) for s, v in zip(names, np.bincount(sidx, minlength=len(names))) if v}
    c_counts = {(s, int(c)): int(v) for s, c, v in zip(g_split, g_class, np.bincount(codes, minlength=len(g_split)))}
    return s_counts, c_counts


def add_counts(counts: list[tuple[dict[str, int], dict[tuple[str, int], int]]]
               ) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """The sum of :func:`block_counts` results (the counts of the blocks together)."""
    s_out: dict[str, int] = {}
    c_out: dict[tuple[str, int], int] = {}
    for s_c, c_c in counts:
        for s, v in s_c.items():
            s_out[s] = s_out.get(s, 0) + v
        for k, v in c_c.items():
            c_out[k] = c_out.get(k, 0) + v
    return s_out, c_out


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


def unreferenced(classes: pa.Table, reference: str | None) -> dict[str, dict[int, int]]:
    """``split -> {class: rows}`` of the classes that have no example in the split ``reference``
    (their rows get no z against it), from the class table; empty without a reference."""
    if reference is None or classes.num_rows == 0:
        return {}
    d = classes.select(["split", "class", "count"]).to_pydict()
    have = {c for s, c, n in zip(d["split"], d["class"], d["count"]) if s == reference and n}
    out: dict[str, dict[int, int]] = {}
    for s, c, n in zip(d["split"], d["class"], d["count"]):
        if c not in have and n:
            out.setdefault(s, {})[int(c)] = int(n)
    return out


def check_reference(classes: pa.Table, reference: str | None) -> None:
    """The reference split must have scored rows (else no z could be computed at all)."""
    if reference is not None and reference not in set(classes.column("split").to_pylist()):
        raise ValueError(f"vog.normalize_against: split {reference!r} has no scored rows, so no "
                         "split can be normalised against it")


def rank_in_memory(table: pa.Table, keys: Sequence[str], normalization: str, primary: str,
                   reference: str | None = None) -> tuple[pa.Table, pa.Table]:
    """Class moments → z → ranks on one in-memory table of scored rows: ``(scores, classes)``;
    z against the split ``reference`` when given."""
    classes = merge_class_moments([partial_class_moments(table, keys)], keys)
    check_reference(classes, reference)
    table = normalize(table, class_lookup(classes, keys), keys, normalization, primary, reference)
    return rank_table(table), classes
