"""The report's section on the run's flags (the ``flags`` config; the ``flagged`` column): per
split, the rule, how many rows it flagged and, when the config names a ``ground_truth`` column
(``is_noisy`` in the demo), the flags' precision and recall against it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ..core.flags import FLAGGED, precision_recall
from .common import ReportError
from .context import ReportContext

__all__ = ["flag_quality_section", "flag_quality_html"]


def flag_quality_section(ctx: ReportContext) -> dict[str, Any] | None:
    """None for a run without flags; else the rules, counts and (with a ground truth) precision
    and recall of each split where the ground truth has values."""
    flags = ctx.manifest.get("flags")
    if not flags:
        return None
    gt = flags.get("ground_truth")
    cols = ["split", FLAGGED] + ([gt] if gt else [])
    try:
        t = ctx.run.scores(columns=cols)
    except (KeyError, ValueError) as e:
        raise ReportError(f"run {ctx.run.url!r}: cannot read the flags' columns {cols}: {e}") from None
    split = np.asarray(t.column("split").to_pylist(), dtype=object)
    flagged = np.asarray(t.column(FLAGGED).to_pylist(), dtype=bool)
    truth = None
    if gt:
        typ = t.schema.field(gt).type
        if pa.types.is_boolean(typ) or pa.types.is_integer(typ) or pa.types.is_null(typ):
            truth = np.asarray(t.column(gt).to_pylist(), dtype=object)
        else:
            ctx.warnings.append(f"flags.ground_truth {gt!r} is a {typ} column, not a boolean one: "
                                "no precision and recall")
    out: dict[str, Any] = {"ground_truth": gt, "splits": {}}
    for s in ctx.splits:
        rows = split == s
        entry: dict[str, Any] = {"rule": (flags.get("rules") or {}).get(s), "n": int(rows.sum()),
                                 "n_flagged": int(flagged[rows].sum())}
        if truth is not None:
            pr = precision_recall(flagged[rows], truth[rows])
            if pr["n"]:
                entry["against_ground_truth"] = pr
        out["splits"][s] = entry
    return out


def _rule_text(rule: dict[str, Any] | None) -> str:
    if not rule:
        return "—"
    parts = []
    if rule.get("top_percent") is not None:
        parts.append(f"top {rule['top_percent']:g}%")
    if rule.get("z_above") is not None:
        parts.append(f"z > {rule['z_above']:g}")
    if rule.get("label_mismatch"):
        parts.append("label ≠ prediction")
    return " and ".join(parts) or "nothing"


def flag_quality_html(sec: dict[str, Any] | None) -> str:
    """The section as HTML (every string escaped)."""
    from .html import esc, fmt, table

    if not sec:
        return '<p class="note">No flags configured (the <code>flags</code> section of the audit config).</p>'
    gt = sec.get("ground_truth")
    rows = []
    for s, e in sec["splits"].items():
        pr = e.get("against_ground_truth") or {}
        rows.append([esc(s), esc(_rule_text(e["rule"])), fmt(e["n"]), fmt(e["n_flagged"]),
                     fmt(pr.get("n_true")), fmt(pr.get("true_positives")), fmt(pr.get("precision")),
                     fmt(pr.get("recall")), fmt(pr.get("base_rate"))])
    note = (f"Precision = share of the flagged rows whose <code>{esc(gt)}</code> is true; recall = share of "
            f"the rows whose <code>{esc(gt)}</code> is true that are flagged; base rate = the precision of "
            "flagging at random." if gt else "No ground_truth column given (flags.ground_truth).")
    return (f"<p class='note'>The <code>flagged</code> column of the score table and "
            f"<code>flagged.parquet</code>. {note}</p>"
            + table(["split", "rule", "rows", "flagged", f"{gt or 'truth'} true", "true positives", "precision",
                     "recall", "base rate"], rows, left=2))
