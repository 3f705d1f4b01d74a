"""Every score a report compares, as arrays oriented so that **higher = more likely flagged / OoD**,
each with its orientation in words: VoG per key (raw, z as the run stored it, and for OoD |z| and
z against another split, recomputed from ``classes.parquet``) and the other difficulty signals of
the frame (loss, AUM, data-map confidence and variability, forgetting, EL2N, entropy, max-softmax,
max-logit, energy, …). The OoD table and the signal league tables read them from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.classes import class_lookup
from ..core.ranking import z_values
from .context import ReportContext
from .ood import ORIENTATION

__all__ = ["SIGNAL_ORIENTATION", "signal_scores", "vog_scores", "split_z", "describe", "usable", "Scores"]

Scores = dict[str, tuple[np.ndarray, str]]   # name -> (oriented values, orientation in words)

# league name -> (reduced signal of the Frame, sign, orientation); the last-checkpoint baselines
# of the OoD table (ood.ORIENTATION) come first, then the signals over all checkpoints
SIGNAL_ORIENTATION: dict[str, tuple[str, float, str]] = {
    **{name: (sig, sign, desc + " (last checkpoint)") for name, (sig, sign, desc) in ORIENTATION.items()},
    "loss_mean": ("mean_loss", +1.0, "mean loss at the target index over all checkpoints, as is"),
    "aum": ("mean_margin", -1.0, "AUM: mean margin (target logit − largest other logit) over all "
                                 "checkpoints (Pleiss et al., 2020), negated: a low margin marks a mislabeled example"),
    "confidence": ("confidence", -1.0, "data-map confidence (mean probability at the target), negated"),
    "variability": ("variability", +1.0, "data-map variability (std of the probability at the target), as is"),
    "forgetting": ("forgetting", +1.0, "forgetting events (correct → wrong between checkpoints), as is"),
    "el2n": ("last_el2n", +1.0, "EL2N = ‖softmax − one-hot target‖₂ (Paul et al., 2021), as is (last checkpoint)"),
    "entropy": ("last_entropy", +1.0, "predictive entropy, as is (last checkpoint)"),
    "entropy_mean": ("mean_entropy", +1.0, "predictive entropy averaged over all checkpoints, as is"),
}


def signal_scores(ctx: ReportContext, rows: np.ndarray) -> Scores:
    """The difficulty signals other than VoG at ``rows`` (those the run has), oriented."""
    sig = ctx.frame.sig
    out: Scores = {}
    for name, (col, sign, desc) in SIGNAL_ORIENTATION.items():
        if col in sig:
            out[name] = (sign * sig[col][rows].astype(np.float64), desc)
    for w in ctx.windows:   # EL2N as Paul et al. score it: averaged over a window of checkpoints
        if f"el2n_{w}" in sig:
            out[f"el2n_{w}"] = (sig[f"el2n_{w}"][rows].astype(np.float64),
                                f"EL2N averaged over the checkpoints of window {w!r}, as is")
    return out


def split_z(ctx: ReportContext, rows: np.ndarray, key: str, split: str | None) -> np.ndarray:
    """z of ``key`` at ``rows`` recomputed from ``classes.parquet``: against the class moments of
    ``split`` (NaN for a class it lacks), or each row's own split (``split=None``) — the z the run
    stores without / with ``vog.normalize_against: split``."""
    frame, method = ctx.frame, ctx.manifest.get("normalization") or "zscore"
    lookup = class_lookup(ctx.classes, ctx.keys)
    out = np.full(len(rows), np.nan)
    codes = frame.split[rows]
    for code in np.unique(codes):
        sel = codes == code
        against = frame.split_names[code] if split is None else split
        if against not in lookup:
            continue
        out[sel] = z_values(frame.vog[key][rows][sel], frame.target[rows][sel], lookup[against], key,
                            method, referenced=split is not None)
    return out


def _stored_z(ctx: ReportContext) -> str:
    ref = ctx.normalize_against
    return (f"against the class moments of split {ref!r} (vog.normalize_against)" if ref
            else "per class within each split")


def vog_scores(ctx: ReportContext, rows: np.ndarray, *, ood_reference: str | None = None) -> Scores:
    """VoG of every key at ``rows``: raw and z as stored; with ``ood_reference`` (the
    in-distribution split) also |z| and the other normalisation (against that split when the run
    normalised per split, per split when it normalised against a reference)."""
    frame = ctx.frame
    out: Scores = {}
    have_classes = ctx.classes is not None and ctx.classes.num_rows > 0
    for k in ctx.keys:
        out[f"vog_{k}"] = (frame.vog[k][rows], f"raw VoG ({k}), as is")
        z = frame.z[k][rows]
        out[f"z_{k}"] = (z, f"z-VoG ({k}) as stored: {_stored_z(ctx)}, as is")
        if ood_reference is None:
            continue
        out[f"abs_z_{k}"] = (np.abs(z), f"|z-VoG| ({k}) as stored, two-sided: {_stored_z(ctx)}")
        if not have_classes:
            continue
        if ctx.normalize_against:
            out[f"z_own_{k}"] = (split_z(ctx, rows, k, None),
                                 f"z-VoG ({k}) per class within each split (classes.parquet), as is")
        elif ood_reference:
            zr = split_z(ctx, rows, k, ood_reference)
            desc = f"z-VoG ({k}) against the class moments of split {ood_reference!r} (classes.parquet)"
            out[f"z_vs_{ood_reference}_{k}"] = (zr, desc + ", as is")
            out[f"abs_z_vs_{ood_reference}_{k}"] = (np.abs(zr), desc + ", two-sided |z|")
    return out


def describe(scores: Scores) -> dict[str, Any]:
    """``name -> orientation`` for report.json."""
    return {name: desc for name, (_, desc) in scores.items()}


def usable(scores: Scores, positive: np.ndarray) -> Scores:
    """The scores with a finite value among both the positive and the other rows (e.g. forgetting
    events need labels: an unlabelled OoD split has none)."""
    positive = np.asarray(positive, bool)
    out: Scores = {}
    for name, (v, desc) in scores.items():
        ok = np.isfinite(v)
        if (ok & positive).any() and (ok & ~positive).any():
            out[name] = (v, desc)
    return out
