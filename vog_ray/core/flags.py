"""Flags people act on: the boolean ``flagged`` column of the score table, computed per block from
the ranked rows and the ``flags`` rules of each split (the top share of the split, a score
threshold, label ≠ prediction), and the flags' precision and recall against a ground-truth
column. Imports neither torch nor Ray (the publish step runs it in Ray workers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["FLAGGED", "FlagRule", "flag_mask", "flag_block", "flagged_rows", "precision_recall"]

FLAGGED = "flagged"


@dataclass(frozen=True)
class FlagRule:
    """One split's rule: every criterion given must hold (an empty rule flags nothing).

    ``top_percent``: rank ≤ top_percent % of the split's scored rows (rank 1 = highest score);
    ``z_above``: the ranked ``score`` (z of ``rank_by``) above this; ``label_mismatch``: a known
    label that differs from the last checkpoint's prediction.
    """

    top_percent: float | None = None
    z_above: float | None = None
    label_mismatch: bool = False

    @property
    def empty(self) -> bool:
        return self.top_percent is None and self.z_above is None and not self.label_mismatch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rule(r: FlagRule | Mapping[str, Any]) -> FlagRule:
    return r if isinstance(r, FlagRule) else FlagRule(**dict(r))


def flag_mask(rule: FlagRule, rank: np.ndarray, score: np.ndarray, label: np.ndarray, pred: np.ndarray,
              n_split: int) -> np.ndarray:
    """The rows of one split that ``rule`` flags (``n_split``: the split's scored rows)."""
    keep = np.full(len(rank), not rule.empty, dtype=bool)
    if rule.top_percent is not None:
        # rank * 100 <= p * n: exact for the integer products of whole percentages
        keep &= np.asarray(rank, np.float64) * 100.0 <= float(rule.top_percent) * n_split
    if rule.z_above is not None:
        s = np.asarray(score, np.float64)
        keep &= np.isfinite(s) & (s > float(rule.z_above))
    if rule.label_mismatch:
        keep &= (label >= 0) & (label != pred)
    return keep


def flag_block(t: pa.Table, rules: Mapping[str, FlagRule | Mapping[str, Any]],
               sizes: Mapping[str, int]) -> pa.Table:
    """A block of ranked rows with the boolean ``flagged`` column appended (``rules``: split ->
    rule; a split without a rule flags nothing; ``sizes``: split -> scored rows)."""
    n = t.num_rows
    out = np.zeros(n, dtype=bool)
    if n:
        split = t.column("split").to_numpy(zero_copy_only=False).astype(str)
        rank = t.column("rank").to_numpy(zero_copy_only=False)
        score = t.column("score").to_numpy(zero_copy_only=False)
        label = pc.fill_null(t.column("label"), -1).to_numpy(zero_copy_only=False)
        pred = pc.fill_null(t.column("pred"), -1).to_numpy(zero_copy_only=False)
        for s in np.unique(split):
            if s not in rules:
                continue
            rows = split == s
            out[rows] = flag_mask(_rule(rules[s]), rank[rows], score[rows], label[rows], pred[rows],
                                  int(sizes[s]))
    arr = pa.array(out, pa.bool_())
    i = t.schema.get_field_index(FLAGGED)
    return t.set_column(i, FLAGGED, arr) if i >= 0 else t.append_column(FLAGGED, arr)


def flagged_rows(t: pa.Table, rules: Mapping[str, FlagRule | Mapping[str, Any]],
                 sizes: Mapping[str, int]) -> pa.Table:
    """Only the flagged rows of a block (with the ``flagged`` column)."""
    t = flag_block(t, rules, sizes)
    return t.filter(t.column(FLAGGED))


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Precision and recall of ``flagged`` against a boolean ``truth`` (NaN / None = unknown: left
    out). ``None`` where undefined (nothing flagged, no true positive in the truth)."""
    f = np.asarray(flagged, dtype=bool)
    tv = np.asarray(truth, dtype=object)
    known = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in tv], dtype=bool)
    f, t = f[known], tv[known].astype(bool)
    tp = int((f & t).sum())
    n_flagged, n_true = int(f.sum()), int(t.sum())
    return {"n": int(known.sum()), "n_flagged": n_flagged, "n_true": n_true, "true_positives": tp,
            "precision": tp / n_flagged if n_flagged else None,
            "recall": tp / n_true if n_true else None,
            "base_rate": n_true / int(known.sum()) if known.any() else None}
