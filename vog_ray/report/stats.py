"""Statistics of a run: error by VoG (paper Fig. 4/5/10), flagged-vs-rest tests, agreement of
VoG with other difficulty signals. Pure numpy / scipy on arrays; no I/O.

Conventions (also written into ``report.json``):

* Ranks within a split order examples by the key's z (highest first), ties broken by id
  ascending — the rule of the score table, so the primary key's deciles equal its ``decile``
  column. Quantile bin ``b`` of ``q`` (decile: q = 10, percentile: q = 100) is
  ``q - floor(q * (rank - 1) / n)``: bin ``q`` holds the highest VoG.
* Error = 1 − ``correct`` of the last checkpoint; rows with an unknown label are left out.
* Bootstrap: 95% percentile intervals of an error rate from ``B`` resamples of the examples of
  that bin (with replacement). The error rate of a resample of ``n`` binary outcomes with ``k``
  errors is distributed exactly as ``Binomial(n, k / n) / n``, which is how it is drawn.
* Cohen's d = (mean flagged − mean rest) / pooled std (ddof = 1).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats as _st

__all__ = ["rank_order", "quantile_bins", "bootstrap_rate_ci", "error_by_bins", "lowest_fraction_error",
           "error_by_vog", "flag_test", "spearman", "agreement", "LOWEST_FRACTIONS", "AGREEMENT_SIGNALS"]

LOWEST_FRACTIONS = (0.1, 0.2, 0.5)
AGREEMENT_SIGNALS = {
    "mean_loss": "mean loss at the target index across checkpoints",
    "mean_margin": "mean margin (target logit − largest other logit) across checkpoints (AUM-like)",
    "confidence": "data-map confidence: mean probability at the target index across checkpoints",
    "variability": "data-map variability: population std of that probability across checkpoints",
    "forgetting": "forgetting events: correct→incorrect transitions across consecutive checkpoints",
}


def rank_order(z: np.ndarray, ids: pa.Array | Sequence[str]) -> np.ndarray:
    """Positions sorted by ``z`` descending, ties by id ascending; NaN last."""
    t = pa.table({"z": pa.array(np.asarray(z, np.float64)), "id": pa.array(ids, pa.string())
                  if not isinstance(ids, pa.Array) else ids})
    return pc.sort_indices(t, sort_keys=[("z", "descending"), ("id", "ascending")]).to_numpy()


def quantile_bins(rank: np.ndarray, n: int, q: int) -> np.ndarray:
    """Bin (1..q, q = highest score) of each 1-based rank among ``n``."""
    rank = np.asarray(rank, np.int64)
    return (q - np.floor_divide(q * (rank - 1), max(n, 1))).astype(np.int64)


def ranks_from_order(order: np.ndarray) -> np.ndarray:
    r = np.empty(len(order), np.int64)
    r[order] = np.arange(1, len(order) + 1)
    return r


def bootstrap_rate_ci(k: int, n: int, B: int, rng: np.random.Generator,
                      level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the rate ``k / n`` of ``n`` binary outcomes."""
    if n <= 0 or B <= 0:
        return None, None
    draws = rng.binomial(n, k / n, size=B) / n
    a = (1 - level) / 2
    lo, hi = np.quantile(draws, [a, 1 - a])
    return float(lo), float(hi)


