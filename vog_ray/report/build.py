"""``build_report``: the report of one published run, and where it goes.

Owns the orchestration (:func:`build_report` over the sections of :mod:`.sections`,
:mod:`.league` and :mod:`.grids`, then the findings of :mod:`.findings` generated from the
result), the conventions written into ``report.json``, :func:`open_published` and the
writing step: ``figures/*.png``, ``report.json`` and last ``report.html``, each under a
temporary name and moved into place. Any problem with the input (no published run, a missing
flag column or OoD split, one class) raises :class:`ReportError` before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from itertools import chain
from typing import Any

from ..runs import Run, RunNotFound, open_run
from ..storage import StorageOptions, join, resolve
from . import html as H
from .common import ReportError, atomic_write, clean, remove_stale
from .context import load_context
from .findings import findings
from .flagged import flag_quality_section
from .grids import grid_section, heatmap_section
from .league import league_section
from .sections import agreement_section, class_section, class_summary_section, classes_to_show_warning, \
    error_section, figure_section, flag_section, flip_section, label_mode_warning, ood_rows, ood_section, \
    reference_warning, summary_section
from .stats import AGREEMENT_SIGNALS

__all__ = ["build_report", "CONVENTIONS", "open_published", "write_report_files"]

FORMAT = "vog-ray-report/1"

CONVENTIONS = {
    "vog_score": "z = class-normalised VoG of each key (window_target) as stored in the score table; "
                 "raw VoG = vog_<key>",
    "ranks": "within a split, examples are ordered by the key's z, highest first, ties broken by id "
             "ascending (the score table's rule); decile 10 / percentile bin 100 = highest VoG",
    "quantile_bins": "bin of rank r among n for q bins: q - floor(q (r - 1) / n)",
    "error": "error = 1 - correct of the last checkpoint; rows with an unknown label are left out",
    "bootstrap": "95% percentile intervals from report.bootstrap resamples (with replacement) of the "
                 "examples of each bin; a resampled error rate of n outcomes with k errors is drawn "
                 "as Binomial(n, k/n)/n, which is the same distribution; seeded by report.seed and "
                 "the names of split, key and section",
    "lowest_fraction": "lowest-VoG f = the round(f n) examples with the lowest z in the split",
    "flags": "Welch's t-test (scipy.stats.ttest_ind, equal_var=False) of z, flagged vs rest; "
             "Cohen's d = (mean flagged - mean rest) / pooled std (ddof=1); AUROC of z for the flag; "
             "top-decile share = share of flagged among the top z-decile, base rate = share overall",
    "ood_positive": "OoD is the positive class for AUROC, AUPR-Out and FPR@95%TPR; AUPR-In takes "
                    "in-distribution as positive and the negated score",
    "ood_orientation": "every score is oriented so that higher = more OoD: raw VoG and z as they are; "
                       "max-softmax, max-logit, probability/logit/margin at the target index negated; "
                       "energy as stored (E = -logsumexp(logits), which is lower for in-distribution "
                       "inputs) as is; loss as is",
    "ood_fpr95": "FPR@95%TPR = share of in-distribution examples with score >= the highest threshold "
                 "that flags at least 95% of the OoD examples",
    "ood_baselines": "per-checkpoint baselines use the value of the last checkpoint",
    "ood_groups": "one row per OoD group (the value of report.ood.group_column, else the split's "
                  "data.splits.<name>.group, else the split name); mean ± sample std (ddof=1) "
                  "across groups",
    "agreement": "Spearman rho of z (and of raw VoG, rho_raw) with: " + "; ".join(
        f"{k} = {v}" for k, v in AGREEMENT_SIGNALS.items()),
    "signals": "per-checkpoint signals are computed at the target index (the true label, or the "
               "last checkpoint's prediction with label_mode 'predicted')",
    "normalize_against": "with vog.normalize_against, every split's z uses the class moments of that split; "
                         "a row of a class it lacks has no z and no rank and is not in the report; the OoD "
                         "table recomputes the other normalisation from classes.parquet (z_own_*: per split; "
                         "z_vs_<split>_*: against the in-distribution split)",
    "league": "signal league tables: AUROC and AUPR (average precision) of every score for finding the "
              "flagged rows of a flag column (per split) or the OoD rows (pooled and per group), positives = "
              "flagged / OoD, every score oriented higher = more likely positive (signals.orientation), best "
              "AUROC first; 95% intervals from a stratified bootstrap (report.bootstrap resamples, fewer for "
              "very large tables: signals.*.resamples)",
    "findings": "findings are generated from this report.json; 'reproduces' compares with the VoG paper's "
                "direction: late windows (holding the last checkpoint) higher VoG for flagged rows and more "
                "errors in the top decile, early windows (from the first checkpoint) the opposite, OoD higher "
                "VoG; p < 0.05 separates; error deciles are separated when their 95% intervals do not overlap",
    "flip": "windows in checkpoint order (mean checkpoint index): mean z of flagged vs unflagged rows and the "
            "error of the top and bottom z-decile per window",
    "class_summary": "per split and target class: examples, error, mean z and mean raw VoG of the ranked key, "
                     "and the share of the class's examples in the split's top z-decile",
}


def open_published(run: str | Run, storage: StorageOptions | None = None) -> Run:
    if isinstance(run, Run):
        return run
    try:
        r = open_run(run, storage)
    except RunNotFound as e:
        raise ReportError(str(e)) from None
    need = ("keys", "primary", "windows", "targets")
    miss = [k for k in need if k not in r.manifest]
    if miss:
        raise ReportError(f"manifest of run {r.url!r} lacks {miss}")
    return r


def build_report(run_url: str | Run, storage: StorageOptions | None = None, out: str | None = None,
                 *, spec: Any = None, data_storage: StorageOptions | None = None) -> dict[str, Any]:
    """Build ``report.json``, ``figures/*.png`` and ``report.html`` for a published run.

    ``run_url``: a run directory or an output URL (its ``LATEST`` run), any fsspec URL.
    ``out``: where to write (default: the run directory). ``spec``: a ``ReportSpec`` (or dict)
    overriding ``config.report`` of the run. ``data_storage``: storage options for reading
    image tiles from the source data (default: ``storage``, else the run config's storage).
    Returns the report (as written to ``report.json``) with ``files`` added.
    """
    t0 = time.perf_counter()
    run = open_published(run_url, storage)
    ctx = load_context(run, spec)
    # the sections in this order: it is the order of the warnings they add
    reference_warning(ctx)
    err_sec = error_section(ctx)
    flag_sec = flag_section(ctx)
    where = ood_rows(ctx)
    ood_sec = ood_section(ctx, where)
    agr_sec = agreement_section(ctx)
    error_figs, other_figs, hist_sec = figure_section(ctx, err_sec)
    flip_sec, flip_figs = flip_section(ctx, flag_sec, err_sec)
    league_sec = league_section(ctx, where, ood_sec)
    classes_to_show_warning(ctx)
    grids, grid_sec, grid_figs = grid_section(ctx, storage, data_storage)
    heat_grids, heat_sec, heat_figs = heatmap_section(ctx, storage, data_storage)
    flag_quality = flag_quality_section(ctx)
    label_mode_warning(ctx, ood_sec)
    figs = {f["name"]: f["png"] for f in chain(*error_figs.values(), other_figs, flip_figs, grid_figs, heat_figs)}
    report: dict[str, Any] = {
        "format": FORMAT,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": summary_section(ctx),
        "settings": ctx.settings.model_dump(mode="json"),
        "conventions": CONVENTIONS,
        "warnings": ctx.warnings,
        "error_by_vog": err_sec,
        "flags": flag_sec,
        "ood": ood_sec,
        "agreement": agr_sec,
        "signals": league_sec,
        "flip": flip_sec,
        "class_summary": class_summary_section(ctx),
        "classes": class_section(ctx),
        "vog_histograms": hist_sec,
        "grids": grid_sec,
        "heatmap_grids": heat_sec,
        "flag_quality": flag_quality,
        "figures": sorted(figs),
    }
    report = clean(report)
    report["findings"] = clean(findings(report))
    report["report_time_s"] = round(time.perf_counter() - t0, 3)
    page = H.render(report, error_figs=error_figs, other_figs=other_figs, flip_figs=flip_figs, grids=grids,
                    config=_redacted(ctx.config), heat_grids=heat_grids)
    body = json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode()
    report["files"] = write_report_files((out or run.url).rstrip("/"), storage, figs, body, page)
    report["html_url"] = report["files"]["report_html"]
    report["json_url"] = report["files"]["report_json"]
    return report


def write_report_files(dest: str, storage: StorageOptions | None, figs: dict[str, bytes],
                       body: bytes, page: str) -> dict[str, Any]:
    """Write the figures (removing stale ones), ``report.json`` and last ``report.html`` under
    ``dest``; returns their URLs."""
    fs, base = resolve(dest, storage)   # one filesystem (one client) for every file
    for rel, png in figs.items():
        atomic_write(f"{base}/{rel}", png, fs=fs)
    remove_stale(fs, f"{base}/figures", [r.rsplit("/", 1)[-1] for r in figs])
    atomic_write(f"{base}/report.json", body, fs=fs)
    atomic_write(f"{base}/report.html", page.encode("utf-8"), fs=fs)
    return {"report_json": join(dest, "report.json"), "report_html": join(dest, "report.html"),
            "figures": [join(dest, r) for r in sorted(figs)]}


def _redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    from ..config import redact

    return redact(cfg)
