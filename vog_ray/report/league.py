"""The signal league tables: which difficulty signal finds the flagged rows of each flag column,
and the OoD rows of each OoD group, best — AUROC and AUPR (scikit-learn; the flagged / OoD rows
are the positive class, every score oriented higher = more likely positive), best first, with
bootstrap intervals.

Intervals: stratified percentile bootstrap (positives and negatives each resampled with
replacement to their own count), the same resamples for every score of a table (paired). A
resample is a vector of multiplicities, so its AUROC and AUPR are the weighted ones, computed for
all resamples at once on the scores sorted once (:func:`weighted_auroc_aupr`; equal to
scikit-learn's with ``sample_weight``, tested). The point estimates are scikit-learn's
(``roc_auc_score``, ``average_precision_score``; an OoD group's are the OoD table's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from .common import stable_seed
from .context import ReportContext
from .scores import Scores, describe, signal_scores, usable, vog_scores

__all__ = ["MAX_BOOTSTRAP_CELLS", "weighted_auroc_aupr", "league_table", "league_section"]

# a bootstrap of n rows with B resamples holds a B × n weight matrix per score: at most this many
# cells (B is lowered for very large splits, and the number used is written next to the table)
MAX_BOOTSTRAP_CELLS = 50_000_000
_CHUNK_CELLS = 4_000_000   # resamples are computed in chunks of this many cells (~32 MB of float64)
LEVEL = 0.95


def _tie_groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sort order, group of each sorted row): groups of tied scores, ascending."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    return order, np.cumsum(np.r_[0, (np.diff(ss) != 0).astype(np.int64)])


def _from_groups(g1: np.ndarray, g0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPR from the positive / negative weight of each tie group ``[B, G]`` (ascending
    scores): a tie counts half (AUROC) and is one threshold (AUPR), as in scikit-learn. Integer
    weights (bootstrap multiplicities) keep the AUROC sums exact."""
    p, n = g1.sum(axis=1), g0.sum(axis=1)
    below = np.cumsum(g0, axis=1)
    below -= g0                                                   # negative weight under each group
    below *= 2
    below += g0
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (g1 * below).sum(axis=1) / (2.0 * p * n)
        r1 = g1[:, ::-1]                                          # thresholds from the highest score
        tp = np.cumsum(r1, axis=1)
        seen = tp + np.cumsum(g0[:, ::-1], axis=1)
        aupr = (r1 * (tp / np.maximum(seen, np.finfo(np.float64).tiny))).sum(axis=1) / p
    return auroc, aupr


