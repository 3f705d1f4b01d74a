"""Out-of-distribution evaluation in the layout of the paper's Table 1: the metrics of one score
(:func:`ood_metrics`, :func:`fpr_at_tpr`), the orientation of every score (:data:`ORIENTATION`)
and the evaluation of many scores per OoD group with mean ± std (:func:`evaluate`).

Conventions (also written into ``report.json``):

* OoD is the **positive** class for AUROC, AUPR-Out and FPR@95%TPR.
* Every score is oriented so that **higher = more OoD** before any metric is computed
  (:data:`ORIENTATION`). Raw VoG and z are used as they are (the paper: OoD examples have
  higher VoG). Max-softmax and max-logit are negated (confident = in-distribution). The stored
  ``energy`` signal is ``E(x) = −logsumexp(logits)`` (Liu et al., 2020, T = 1); in-distribution
  inputs have a larger logsumexp, i.e. a *lower* energy, so the stored energy is used as is.
* AUPR-In: in-distribution is the positive class and the (oriented) score is negated.
* AUPR-Out (paper): OoD positive with the score multiplied by −1 — the convention the VoG paper
  uses for VoG (Sec. 4.2), shown beside the report's own AUPR-Out so a reader can compare with
  the paper's Table 1.
* FPR@95%TPR: the share of in-distribution examples flagged at the highest threshold that still
  flags at least 95% of the OoD examples (``score >= threshold`` = flagged as OoD).
* Per-checkpoint baselines use the value of the **last** checkpoint.
* "mean ± std" is over OoD groups, with the sample std (ddof = 1; none for one group).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["ORIENTATION", "METRICS", "ood_metrics", "fpr_at_tpr", "summarize_groups"]

METRICS = ("auroc", "aupr_in", "aupr_out", "aupr_out_paper", "fpr_at_95_tpr")

# baseline name -> (reduced signal in the Frame, sign, description)
ORIENTATION: dict[str, tuple[str, float, str]] = {
    "max_softmax": ("last_max_prob", -1.0, "maximum softmax probability (MSP), negated"),
    "max_logit": ("last_max_logit", -1.0, "maximum logit, negated"),
    "energy": ("last_energy", +1.0, "energy as stored, −logsumexp(logits): higher = more OoD"),
    "loss": ("last_loss", +1.0, "loss at the target index (predicted labels: −log max-softmax)"),
    "label_prob": ("last_label_prob", -1.0, "probability at the target index, negated"),
    "label_logit": ("last_label_logit", -1.0, "logit at the target index, negated"),
    "margin": ("last_margin", -1.0, "margin (target logit − largest other logit), negated"),
}


def fpr_at_tpr(y_ood: np.ndarray, score: np.ndarray, tpr: float = 0.95) -> float:
    """FPR at the first ROC point (highest threshold) whose TPR reaches ``tpr``."""
    fpr_, tpr_, _ = roc_curve(y_ood, score, drop_intermediate=False)
    i = int(np.argmax(tpr_ >= tpr - 1e-12))
    return float(fpr_[i])


def ood_metrics(score_in: np.ndarray, score_ood: np.ndarray) -> dict[str, Any]:
    """AUROC, AUPR-In, AUPR-Out (and with the score × −1, the paper's convention), FPR@95%TPR
    for an oriented score (higher = more OoD).

    Non-finite scores are left out (their count is returned)."""
    si = np.asarray(score_in, np.float64)
    so = np.asarray(score_ood, np.float64)
    fi, fo = np.isfinite(si), np.isfinite(so)
    si, so = si[fi], so[fo]
    out: dict[str, Any] = {"n_in": int(len(si)), "n_ood": int(len(so)),
                           "n_dropped_non_finite": int((~fi).sum() + (~fo).sum())}
    if len(si) == 0 or len(so) == 0:
        out.update({m: None for m in METRICS})
        return out
    y = np.r_[np.zeros(len(si)), np.ones(len(so))]
    s = np.r_[si, so]
    out["auroc"] = float(roc_auc_score(y, s))
    out["aupr_in"] = float(average_precision_score(1 - y, -s))
    out["aupr_out"] = float(average_precision_score(y, s))
    out["aupr_out_paper"] = float(average_precision_score(y, -s))
    out["fpr_at_95_tpr"] = fpr_at_tpr(y, s, 0.95)
    return out


def summarize_groups(per_group: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (ddof = 1) of each metric across groups."""
    out: dict[str, Any] = {"n_groups": len(per_group)}
    for m in METRICS:
        v = np.array([g[m] for g in per_group.values() if g.get(m) is not None], np.float64)
        out[m] = {"mean": float(v.mean()) if len(v) else None,
                  "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}
    return out


def evaluate(scores: dict[str, np.ndarray], is_in: np.ndarray, groups: np.ndarray,
             group_names: Sequence[str]) -> dict[str, Any]:
    """``scores``: name → oriented score per row (rows = in-distribution ∪ OoD rows).

    ``is_in``: boolean per row; ``groups``: the OoD group name per row (ignored for ID rows).
    Returns ``{"groups": {name: {score: metrics}}, "summary": {score: {metric: {mean, std}}}}``.
    """
    res: dict[str, Any] = {"groups": {}, "summary": {}}
    for g in group_names:
        sel = (~is_in) & (groups == g)
        res["groups"][g] = {name: ood_metrics(s[is_in], s[sel]) for name, s in scores.items()}
    for name in scores:
        res["summary"][name] = summarize_groups({g: res["groups"][g][name] for g in group_names})
    return res
