"""The sections of a report, each computed from a :class:`~.context.ReportContext` into its part
of ``report.json``: error by VoG, flag tests, OoD evaluation, agreement, the figures (error
curves, VoG histograms, data maps), the classes table and the run summary. Sections append their
warnings to ``ctx.warnings``; nothing here writes a file.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from . import figures as F
from .common import ReportError, safe_name, stable_seed
from .context import ReportContext
from .ood import METRICS, evaluate
from .scores import describe, signal_scores, usable, vog_scores
from .stats import AGREEMENT_SIGNALS, agreement, error_by_vog, flag_test, quantile_bins, ranks

__all__ = ["MAX_HIST_CLASSES", "figure_entry", "error_section", "flag_section", "ood_rows", "ood_section",
           "agreement_section", "figure_section", "class_section", "summary_section",
           "classes_to_show_warning", "label_mode_warning", "class_summary_section", "window_order",
           "flip_section", "reference_warning"]

MAX_HIST_CLASSES = 20


def figure_entry(name: str, title: str, png: bytes, caption: str = "") -> dict[str, Any]:
    """A figure as the page shows it; ``name`` is its file, ``figures/<name>.png``."""
    return {"name": f"figures/{name}.png", "title": title, "caption": caption, "png": png}


# ---------------------------------------------------------------- 1. error by VoG

def error_section(ctx: ReportContext) -> dict[str, Any]:
    """Per split: error rate by decile / percentile / lowest fraction of each key's z."""
    sec: dict[str, Any] = {}
    for s in ctx.splits:
        err = 1.0 - ctx.frame.correct[ctx.idx[s]].astype(np.float64)
        entry: dict[str, Any] = {"keys": {}}
        if np.isnan(err).all():
            entry["note"] = "no labels in this split: no error analysis"
        else:
            for k in ctx.keys:
                rng = np.random.default_rng(stable_seed(ctx.seed, "error", s, k))
                entry["keys"][k] = error_by_vog(err, ctx.split_ranks[(s, k)], ctx.bootstrap, rng)
            entry["overall"] = entry["keys"][ctx.primary]["overall"]
        sec[s] = entry
    return sec


# ---------------------------------------------------------------- 2. flags

def flag_section(ctx: ReportContext) -> dict[str, Any]:
    """Per flag column, split and key: flagged vs rest (:func:`.stats.flag_test`)."""
    frame, sec = ctx.frame, {}
    for col in ctx.settings.flag_columns:
        sec[col] = {}
        for s in ctx.splits:
            rows = ctx.idx[s]
            f = frame.flags[col][rows]
            if np.isnan(f).all():
                continue
            sec[col][s] = {}
            for k in ctx.keys:
                top = quantile_bins(ctx.split_ranks[(s, k)], len(rows), 10) == 10
                sec[col][s][k] = flag_test(frame.z[k][rows], f, top)
        if not sec[col]:
            ctx.warnings.append(f"flag column {col!r} holds no values in any split")
    return sec


# ---------------------------------------------------------------- 3. OoD

