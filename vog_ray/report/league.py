"""The signal league tables: which difficulty signal finds the flagged rows of each flag column,
and the OoD rows of each OoD group, best — AUROC and AUPR (scikit-learn; the flagged / OoD rows
are the positive class, every score oriented higher = more likely positive), best first, with
bootstrap intervals.

Intervals: stratified percentile bootstrap (positives and negatives each resampled with
replacement to their own count). A resample is a vector of multiplicities, so its AUROC and AUPR
are the weighted ones, computed for all resamples at once on the scores sorted once
(:func:`weighted_auroc_aupr`; equal to scikit-learn's with ``sample_weight``, tested).
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
    scores): a tie counts half (AUROC) and is one threshold (AUPR), as in scikit-learn."""
    p, n = g1.sum(axis=1), g0.sum(axis=1)
    below = np.cumsum(g0, axis=1) - g0                            # negative weight under each group
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (g1 * (below + 0.5 * g0)).sum(axis=1) / (p * n)
        tp = np.cumsum(g1[:, ::-1], axis=1)                       # thresholds from the highest score
        fp = np.cumsum(g0[:, ::-1], axis=1)
        prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        aupr = (g1[:, ::-1] * prec).sum(axis=1) / p
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


def _bootstrap(y: np.ndarray, s: np.ndarray, B: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and AUPR of ``B`` stratified resamples: each resample's draws are counted straight
    into tie groups (no per-row weight matrix)."""
    order, group = _tie_groups(s)
    G = int(group[-1]) + 1 if len(group) else 0
    gy = np.empty(len(s), np.int64)
    gy[order] = group                                             # tie group of each row
    y = np.asarray(y, bool)
    a_all, p_all = [], []
    step = max(1, _CHUNK_CELLS // max(len(s), 1))
    for b0 in range(0, B, step):
        b = min(step, B - b0)
        base = (np.arange(b) * G)[:, None]
        out = []
        for members in (gy[y], gy[~y]):
            draws = members[rng.integers(0, len(members), size=(b, len(members)))]
            out.append(np.bincount((base + draws).ravel(), minlength=b * G).reshape(b, G).astype(np.float64))
        a, p = _from_groups(*out)
        a_all.append(a)
        p_all.append(p)
    return np.concatenate(a_all), np.concatenate(p_all)


def _ci(v: np.ndarray) -> list[float] | None:
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    a = (1 - LEVEL) / 2
    return [float(x) for x in np.quantile(v, [a, 1 - a])]


def league_table(positive: np.ndarray, scores: Scores, B: int, rng_for) -> dict[str, Any]:
    """One league table: every score's AUROC and AUPR for the rows ``positive`` (boolean) against
    the others, best AUROC first (None last). ``rng_for(name)``: the generator of that score's
    resamples. Rows where a score is not finite are left out of that score's row (counted)."""
    positive = np.asarray(positive, bool)
    n = len(positive)
    resamples = int(min(B, MAX_BOOTSTRAP_CELLS // max(n, 1))) if B > 0 else 0
    rows = []
    for name, (values, desc) in scores.items():
        v = np.asarray(values, np.float64)
        ok = np.isfinite(v)
        y, s = positive[ok], v[ok]
        row: dict[str, Any] = {"signal": name, "orientation": desc, "n_positive": int(y.sum()),
                               "n_negative": int((~y).sum()), "n_dropped_non_finite": int((~ok).sum()),
                               "auroc": None, "auroc_ci": None, "aupr": None, "aupr_ci": None,
                               "aupr_base_rate": float(y.mean()) if len(y) else None}
        if y.any() and (~y).any():
            row["auroc"] = float(roc_auc_score(y, s))
            row["aupr"] = float(average_precision_score(y, s))
            if resamples:
                a, p = _bootstrap(y, s, resamples, rng_for(name))
                row["auroc_ci"], row["aupr_ci"] = _ci(a), _ci(p)
        rows.append(row)
    rows.sort(key=lambda r: (r["auroc"] is None, -(r["auroc"] or 0.0), r["signal"]))
    for i, r in enumerate(rows):
        r["place"] = i + 1
    return {"n": n, "n_positive": int(positive.sum()), "resamples": resamples, "table": rows}


def _rng(ctx: ReportContext, *parts: str):
    return lambda name: np.random.default_rng(stable_seed(ctx.seed, "league", *parts, name))


def league_section(ctx: ReportContext, ood_rows: Any = None) -> dict[str, Any]:
    """League tables of every flag column (per split with flagged rows) and of the OoD rows
    (all groups pooled and each group). ``ood_rows``: ``(rows, is_in, groups, group_names)`` of
    the OoD evaluation, or None."""
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
            per_group[g] = league_table(~is_in[sel], sub, B, _rng(ctx, "ood", str(g)))
        sec["ood"] = {"all": pooled, "groups": per_group}
    return sec
