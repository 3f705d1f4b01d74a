"""Audit reports for published runs: statistics, OoD evaluation, figures, HTML, run comparison.

::

    from vog_ray.report import build_report, compare_runs
    rep = build_report("s3://bucket/audits/runs/<run_id>")   # report.json, figures/*.png, report.html
    rep["html_url"]                                           # where the page went
    cmp = compare_runs(run_a_url, run_b_url, out="compare.json"); print(cmp["text"])

Modules: :mod:`.build` (``build_report``: orchestration, conventions, writing the files),
:mod:`.context` (checking the run and settings; the :class:`~.context.ReportContext` every
section reads), :mod:`.sections` (error by VoG, flags, OoD, agreement, figures, classes,
summary), :mod:`.grids` (image grids), :mod:`.frame` (streaming read of the needed columns),
:mod:`.stats` (error by VoG, flag tests, agreement), :mod:`.ood` (Table-1 metrics and score
orientation), :mod:`.figures` (matplotlib Agg / Pillow), :mod:`.html` (the self-contained page),
:mod:`.summary` (plain-text summary), :mod:`.findings` (the findings the report opens with),
:mod:`.league` (signal league tables), :mod:`.scores` (every compared score, oriented),
:mod:`.compare` (``compare_runs``), :mod:`.common` (shared helpers). Bad input raises :class:`ReportError` before anything is written.
"""

from .common import ReportError
from .build import CONVENTIONS, build_report
from .compare import compare_runs, format_comparison
from .ood import ORIENTATION, fpr_at_tpr, ood_metrics
from .findings import findings, findings_lines
from .summary import league_lines, summary_lines

__all__ = ["build_report", "compare_runs", "format_comparison", "ReportError", "CONVENTIONS",
           "ood_metrics", "fpr_at_tpr", "ORIENTATION", "summary_lines", "league_lines", "findings",
           "findings_lines"]