def _ood_groups(ctx: ReportContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(rows, is_in, group of each row, group names in order) of the in-distribution and OoD rows."""
    frame, ood_spec = ctx.frame, ctx.ood_spec
    is_in_all = frame.split == frame.split_names.index(ood_spec.in_distribution)
    if ood_spec.ood_splits:
        ood_codes = [frame.split_names.index(s) for s in ood_spec.ood_splits]
        is_ood_all = np.isin(frame.split, ood_codes)
    else:
        is_ood_all = ~is_in_all
    rows = np.flatnonzero(is_in_all | is_ood_all)
    is_in = is_in_all[rows]
    split_group = {s: ((ctx.splits_cfg.get(s) or {}).get("group") or s) for s in frame.split_names}
    code_group = np.array([split_group[x] for x in frame.split_names], dtype=object)
    groups = code_group[frame.split[rows]]
    if ood_spec.group_column:
        gv = frame.group[rows]
        has = np.array([v is not None for v in gv])
        groups[has] = gv[has]
    # order: the OoD splits as configured; within a split, group-column values sorted
    order = list(ood_spec.ood_splits) or [x for x in frame.split_names if x != ood_spec.in_distribution]
    rsplit = frame.split[rows]
    group_names: list[str] = []
    for sp in order:
        here = groups[(~is_in) & (rsplit == frame.split_names.index(sp))]
        for g in sorted(set(here.tolist()), key=str):
            if g not in group_names:
                group_names.append(g)
    return rows, is_in, groups, group_names


def ood_rows(ctx: ReportContext):
    """``(rows, is_in, groups, group_names)`` of the OoD evaluation, or None without report.ood."""
    if ctx.ood_spec is None:
        return None
    rows, is_in, groups, group_names = _ood_groups(ctx)
    if not group_names:
        raise ReportError("report.ood selects no OoD rows")
    if int(is_in.sum()) == 0:
        raise ReportError(f"in-distribution split {ctx.ood_spec.in_distribution!r} has no scored rows")
    return rows, is_in, groups, group_names


def ood_section(ctx: ReportContext, where: Any) -> dict[str, Any] | None:
    """Table-1 metrics of raw VoG, z (as stored, |z|, and the other normalisation) and the other
    signals, per OoD group (None without report.ood). ``where``: :func:`ood_rows`."""
    if where is None:
        return None
    ood_spec = ctx.ood_spec
    rows, is_in, groups, group_names = where
    scores = usable({**vog_scores(ctx, rows, ood_reference=ood_spec.in_distribution), **signal_scores(ctx, rows)},
                    ~is_in)
    res = evaluate({name: v for name, (v, _) in scores.items()}, is_in, groups, group_names)
    if ctx.manifest.get("normalization") in ("zscore", "abs_zscore") and not ctx.normalize_against:
        ctx.warnings.append(
            "z-VoG is normalised per class within each split, so z of an OoD split is relative to that "
            "split itself; raw VoG compares splits on one scale, and the OoD table also shows z against "
            f"the in-distribution split (z_vs_{ood_spec.in_distribution}_*, from classes.parquet: what "
            f"vog.normalize_against: {ood_spec.in_distribution} would store)")
    return {"in_distribution": ood_spec.in_distribution, "ood_splits": list(ood_spec.ood_splits),
            "group_column": ood_spec.group_column, "group_names": group_names,
            "normalize_against": ctx.normalize_against,
            "n_in": int(is_in.sum()), "n_ood": {g: int(((~is_in) & (groups == g)).sum()) for g in group_names},
            "metrics": list(METRICS), "scores": describe(scores), **res}


def label_mode_warning(ctx: ReportContext, ood_sec: dict[str, Any] | None) -> None:
    if ctx.manifest.get("label_mode") != "predicted" and ood_sec is not None:
        ctx.warnings.append("OoD evaluation on a run with label_mode "
                            f"{ctx.manifest.get('label_mode')!r}: VoG of OoD data is meant to be "
                            "computed with predicted labels (label_mode: predicted)")


# ---------------------------------------------------------------- 4. agreement

def agreement_section(ctx: ReportContext) -> dict[str, Any]:
    """Per split and key: Spearman rho of z and of raw VoG with the other difficulty signals."""
    frame, sec = ctx.frame, {}
    for s in ctx.splits:
        rows = ctx.idx[s]
        sigs = {name: frame.sig[name][rows] for name in AGREEMENT_SIGNALS if name in frame.sig}
        if not sigs:
            continue
        sec[s] = {}
        sig_ranks = {name: ranks(v) for name, v in sigs.items()}   # each signal ranked once
        for k in ctx.keys:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = agreement(frame.z[k][rows], sigs, sig_ranks)
                araw = agreement(frame.vog[k][rows], sigs, sig_ranks)
            for name in a:
                a[name]["rho_raw"] = araw[name]["rho"]
            sec[s][k] = a
    return sec


# ---------------------------------------------------------------- 5. figures

def _error_figures(ctx: ReportContext, s: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Error by decile and by percentile of split ``s``, one pair per target."""
    figs = []
    for t in ctx.targets:
        ws = [w for w in ctx.windows if f"{w}_{t}" in entry["keys"]]
        per_w = {w: entry["keys"][f"{w}_{t}"]["deciles"] for w in ws}
        per_p = {w: entry["keys"][f"{w}_{t}"]["percentiles"] for w in ws}
        figs.append(figure_entry(
            f"error_decile_{safe_name(s)}_{safe_name(t)}", f"{s}: error by z-VoG decile, target {t}",
            F.error_by_decile(f"{s}: error by z-VoG decile ({t} target; windows side by side)",
                              per_w, entry["overall"]["error_rate"]),
            "bars: error rate of the last checkpoint; whiskers: 95% bootstrap interval"))
        figs.append(figure_entry(
            f"error_percentile_{safe_name(s)}_{safe_name(t)}", f"{s}: error by z-VoG percentile, target {t}",
            F.error_by_percentile(f"{s}: error by z-VoG percentile ({t} target)", per_p),
            "shaded: 95% bootstrap interval"))
    return figs


def _histogram(ctx: ReportContext, s: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(histogram entry, figure) of the primary key's raw VoG per class in split ``s``."""
    rows, primary, label_of = ctx.idx[s], ctx.primary, ctx.label_of
    present = np.unique(ctx.frame.target[rows]).tolist()
    show = [c for c in ctx.settings.classes_to_show if c in set(present)]
    show = (show + [c for c in present if c not in show])[:MAX_HIST_CLASSES]
    edges, counts = F.histogram_counts(ctx.frame.vog[primary][rows], ctx.frame.target[rows], show)
    entry = {"key": primary, "edges": edges, "counts": {label_of(c): v for c, v in counts.items()}}
    fig = figure_entry(f"vog_hist_{safe_name(s)}", f"{s}: raw VoG ({primary}) per class",
                       F.vog_histograms(f"{s}: raw VoG ({primary}) per class", edges, counts,
                                        {c: label_of(c) for c in counts}),
                       "values above the split's 99.5th percentile are counted in the last bin")
    return entry, fig


def figure_section(ctx: ReportContext, err_sec: dict[str, Any]
                   ) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """(error figures per split, other figures, VoG histograms): the figures of every split."""
    frame, primary = ctx.frame, ctx.primary
    error_figs: dict[str, list[dict]] = {}
    other_figs: list[dict] = []
    hist_sec: dict[str, Any] = {}
    for s in ctx.splits:
        rows = ctx.idx[s]
        if err_sec[s]["keys"] and ctx.targets:
            error_figs[s] = _error_figures(ctx, s, err_sec[s])
        hist_sec[s], fig = _histogram(ctx, s)
        other_figs.append(fig)
        if "confidence" in frame.sig and "variability" in frame.sig:
            other_figs.append(figure_entry(
                f"data_map_{safe_name(s)}", f"{s}: data map coloured by z-VoG ({primary})",
                F.data_map(f"{s}: data map, colour = z-VoG ({primary})", frame.sig["confidence"][rows],
                           frame.sig["variability"][rows], frame.z[primary][rows], seed=ctx.seed)))
    return error_figs, other_figs, hist_sec


def classes_to_show_warning(ctx: ReportContext) -> None:
    present = set(np.unique(ctx.frame.target).tolist())
    absent = [c for c in ctx.settings.classes_to_show if c not in present]
    if absent:
        ctx.warnings.append(f"report.classes_to_show names classes with no example in this run: {absent}")


# ---------------------------------------------------------------- 6. classes and summary

def class_section(ctx: ReportContext) -> dict[str, list]:
    """Per split: the rows of ``classes.parquet`` (count, error rate, moments of each key)."""
    sec: dict[str, list] = {}
    if ctx.classes is not None and ctx.classes.num_rows:
        for r in ctx.classes.to_pylist():
            sec.setdefault(r["split"], []).append(
                {"class": r["class"], "name": ctx.label_of(r["class"]), "count": r.get("count"),
                 "error_rate": r.get("error_rate"),
                 **{f"{p}_{k}": r.get(f"{p}_{k}") for k in ctx.keys for p in ("mean", "std", "degenerate")}})
    return sec


def class_summary_section(ctx: ReportContext) -> dict[str, Any]:
    """Per split and class (the target class, used for normalisation): examples, error rate, mean
    z and mean raw VoG of the primary key, and the share of the class's examples that fall in the
    split's top z-decile (a tenth when the class is as hard as the split)."""
    frame, k, sec = ctx.frame, ctx.primary, {}
    for s in ctx.splits:
        rows = ctx.idx[s]
        top = quantile_bins(ctx.split_ranks[(s, k)], len(rows), 10) == 10
        cls, corr = frame.target[rows], frame.correct[rows]
        out = []
        for c in np.unique(cls):
            sel = cls == c
            known = sel & ~np.isnan(corr)
            out.append({"class": int(c), "name": ctx.label_of(c), "count": int(sel.sum()),
                        "error_rate": float(1.0 - corr[known].mean()) if known.any() else None,
                        "mean_z": float(np.mean(frame.z[k][rows][sel])),
                        "mean_vog": float(np.mean(frame.vog[k][rows][sel])),
                        "top_decile_share": float(top[sel].mean())})
        sec[s] = {"key": k, "classes": out}
    return sec


def window_order(windows: dict[str, list[int]]) -> list[str]:
    """Window names in checkpoint order: by mean checkpoint index, then first index, then size."""
    return sorted(windows, key=lambda w: (float(np.mean(windows[w])), min(windows[w]), len(windows[w])))


def flip_section(ctx: ReportContext, flag_sec: dict[str, Any], err_sec: dict[str, Any]
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The paper's early/late flip across every window of the run, in checkpoint order: per split
    and target, the mean z of flagged vs unflagged rows and the error of the top and bottom
    z-deciles. Returns (section, figures)."""
    order = window_order(ctx.windows)
    sec: dict[str, Any] = {"windows": order, "checkpoints": {w: ctx.windows[w] for w in order}, "splits": {}}
    figs = []
    for s in ctx.splits:
        entry: dict[str, Any] = {}
        for t in ctx.targets:
            keys = [f"{w}_{t}" for w in order]
            d: dict[str, Any] = {}
            for col, per_split in flag_sec.items():
                if s in per_split:
                    d.setdefault("mean_z_flagged", {})[col] = [per_split[s][k]["mean_flagged"] for k in keys]
                    d.setdefault("mean_z_rest", {})[col] = [per_split[s][k]["mean_rest"] for k in keys]
            per_key = err_sec.get(s, {}).get("keys") or {}
            if per_key:
                d["top_decile_error"] = [per_key[k]["deciles"][-1]["error_rate"] for k in keys]
                d["bottom_decile_error"] = [per_key[k]["deciles"][0]["error_rate"] for k in keys]
            if d:
                entry[t] = d
        if entry:
            sec["splits"][s] = entry
            labels = [f"{w}\n({_span(ctx.windows[w])})" for w in order]
            figs.append(figure_entry(
                f"flip_{safe_name(s)}", f"{s}: flagged vs rest and error across windows (checkpoint order)",
                F.flip(f"{s}: the early/late flip across windows", labels, entry),
                "left: mean z-VoG of flagged (solid) and unflagged (dashed) rows; right: error of the "
                "top (solid) and bottom (dashed) z-VoG decile; one colour per target"))
    return sec, figs


def _span(idx: list[int]) -> str:
    """Checkpoints of a window, 1-based: '1–3', or a list when not contiguous."""
    one = [i + 1 for i in idx]
    if one == list(range(one[0], one[-1] + 1)):
        return f"ckpt {one[0]}–{one[-1]}" if len(one) > 1 else f"ckpt {one[0]}"
    return "ckpt " + ",".join(map(str, one))


def reference_warning(ctx: ReportContext) -> None:
    """Rows without a reference class (``vog.normalize_against``) have no z and are not in the report."""
    missing = ctx.manifest.get("rows_without_reference") or {}
    n = sum(int(v) for per in missing.values() for v in per.values())
    if n:
        where = "; ".join(f"{s}: {sum(per.values())} rows of classes "
                          f"{sorted(per, key=lambda c: int(c))}" for s, per in missing.items())
        ctx.warnings.append(f"{n} rows belong to classes that split {ctx.normalize_against!r} "
                            f"(vog.normalize_against) lacks, so they have no z and no rank and are left "
                            f"out of this report ({where})")


def summary_section(ctx: ReportContext) -> dict[str, Any]:
    """The run: id, URL, labels, keys, checkpoints, rows per split, timing."""
    m = ctx.manifest
    splits_summary = {}
    for s in dict.fromkeys(ctx.splits + list((m.get("splits") or {}))):
        d = dict((m.get("splits") or {}).get(s, {}))
        d["rows_in_report"] = int(len(ctx.idx.get(s, [])))
        splits_summary[s] = d
    return {
        "run_id": ctx.run.run_id, "run_url": ctx.run.url, "label_mode": m.get("label_mode"),
        "normalization": m.get("normalization"), "normalize_against": m.get("normalize_against"),
        "rows_without_reference": m.get("rows_without_reference") or {},
        "targets": ctx.targets, "keys": ctx.keys,
        "primary": ctx.primary, "windows": ctx.windows, "num_checkpoints": m.get("num_checkpoints"),
        "checkpoints": m.get("checkpoints"), "rows": m.get("rows") or {},
        "splits": splits_summary, "wall_time_s": m.get("wall_time_s"),
        "throughput": m.get("throughput"),
        "class_names": ctx.class_names,
    }
