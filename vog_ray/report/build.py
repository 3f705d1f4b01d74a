"""``build_report``: statistics, OoD evaluation, figures and HTML for one published run.

Everything is computed in memory first; then ``figures/*.png``, ``report.json`` and last
``report.html`` are written, each under a temporary name and moved into place. Any problem
with the input (no published run, a missing flag column or OoD split, one class) raises
:class:`ReportError` before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import re
import time
import warnings
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ..runs import Run, RunNotFound, open_run
from ..storage import StorageOptions, join, resolve
from . import figures as F
from . import html as H
from .common import ReportError, atomic_write, clean, remove_stale, stable_seed
from .frame import Frame, load_frame, score_schema
from .ood import METRICS, ORIENTATION, evaluate
from .stats import AGREEMENT_SIGNALS, agreement, error_by_vog, flag_test, quantile_bins, \
    rank_order, ranks, ranks_from_order

__all__ = ["build_report", "CONVENTIONS", "open_published"]

GRID_SIZE = 25
MAX_HIST_CLASSES = 20

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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def _report_spec(manifest: dict[str, Any], spec: Any):
    from ..config import ReportSpec

    raw = spec if spec is not None else (manifest.get("config") or {}).get("report") or {}
    if isinstance(raw, ReportSpec):
        return raw
    try:
        return ReportSpec.model_validate(raw)
    except Exception as e:  # pydantic.ValidationError
        raise ReportError(f"invalid report settings: {e}") from None


def _class_label_fn(class_names: Sequence[str] | None):
    def label(c: int) -> str:
        c = int(c)
        if c < 0:
            return "?"
        if class_names and c < len(class_names):
            return f"{c}:{class_names[c]}"
        return str(c)
    return label


def _check_classes(run: Run) -> pa.Table | None:
    try:
        classes = run.classes()
    except FileNotFoundError:
        return None
    if classes.num_rows and "class" in classes.column_names:
        n = len(set(classes.column("class").to_pylist()))
        if n < 2:
            raise ReportError(f"run {run.url!r} has one class only "
                              f"({classes.column('class')[0].as_py()}): VoG is normalised and "
                              "ranked per class and errors by VoG need at least two classes")
    return classes


def _ood_plan(rspec, manifest: dict[str, Any], frame: Frame | None, splits_cfg: dict[str, Any]):
    """Validate report.ood against the run (before and after reading the table)."""
    ood = rspec.ood
    if ood is None:
        return None
    known = list(dict.fromkeys(list(manifest.get("splits") or {}) + list(splits_cfg)))
    if frame is not None:
        known = list(dict.fromkeys(known + frame.split_names))
    for s in [ood.in_distribution] + list(ood.ood_splits):
        if s not in known:
            raise ReportError(f"OoD split {s!r} (report.ood) is not a split of this run; "
                              f"splits: {known}")
    if not ood.ood_splits and not ood.group_column:
        raise ReportError("report.ood needs ood_splits and/or group_column")
    if ood.in_distribution in ood.ood_splits:
        raise ReportError(f"split {ood.in_distribution!r} is both in-distribution and OoD")
    if frame is not None:
        for s in [ood.in_distribution] + list(ood.ood_splits):
            if s not in frame.split_names:
                raise ReportError(f"OoD split {s!r} (report.ood) has no scored rows in this run")
    return ood


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
    m = run.manifest
    cfg = m.get("config") or {}
    rspec = _report_spec(m, spec)
    splits_cfg = ((cfg.get("data") or {}).get("splits")) or {}
    class_names = (cfg.get("data") or {}).get("class_names")
    keys: list[str] = list(m["keys"])
    primary: str = m["primary"]
    windows: dict[str, list[int]] = dict(m["windows"])
    targets: list[str] = list(m["targets"])
    if primary not in keys:
        raise ReportError(f"primary key {primary!r} is not among the run's keys {keys}")
    schema = score_schema(run)
    classes_tbl = _check_classes(run)
    _ood_plan(rspec, m, None, splits_cfg)
    ood_spec = rspec.ood
    frame = load_frame(run, keys, flag_columns=rspec.flag_columns,
                       group_column=ood_spec.group_column if ood_spec else None, schema=schema)
    if len(np.unique(frame.target)) < 2:
        raise ReportError(f"run {run.url!r} has one class only: VoG is normalised and ranked per "
                          "class and errors by VoG need at least two classes")
    _ood_plan(rspec, m, frame, splits_cfg)
    label_of = _class_label_fn(class_names)
    warns: list[str] = []
    B, seed = int(rspec.bootstrap), int(rspec.seed)

    # splits in order: in-distribution, other labelled/unlisted splits, then the OoD splits
    ood_names = list(ood_spec.ood_splits) if ood_spec else []
    first = [ood_spec.in_distribution] if ood_spec else []
    splits = first + sorted(x for x in frame.split_names if x not in first and x not in ood_names) + \
        [x for x in ood_names if x in frame.split_names]

    # ---------------------------------------------------------------- ranks per split and key
    idx = {s: frame.rows(s) for s in splits}
    ids_by_split = {s: frame.ids.take(pa.array(idx[s])) for s in splits}
    split_ranks: dict[tuple[str, str], np.ndarray] = {}
    for s in splits:
        for k in keys:
            split_ranks[(s, k)] = ranks_from_order(rank_order(frame.z[k][idx[s]], ids_by_split[s]))

    # ---------------------------------------------------------------- 1. error by VoG
    err_sec: dict[str, Any] = {}
    for s in splits:
        err = 1.0 - frame.correct[idx[s]].astype(np.float64)
        entry: dict[str, Any] = {"keys": {}}
        if np.isnan(err).all():
            entry["note"] = "no labels in this split: no error analysis"
        else:
            for k in keys:
                rng = np.random.default_rng(stable_seed(seed, "error", s, k))
                res = error_by_vog(err, split_ranks[(s, k)], B, rng)
                entry["keys"][k] = res
            entry["overall"] = entry["keys"][primary]["overall"]
        err_sec[s] = entry

    # ---------------------------------------------------------------- 2. flags
    flag_sec: dict[str, Any] = {}
    for col in rspec.flag_columns:
        flag_sec[col] = {}
        for s in splits:
            f = frame.flags[col][idx[s]]
            if np.isnan(f).all():
                continue
            flag_sec[col][s] = {}
            for k in keys:
                n = len(idx[s])
                top = quantile_bins(split_ranks[(s, k)], n, 10) == 10
                flag_sec[col][s][k] = flag_test(frame.z[k][idx[s]], f, top)
        if not flag_sec[col]:
            warns.append(f"flag column {col!r} holds no values in any split")

    # ---------------------------------------------------------------- 3. OoD
    ood_sec = None
    if ood_spec is not None:
        ood_sec = _ood(frame, ood_spec, keys, splits_cfg, m, warns)

    # ---------------------------------------------------------------- 5. agreement
    agr_sec: dict[str, Any] = {}
    for s in splits:
        sigs = {name: frame.sig[name][idx[s]] for name in AGREEMENT_SIGNALS if name in frame.sig}
        if not sigs:
            continue
        agr_sec[s] = {}
        sig_ranks = {name: ranks(v) for name, v in sigs.items()}   # each signal ranked once
        for k in keys:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = agreement(frame.z[k][idx[s]], sigs, sig_ranks)
                araw = agreement(frame.vog[k][idx[s]], sigs, sig_ranks)
            for name in a:
                a[name]["rho_raw"] = araw[name]["rho"]
            agr_sec[s][k] = a

    # ---------------------------------------------------------------- 6. figures
    figs: dict[str, bytes] = {}
    error_figs: dict[str, list[dict]] = {}
    other_figs: list[dict] = []
    hist_sec: dict[str, Any] = {}

    def add(name: str, title: str, png: bytes, caption: str = "") -> dict:
        rel = f"figures/{name}.png"
        figs[rel] = png
        return {"name": rel, "title": title, "caption": caption, "png": png}

    for s in splits:
        e = err_sec[s]
        if e["keys"]:
            for t in targets:
                per_w = {w: e["keys"][f"{w}_{t}"]["deciles"] for w in windows if f"{w}_{t}" in e["keys"]}
                per_p = {w: e["keys"][f"{w}_{t}"]["percentiles"] for w in windows if f"{w}_{t}" in e["keys"]}
                error_figs.setdefault(s, []).append(add(
                    f"error_decile_{_safe(s)}_{_safe(t)}", f"{s}: error by z-VoG decile, target {t}",
                    F.error_by_decile(f"{s}: error by z-VoG decile ({t} target; windows side by side)",
                                      per_w, e["overall"]["error_rate"]),
                    "bars: error rate of the last checkpoint; whiskers: 95% bootstrap interval"))
                error_figs[s].append(add(
                    f"error_percentile_{_safe(s)}_{_safe(t)}", f"{s}: error by z-VoG percentile, target {t}",
                    F.error_by_percentile(f"{s}: error by z-VoG percentile ({t} target)", per_p),
                    "shaded: 95% bootstrap interval"))
        cls_here = np.unique(frame.target[idx[s]])
        present = cls_here.tolist()
        show = [c for c in rspec.classes_to_show if c in set(present)]
        show = (show + [c for c in present if c not in show])[:MAX_HIST_CLASSES]
        edges, counts = F.histogram_counts(frame.vog[primary][idx[s]], frame.target[idx[s]], show)
        hist_sec[s] = {"key": primary, "edges": edges, "counts": {label_of(c): v for c, v in counts.items()}}
        other_figs.append(add(f"vog_hist_{_safe(s)}", f"{s}: raw VoG ({primary}) per class",
                              F.vog_histograms(f"{s}: raw VoG ({primary}) per class", edges, counts,
                                               {c: label_of(c) for c in counts}),
                              "values above the split's 99.5th percentile are counted in the last bin"))
        if "confidence" in frame.sig and "variability" in frame.sig:
            other_figs.append(add(
                f"data_map_{_safe(s)}", f"{s}: data map coloured by z-VoG ({primary})",
                F.data_map(f"{s}: data map, colour = z-VoG ({primary})", frame.sig["confidence"][idx[s]],
                           frame.sig["variability"][idx[s]], frame.z[primary][idx[s]], seed=seed)))

    present = set(np.unique(frame.target).tolist())
    absent = [c for c in rspec.classes_to_show if c not in present]
    if absent:
        warns.append(f"report.classes_to_show names classes with no example in this run: {absent}")
    grids, grid_sec = _grids(frame, idx, ids_by_split, primary, rspec, splits_cfg, label_of, cfg,
                             storage, data_storage, warns)
    for g in grids:
        tiles = [(t["image"], f"{t['id']}\nlabel {t['label']}\npred {t['pred']}") for t in g["tiles"]]
        add(g["file"], g["title"], F.image_grid(g["title"], tiles))   # a file; the page shows tiles
        for t in g["tiles"]:
            t["png"] = F.tile_png(t["image"]) if t["image"] is not None else None

    if m.get("label_mode") != "predicted" and ood_sec is not None:
        warns.append("OoD evaluation on a run with label_mode "
                     f"{m.get('label_mode')!r}: VoG of OoD data is meant to be computed with "
                     "predicted labels (label_mode: predicted)")

    # ---------------------------------------------------------------- classes table
    cls_sec: dict[str, list] = {}
    if classes_tbl is not None and classes_tbl.num_rows:
        for r in classes_tbl.to_pylist():
            cls_sec.setdefault(r["split"], []).append(
                {"class": r["class"], "name": label_of(r["class"]), "count": r.get("count"),
                 "error_rate": r.get("error_rate"),
                 **{f"{p}_{k}": r.get(f"{p}_{k}") for k in keys for p in ("mean", "std", "degenerate")}})

    splits_summary = {}
    for s in dict.fromkeys(splits + list((m.get("splits") or {}))):
        d = dict((m.get("splits") or {}).get(s, {}))
        d["rows_in_report"] = int(len(idx.get(s, [])))
        splits_summary[s] = d
    report: dict[str, Any] = {
        "format": "vog-ray-report/1",
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": {
            "run_id": run.run_id, "run_url": run.url, "label_mode": m.get("label_mode"),
            "normalization": m.get("normalization"), "targets": targets, "keys": keys,
            "primary": primary, "windows": windows, "num_checkpoints": m.get("num_checkpoints"),
            "checkpoints": m.get("checkpoints"), "rows": m.get("rows") or {},
            "splits": splits_summary, "wall_time_s": m.get("wall_time_s"),
            "throughput": m.get("throughput"),
            "class_names": class_names,
        },
        "settings": rspec.model_dump(mode="json"),
        "conventions": CONVENTIONS,
        "warnings": warns,
        "error_by_vog": err_sec,
        "flags": flag_sec,
        "ood": ood_sec,
        "agreement": agr_sec,
        "classes": cls_sec,
        "vog_histograms": hist_sec,
        "grids": grid_sec,
        "figures": sorted(figs),
    }
    report = clean(report)
    report["report_time_s"] = round(time.perf_counter() - t0, 3)
    page = H.render(report, error_figs=error_figs, other_figs=other_figs, grids=grids,
                    config=_redacted(cfg))
    body = json.dumps(report, indent=2, sort_keys=True, allow_nan=False).encode()

    # ---------------------------------------------------------------- write (html last)
    dest = (out or run.url).rstrip("/")
    fs, base = resolve(dest, storage)   # one filesystem (one client) for every file
    for rel, png in figs.items():
        atomic_write(f"{base}/{rel}", png, fs=fs)
    remove_stale(fs, f"{base}/figures", [r.rsplit("/", 1)[-1] for r in figs])
    atomic_write(f"{base}/report.json", body, fs=fs)
    atomic_write(f"{base}/report.html", page.encode("utf-8"), fs=fs)
    report["files"] = {"report_json": join(dest, "report.json"), "report_html": join(dest, "report.html"),
                       "figures": [join(dest, r) for r in sorted(figs)]}
    report["html_url"] = report["files"]["report_html"]
    report["json_url"] = report["files"]["report_json"]
    return report


def _redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    from ..config import redact

    return redact(cfg)


def _ood(frame: Frame, ood_spec, keys: Sequence[str], splits_cfg: dict[str, Any], m: dict[str, Any],
         warns: list[str]) -> dict[str, Any]:
    sid = frame.split_names.index(ood_spec.in_distribution)
    is_in_all = frame.split == sid
    if ood_spec.ood_splits:
        ood_codes = [frame.split_names.index(s) for s in ood_spec.ood_splits]
        is_ood_all = np.isin(frame.split, ood_codes)
    else:
        is_ood_all = ~is_in_all
    rows = np.flatnonzero(is_in_all | is_ood_all)
    is_in = is_in_all[rows]
    split_group = {s: ((splits_cfg.get(s) or {}).get("group") or s) for s in frame.split_names}
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
    if not group_names:
        raise ReportError("report.ood selects no OoD rows")
    if int(is_in.sum()) == 0:
        raise ReportError(f"in-distribution split {ood_spec.in_distribution!r} has no scored rows")
    scores: dict[str, np.ndarray] = {}
    described: dict[str, str] = {}
    for k in keys:
        scores[f"vog_{k}"] = frame.vog[k][rows]
        described[f"vog_{k}"] = f"raw VoG ({k}), as is"
        scores[f"z_{k}"] = frame.z[k][rows]
        described[f"z_{k}"] = f"z-VoG ({k}, normalised within each split), as is"
    for name, (sig, sign, desc) in ORIENTATION.items():
        if sig in frame.sig:
            scores[name] = sign * frame.sig[sig][rows].astype(np.float64)
            described[name] = desc + " (last checkpoint)"
    res = evaluate(scores, is_in, groups, group_names)
    if m.get("normalization") in ("zscore", "abs_zscore"):
        warns.append("z-VoG is normalised per class within each split, so z of an OoD split is "
                     "relative to that split itself; raw VoG compares splits on one scale")
    return {"in_distribution": ood_spec.in_distribution, "ood_splits": list(ood_spec.ood_splits),
            "group_column": ood_spec.group_column, "group_names": group_names,
            "n_in": int(is_in.sum()), "n_ood": {g: int(((~is_in) & (groups == g)).sum()) for g in group_names},
            "metrics": list(METRICS), "scores": described, **res}


def _grid_rows(frame: Frame, rows: np.ndarray, order_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(highest, lowest) rows by rank: the 25 smallest ranks, and the 25 largest (lowest first)."""
    o = rows[np.argsort(order_key, kind="stable")]
    return o[:GRID_SIZE], o[::-1][:GRID_SIZE]