def error_by_bins(err: np.ndarray, bins: np.ndarray, q: int, B: int,
                  rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per bin 1..q: rows, labelled rows, errors, error rate and its bootstrap interval."""
    known = ~np.isnan(err)
    n_all = np.bincount(bins, minlength=q + 1)[1:]
    n_lab = np.bincount(bins[known], minlength=q + 1)[1:]
    n_err = np.bincount(bins[known], weights=err[known], minlength=q + 1)[1:]
    out = []
    for b in range(q):
        n, k = int(n_lab[b]), int(round(n_err[b]))
        lo, hi = bootstrap_rate_ci(k, n, B, rng)
        out.append({"bin": b + 1, "n": int(n_all[b]), "n_labelled": n, "errors": k,
                    "error_rate": k / n if n else None, "ci_low": lo, "ci_high": hi})
    return out


def lowest_fraction_error(err: np.ndarray, rank: np.ndarray, fractions: Sequence[float], B: int,
                          rng: np.random.Generator) -> list[dict[str, Any]]:
    """Error of the lowest-VoG ``f`` of the split (the ``round(f·n)`` largest ranks) and of the
    highest-VoG ``f`` beside the split's overall error."""
    n = len(rank)
    known = ~np.isnan(err)
    k_all, n_all = int(np.nansum(err)), int(known.sum())
    overall = k_all / n_all if n_all else None
    out = []
    for f in fractions:
        m = max(1, int(round(f * n)))
        row: dict[str, Any] = {"fraction": f, "n": m}
        for side, sel in (("lowest", rank > n - m), ("highest", rank <= m)):
            kn = known & sel
            nn, kk = int(kn.sum()), int(np.nansum(err[kn]))
            lo, hi = bootstrap_rate_ci(kk, nn, B, rng)
            rate = kk / nn if nn else None
            row[side] = {"n_labelled": nn, "errors": kk, "error_rate": rate, "ci_low": lo, "ci_high": hi,
                         "ratio_to_overall": (rate / overall) if (rate is not None and overall) else None}
        out.append(row)
    return out


def error_by_vog(err: np.ndarray, rank: np.ndarray, B: int, rng: np.random.Generator) -> dict[str, Any]:
    """Error by decile and percentile of VoG for one split, with bootstrap intervals.

    ``rank``: 1-based rank of each row by the key's z (1 = highest; see :func:`rank_order`)."""
    n = len(rank)
    known = ~np.isnan(err)
    k_all, n_all = int(np.nansum(err)), int(known.sum())
    lo, hi = bootstrap_rate_ci(k_all, n_all, B, rng)
    return {
        "overall": {"n": n, "n_labelled": n_all, "errors": k_all,
                    "error_rate": k_all / n_all if n_all else None, "ci_low": lo, "ci_high": hi},
        "deciles": error_by_bins(err, quantile_bins(rank, n, 10), 10, B, rng),
        "percentiles": error_by_bins(err, quantile_bins(rank, n, 100), 100, B, rng),
        "lowest": lowest_fraction_error(err, rank, LOWEST_FRACTIONS, B, rng),
    }


def flag_test(z: np.ndarray, flag: np.ndarray, top: np.ndarray) -> dict[str, Any]:
    """Welch's t-test of z for flagged vs the rest, Cohen's d, AUROC of z for the flag, and the
    share of flagged examples in the top decile (``top``: boolean) against the base rate."""
    known = ~np.isnan(flag) & np.isfinite(z)
    f = known & (flag == 1)
    r = known & (flag == 0)
    zf, zr = z[f], z[r]
    nf, nr = len(zf), len(zr)
    out: dict[str, Any] = {"n_flagged": nf, "n_rest": nr, "n_unknown": int((~known).sum()),
                           "mean_flagged": float(zf.mean()) if nf else None,
                           "mean_rest": float(zr.mean()) if nr else None,
                           "std_flagged": float(zf.std(ddof=1)) if nf > 1 else None,
                           "std_rest": float(zr.std(ddof=1)) if nr > 1 else None,
                           "t": None, "p": None, "df": None, "cohens_d": None, "auroc": None}
    if nf >= 2 and nr >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = _st.ttest_ind(zf, zr, equal_var=False)
        out["t"], out["p"] = float(res.statistic), float(res.pvalue)
        out["df"] = float(getattr(res, "df", np.nan))
        sp = math.sqrt(((nf - 1) * zf.var(ddof=1) + (nr - 1) * zr.var(ddof=1)) / (nf + nr - 2))
        out["cohens_d"] = (float(zf.mean() - zr.mean()) / sp) if sp > 0 else None
    if nf and nr:
        from sklearn.metrics import roc_auc_score
        out["auroc"] = float(roc_auc_score(np.r_[np.ones(nf), np.zeros(nr)], np.r_[zf, zr]))
    tk = top & known
    n_top = int(tk.sum())
    share = float((flag[tk] == 1).mean()) if n_top else None
    base = nf / (nf + nr) if (nf + nr) else None
    out.update({"n_top_decile": n_top, "top_decile_share": share, "base_rate": base,
                "top_decile_lift": (share / base) if (share is not None and base) else None})
    return out


def spearman(x: np.ndarray, y: np.ndarray, rx: np.ndarray | None = None,
             ry: np.ndarray | None = None) -> dict[str, Any]:
    """Spearman's rho (average ranks for ties) and its two-sided p-value (t approximation, as
    ``scipy.stats.spearmanr``). ``rx`` / ``ry``: ranks of all of ``x`` / ``y``, precomputed
    (used only when every value is finite), so a column ranked once serves many pairs."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"rho": None, "p": None, "n": n}
    full = n == len(x)
    rx = rx if (full and rx is not None) else _st.rankdata(x[ok])
    ry = ry if (full and ry is not None) else _st.rankdata(y[ok])
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rho = max(-1.0, min(1.0, rho))
    if abs(rho) >= 1.0:
        p = 0.0
    else:
        t = rho * math.sqrt((n - 2) / ((1.0 - rho) * (1.0 + rho)))
        p = float(2 * _st.t.sf(abs(t), n - 2))
    return {"rho": rho, "p": p, "n": n}


def ranks(x: np.ndarray) -> np.ndarray | None:
    """Average ranks of ``x`` when every value is finite (else None: ranked per pair)."""
    x = np.asarray(x, np.float64)
    return _st.rankdata(x) if np.isfinite(x).all() else None


def agreement(vog: np.ndarray, signals: dict[str, np.ndarray],
              signal_ranks: dict[str, np.ndarray | None] | None = None) -> dict[str, Any]:
    """Spearman of a VoG column with each available agreement signal."""
    rv = ranks(vog)
    signal_ranks = signal_ranks or {}
    return {name: spearman(vog, np.asarray(signals[name], np.float64), rv, signal_ranks.get(name))
            for name in AGREEMENT_SIGNALS if name in signals}