def weighted_auroc_aupr(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision (AUPR, positives = ``y``) of score ``s`` under each row of
    weights ``w`` ``[B, n]`` (scikit-learn's with ``sample_weight``). Two arrays of length B."""
    order, group = _tie_groups(s)
    yy = np.asarray(y, bool)[order]
    ww = np.atleast_2d(w)[:, order].astype(np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    return _from_groups(np.add.reduceat(np.where(yy, ww, 0.0), starts, axis=1),
                        np.add.reduceat(np.where(yy, 0.0, ww), starts, axis=1))


def _bootstrap_many(y: np.ndarray, scores: list[np.ndarray], B: int, rng: np.random.Generator
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """AUROC and AUPR of ``B`` stratified resamples of the rows, for each score (the same resamples
    for all: paired intervals, and one set of draws): each resample's draws are counted straight
    into each score's tie groups (no per-row weight matrix)."""
    y = np.asarray(y, bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    groups = []
    for s in scores:
        order, group = _tie_groups(s)
        gy = np.empty(len(s), np.int64)
        gy[order] = group                                         # tie group of each row
        groups.append((gy, int(group[-1]) + 1 if len(group) else 0))
    out: list[tuple[list, list]] = [([], []) for _ in scores]
    step = max(1, _CHUNK_CELLS // max(len(y), 1))
    for b0 in range(0, B, step):
        b = min(step, B - b0)
        drawn = [idx[rng.integers(0, len(idx), size=(b, len(idx)))] for idx in (pos, neg)]
        for (gy, G), (a_all, p_all) in zip(groups, out):
            base = (np.arange(b) * G)[:, None]
            g1, g0 = (np.bincount((base + gy[d]).ravel(), minlength=b * G).reshape(b, G) for d in drawn)
            a, p = _from_groups(g1, g0)
            a_all.append(a)
            p_all.append(p)
    return [(np.concatenate(a), np.concatenate(p)) for a, p in out]


def _bootstrap(y: np.ndarray, s: np.ndarray, B: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPR of ``B`` stratified resamples of one score."""
    return _bootstrap_many(y, [s], B, rng)[0]


def _ci(v: np.ndarray) -> list[float] | None:
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    a = (1 - LEVEL) / 2
    return [float(x) for x in np.quantile(v, [a, 1 - a])]


def league_table(positive: np.ndarray, scores: Scores, B: int, rng_for,
                 known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One league table: every score's AUROC and AUPR for the rows ``positive`` (boolean) against
    the others, best AUROC first (None last). Rows where a score is not finite are left out of that
    score's row (counted). ``rng_for(None)``: the generator of the resamples shared by the scores
    finite everywhere, ``rng_for(name)`` that of a score with rows left out. ``known``: name ->
    ``{"auroc", "aupr_out"}`` already computed with scikit-learn on the same rows (the OoD table's)."""
    positive = np.asarray(positive, bool)
    n = len(positive)
    resamples = int(min(B, MAX_BOOTSTRAP_CELLS // max(n, 1))) if B > 0 else 0
    rows, shared = [], []
    for name, (values, desc) in scores.items():
        v = np.asarray(values, np.float64)
        ok = np.isfinite(v)
        y, s = positive[ok], v[ok]
        row: dict[str, Any] = {"signal": name, "orientation": desc, "n_positive": int(y.sum()),
                               "n_negative": int((~y).sum()), "n_dropped_non_finite": int((~ok).sum()),
                               "auroc": None, "auroc_ci": None, "aupr": None, "aupr_ci": None,
                               "aupr_base_rate": float(y.mean()) if len(y) else None}
        if y.any() and (~y).any():
            pre = (known or {}).get(name) or {}
            row["auroc"] = pre["auroc"] if pre.get("auroc") is not None else float(roc_auc_score(y, s))
            row["aupr"] = pre["aupr_out"] if pre.get("aupr_out") is not None else float(average_precision_score(y, s))
            if resamples and ok.all():
                shared.append((row, v))
            elif resamples:
                a, p = _bootstrap(y, s, resamples, rng_for(name))
                row["auroc_ci"], row["aupr_ci"] = _ci(a), _ci(p)
        rows.append(row)
    if shared:
        for (row, _), (a, p) in zip(shared, _bootstrap_many(positive, [v for _, v in shared], resamples,
                                                            rng_for(None))):
            row["auroc_ci"], row["aupr_ci"] = _ci(a), _ci(p)
    rows.sort(key=lambda r: (r["auroc"] is None, -(r["auroc"] or 0.0), r["signal"]))
    for i, r in enumerate(rows):
        r["place"] = i + 1
    return {"n": n, "n_positive": int(positive.sum()), "resamples": resamples, "table": rows}


def _rng(ctx: ReportContext, *parts: str):
    return lambda name: np.random.default_rng(stable_seed(ctx.seed, "league", *parts, *([name] if name else [])))


def league_section(ctx: ReportContext, ood_rows: Any = None, ood_sec: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """League tables of every flag column (per split with flagged rows) and of the OoD rows
    (all groups pooled and each group). ``ood_rows``: ``(rows, is_in, groups, group_names)`` of
    the OoD evaluation, or None; ``ood_sec``: its OoD section, whose per-group AUROC and AUPR-Out
    (scikit-learn, the same rows) the group tables reuse."""
    frame, B = ctx.frame, ctx.bootstrap
    sec: dict[str, Any] = {"flags": {}, "ood": None, "orientation": {}}
    for col in ctx.settings.flag_columns:
        for s in ctx.splits:
            rows = ctx.idx[s]
            f = frame.flags[col][rows]
            known = ~np.isnan(f)
            if not (f[known] == 1).any():
                continue
            rows = rows[known]
            scores = usable({**vog_scores(ctx, rows), **signal_scores(ctx, rows)}, f[known] == 1)
            sec["orientation"].update(describe(scores))
            sec["flags"].setdefault(col, {})[s] = league_table(f[known] == 1, scores, B, _rng(ctx, col, s))
    if ood_rows is not None:
        rows, is_in, groups, group_names = ood_rows
        scores = usable({**vog_scores(ctx, rows, ood_reference=ctx.ood_spec.in_distribution),
                         **signal_scores(ctx, rows)}, ~is_in)
        sec["orientation"].update(describe(scores))
        pooled = league_table(~is_in, scores, B, _rng(ctx, "ood", "all"))
        per_group = {}
        for g in group_names:
            sel = is_in | (groups == g)
            sub = {name: (v[sel], d) for name, (v, d) in scores.items()}
            per_group[g] = league_table(~is_in[sel], sub, B, _rng(ctx, "ood", str(g)),
                                        known=((ood_sec or {}).get("groups") or {}).get(g))
        sec["ood"] = {"all": pooled, "groups": per_group}
    return sec