def _grids(frame: Frame, idx, ids_by_split, primary, rspec, splits_cfg, label_of, cfg, storage,
           data_storage, warns) -> tuple[list[dict], list[dict]]:
    plan: list[dict[str, Any]] = []
    for s in idx:
        rows = idx[s]
        hi, lo = _grid_rows(frame, rows, frame.rank[rows])
        plan.append({"split": s, "which": "lowest", "class": None, "rows": lo,
                     "title": f"{s}: the {len(lo)} lowest-VoG examples ({primary})",
                     "file": f"grid_{_safe(s)}_lowest"})
        plan.append({"split": s, "which": "highest", "class": None, "rows": hi,
                     "title": f"{s}: the {len(hi)} highest-VoG examples ({primary})",
                     "file": f"grid_{_safe(s)}_highest"})
        for c in rspec.classes_to_show:
            crow = rows[frame.target[rows] == c]
            if len(crow) == 0:
                continue
            hi, lo = _grid_rows(frame, crow, frame.class_rank[crow])
            for which, sel in (("lowest", lo), ("highest", hi)):
                plan.append({"split": s, "which": which, "class": int(c), "rows": sel,
                             "title": f"{s}, class {label_of(c)}: the {len(sel)} {which}-VoG examples",
                             "file": f"grid_{_safe(s)}_class{int(c)}_{which}"})
    meta = [{"split": p["split"], "which": p["which"], "class": p["class"], "title": p["title"],
             "ids": [frame.ids[int(r)].as_py() for r in p["rows"]]} for p in plan]
    try:
        fetch = importlib.import_module("vog_ray.data.fetch").fetch_images
    except (ImportError, AttributeError) as e:
        warns.append(f"image grids skipped: vog_ray.data.fetch.fetch_images is not available ({e})")
        return [], meta
    from ..config import SplitSpec, StorageSpec

    if data_storage is None:
        data_storage = storage if storage is not None else \
            StorageSpec.model_validate(cfg.get("storage") or {}).options()
    images: dict[str, dict[str, Any]] = {}
    for s in idx:
        want = sorted({frame.ids[int(r)].as_py() for p in plan if p["split"] == s for r in p["rows"]})
        if s not in splits_cfg:
            warns.append(f"image grids of split {s!r} skipped: the run config has no data.splits.{s}")
            continue
        try:
            kw = {"on_error": "skip"} if "on_error" in inspect.signature(fetch).parameters else {}
            images[s] = fetch(SplitSpec.model_validate(splits_cfg[s]), want, data_storage, **kw) or {}
        except Exception as e:  # the source data may be gone or unreadable: report, don't fail
            warns.append(f"image grids of split {s!r} skipped: could not read the source images "
                         f"({type(e).__name__}: {e})")
            continue
        miss = [i for i in want if i not in images[s]]
        if miss:
            warns.append(f"{len(miss)} image(s) of split {s!r} not found in the source data "
                         f"(e.g. {miss[:3]})")
    grids = []
    for p in plan:
        if p["split"] not in images:
            continue
        tiles = []
        for r in p["rows"]:
            r = int(r)
            i = frame.ids[r].as_py()
            img = images[p["split"]].get(i)
            tiles.append({"id": i, "label": label_of(frame.label[r]), "pred": label_of(frame.pred[r]),
                          "z": float(frame.z[primary][r]),
                          "image": None if img is None else np.asarray(img)})
        grids.append({"title": p["title"], "file": p["file"], "tiles": tiles})
    return grids, meta
