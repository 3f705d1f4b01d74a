"""``report.html``: one self-contained page (inline CSS, images as base64 data URIs, no script,
no external request), readable offline. It opens with the findings, the hardest examples of each
split (flagged tiles and label ≠ prediction marked) and the per-class table; every detailed table
and figure follows in a collapsible ``<details>``. Every string that comes from the run — class
names, ids, split names, URLs, config values — goes through :func:`esc` (``html.escape``)."""

from __future__ import annotations

import base64
import html as _html
import json
from typing import Any, Iterable, Sequence

from .ood import METRICS

__all__ = ["render", "esc"]

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:0 24px 48px;color:#1b1b1b;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #333;padding-bottom:6px}
h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #bbb}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f0f0f0}
td.l,th.l{text-align:left}
.note{color:#555;font-size:13px}
.warn{background:#fff4e0;border-left:4px solid #e8a33d;padding:6px 10px;margin:6px 0}
figure.fig{margin:10px 0}
figure.fig img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:12px;color:#444}
.grid{display:grid;grid-template-columns:repeat(5,150px);gap:8px;margin:8px 0 20px}
.tile{margin:0;border:1px solid #ddd;padding:4px;text-align:center;background:#fafafa}
.tile img{width:96px;height:96px;image-rendering:pixelated;object-fit:contain}
.tile figcaption{font-size:11px;word-break:break-all}
nav a{margin:0 2px}
.missing{width:96px;height:96px;display:inline-block;line-height:96px;color:#999;background:#eee}
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}
dl.kv dt{font-weight:600}
dl.kv dd{margin:0;word-break:break-all}
details.sec{margin:10px 0;border:1px solid #ddd;padding:4px 10px}
details.sec>summary{font-size:1.15em;font-weight:600;cursor:pointer;padding:4px 0}
ul.findings li{margin:4px 0}
ul.findings li.no{list-style-type:"✗  "}
.tile.marked{border:2px solid #c44e52}
.mark{display:inline-block;background:#c44e52;color:#fff;border-radius:3px;padding:0 3px;margin:1px}
.badge{background:#fff4e0;border:1px solid #e8a33d;border-radius:3px;padding:0 4px;font-size:11px}
"""


def esc(x: Any) -> str:
    return _html.escape("" if x is None else str(x), quote=True)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return esc(x)


def rate_ci(d: dict[str, Any] | None) -> str:
    if not d or d.get("error_rate") is None:
        return "—"
    s = fmt(d["error_rate"])
    if d.get("ci_low") is not None:
        s += f' <span class="note">[{fmt(d["ci_low"])}, {fmt(d["ci_high"])}]</span>'
    return s


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """``rows`` cells are already-escaped HTML strings (use :func:`esc` / :func:`fmt`)."""
    h = "".join(f'<th class="{"l" if i < left else ""}">{esc(c)}</th>' for i, c in enumerate(header))
    body = []
    for r in rows:
        body.append("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                     for i, c in enumerate(r)) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(fig: dict[str, Any]) -> str:
    return (f'<figure class="fig"><img alt="{esc(fig["title"])}" src="{data_uri(fig["png"])}">'
            f'<figcaption>{esc(fig["title"])} — <code>{esc(fig["name"])}</code>'
            f'{(" — " + esc(fig["caption"])) if fig.get("caption") else ""}</figcaption></figure>')


def _throughput(t: Any) -> str:
    if isinstance(t, dict):
        parts = []
        if t.get("examples_per_s") is not None:
            parts.append(f"{fmt(float(t['examples_per_s']))} examples/s")
        if t.get("example_checkpoints_per_s") is not None:
            parts.append(f"{fmt(float(t['example_checkpoints_per_s']))} example-checkpoints/s")
        return "; ".join(parts) or "—"
    if isinstance(t, (int, float)):
        return f"{fmt(float(t))} examples/s"
    return "—" if t is None else str(t)


def _summary(r: dict[str, Any]) -> str:
    s = r["summary"]
    kv = [("run id", s["run_id"]), ("run URL", s["run_url"]), ("report generated", r["generated_at"]),
          ("label mode", s["label_mode"]), ("normalization", s["normalization"]),
          ("z normalised against", s.get("normalize_against") or "each split itself"),
          ("targets", ", ".join(s["targets"])), ("primary (ranked) key", s["primary"]),
          ("checkpoints", s["num_checkpoints"]),
          ("windows", "; ".join(f"{w}: {v}" for w, v in s["windows"].items())),
          ("rows in / scored / rejected", f'{fmt(s["rows"].get("in"))} / {fmt(s["rows"].get("scored"))}'
                                          f' / {fmt(s["rows"].get("rejected"))}'),
          ("wall time (s)", fmt(s.get("wall_time_s"))), ("throughput", _throughput(s.get("throughput")))]
    out = ['<dl class="kv">'] + [f"<dt>{esc(k)}</dt><dd>{esc(v) if not isinstance(v, float) else fmt(v)}</dd>"
                                 for k, v in kv] + ["</dl>"]
    rows = [[esc(sp), fmt(d.get("rows_in")), fmt(d.get("rows_scored")), fmt(d.get("rows_rejected")),
             fmt(d.get("rows_in_report")), rate_ci(r["error_by_vog"].get(sp, {}).get("overall"))]
            for sp, d in s["splits"].items()]
    out.append(table(["split", "rows in", "scored", "rejected", "in report", "error (last ckpt)"], rows))
    return "".join(out)


def _conventions(r: dict[str, Any]) -> str:
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in r["conventions"].items())
    return f"<ul class='note'>{items}</ul>"


def _error_section(r: dict[str, Any], figs: dict[str, list[dict]]) -> str:
    out = []
    for split, entry in r["error_by_vog"].items():
        per_key = entry["keys"]
        keys = list(per_key)
        out.append(f"<h3>split {esc(split)}</h3>")
        if not keys:
            out.append(f'<p class="note">{esc(entry.get("note", "no error analysis"))}</p>')
            continue
        rows = []
        for b in range(10):
            rows.append([str(b + 1)] + [rate_ci(per_key[k]["deciles"][b])
                                        + f' <span class="note">n={fmt(per_key[k]["deciles"][b]["n_labelled"])}</span>'
                                        for k in keys])
        rows.append(["all"] + [rate_ci(entry["overall"]) for _ in keys])
        out.append("<p class='note'>Error rate of the last checkpoint (95% bootstrap interval) per "
                   "z-VoG decile of each key (window_target); decile 10 = highest VoG.</p>")
        out.append(table(["decile"] + keys, rows))
        rows = []
        for k in keys:
            for lf in per_key[k]["lowest"]:
                rows.append([esc(k), f"{int(round(lf['fraction'] * 100))}%",
                             rate_ci(lf["lowest"]), rate_ci(lf["highest"]), rate_ci(entry["overall"]),
                             fmt(lf["lowest"]["ratio_to_overall"]), fmt(lf["highest"]["ratio_to_overall"])])
        out.append(table(["key", "share of split", "lowest-VoG error", "highest-VoG error", "split error",
                          "lowest / split", "highest / split"], rows))
        for f in figs.get(split, []):
            out.append(figure(f))
    return "".join(out)


def _flags_section(r: dict[str, Any]) -> str:
    if not r["flags"]:
        return '<p class="note">No flag columns configured (report.flag_columns).</p>'
    rows = []
    for col, per_split in r["flags"].items():
        for split, per_key in per_split.items():
            for k, d in per_key.items():
                rows.append([esc(col), esc(split), esc(k), fmt(d["n_flagged"]), fmt(d["n_rest"]),
                             fmt(d["mean_flagged"]), fmt(d["mean_rest"]), fmt(d["t"]), fmt(d["p"]),
                             fmt(d["cohens_d"]), fmt(d["auroc"]), fmt(d["top_decile_share"]),
                             fmt(d["base_rate"]), fmt(d["top_decile_lift"])])
    return table(["flag", "split", "key", "n flagged", "n rest", "mean z flagged", "mean z rest",
                  "Welch t", "p", "Cohen's d", "AUROC", "top-decile share", "base rate", "lift"],
                 rows, left=3)


def _pm(d: dict[str, Any]) -> str:
    if d["mean"] is None:
        return "—"
    return fmt(d["mean"]) + (f" ± {fmt(d['std'])}" if d["std"] is not None else "")


def _ood_section(r: dict[str, Any]) -> str:
    o = r.get("ood")
    if not o:
        return '<p class="note">No OoD evaluation configured (report.ood).</p>'
    which = (f"z against split <b>{esc(o['normalize_against'])}</b> (vog.normalize_against); z_own_* is the "
             "per-split z" if o.get("normalize_against") else
             f"z per class within each split; z_vs_{esc(o['in_distribution'])}_* is z against the "
             "in-distribution split (what vog.normalize_against would store)")
    out = [f'<p>In-distribution split <b>{esc(o["in_distribution"])}</b> (n = {fmt(o["n_in"])}); '
           f'OoD groups: {esc(", ".join(o["group_names"]))}.</p>',
           f"<p class='note'>z_* columns: {which}; abs_z_* is its absolute value (two-sided). The paper "
           "computes AUPR-Out with VoG × −1 (its column here), the report's own AUPR-Out with higher "
           "VoG = OoD.</p>"]
    names = list(o["summary"])
    rows = [[esc(n), esc(o["scores"][n])] + [_pm(o["summary"][n][m]) for m in METRICS] for n in names]
    out.append("<h3>Mean ± std across OoD groups (paper Table 1 layout)</h3>")
    out.append(table(["score", "orientation (higher = more OoD)", "AUROC", "AUPR-In", "AUPR-Out",
                      "AUPR-Out, score × −1 (paper, Sec. 4.2)", "FPR@95%TPR"], rows, left=2))
    out.append("<h3>AUROC per OoD group</h3>")
    groups = o["group_names"]
    rows = [[esc(n)] + [fmt(o["groups"][g][n]["auroc"]) for g in groups] for n in names]
    out.append(table(["score"] + list(groups), rows))
    det = []
    for g in groups:
        rows = [[esc(n)] + [fmt(o["groups"][g][n][m]) for m in METRICS]
                + [fmt(o["groups"][g][n]["n_ood"])] for n in names]
        det.append(f"<h4>{esc(g)}</h4>" + table(["score", "AUROC", "AUPR-In", "AUPR-Out",
                                                 "AUPR-Out (paper: × −1)", "FPR@95%TPR", "n OoD"], rows))
    out.append("<details><summary>All metrics per group</summary>" + "".join(det) + "</details>")
    return "".join(out)


def _agreement_section(r: dict[str, Any]) -> str:
    rows = []
    sig_names: list[str] = []
    for split, per_key in r["agreement"].items():
        for k, per_sig in per_key.items():
            for s in per_sig:
                if s not in sig_names:
                    sig_names.append(s)
    for split, per_key in r["agreement"].items():
        for k, per_sig in per_key.items():
            rows.append([esc(split), esc(k)] + [fmt(per_sig.get(s, {}).get("rho")) for s in sig_names])
    if not rows:
        return '<p class="note">No per-checkpoint signals in this run.</p>'
    return ("<p class='note'>Spearman ρ of z-VoG with each signal (signals at the target index).</p>"
            + table(["split", "key"] + sig_names, rows, left=2))


def _grids(grids: list[dict[str, Any]], tile_class: str = "tile",
           note: str = "Tiles read from the source data by id; each grid is also saved as "
                       "<code>figures/grid_*.png</code>. A red frame marks a flagged example or a known label "
                       "that differs from the last checkpoint's prediction (label≠pred).") -> str:
    out = [f"<p class='note'>{note}</p>"]
    for g in grids:
        out.append(f"<h3>{esc(g['title'])}</h3>")
        tiles = []
        for t in g["tiles"]:
            marks = t.get("marks") or []
            cap = f"{esc(t['id'])}<br>label {esc(t['label'])} · pred {esc(t['pred'])}<br>z {fmt(t['z'], 2)}"
            cap += "".join(f'<br><span class="mark">{esc(m)}</span>' for m in marks)
            img = (f'<img alt="{esc(t["id"])}" src="{data_uri(t["png"])}">' if t.get("png")
                   else '<span class="missing">missing</span>')
            tiles.append(f'<figure class="{tile_class}{" marked" if marks else ""}" data-id="{esc(t["id"])}">{img}'
                         f'<figcaption>{cap}</figcaption></figure>')
        out.append('<div class="grid">' + "".join(tiles) + "</div>")
    return "".join(out)


HEAT_NOTE = ("VoG heat maps over the images (bright = pixels whose input gradient varies most across the "
             "checkpoints of the ranked window; each map scaled to its own maximum); also saved as "
             "<code>figures/heatmap_*.png</code>. <code>vog-ray explore</code> shows them for any example.")


def _classes(r: dict[str, Any]) -> str:
    if not r.get("classes"):
        return '<p class="note">No class table in this run.</p>'
    key = r["summary"]["primary"]
    out = []
    for split, rows in r["classes"].items():
        body = [[esc(c["name"]), fmt(c["count"]), fmt(c["error_rate"]), fmt(c.get(f"mean_{key}")),
                 fmt(c.get(f"std_{key}")), "yes" if c.get(f"degenerate_{key}") else ""] for c in rows]
        out.append(f"<details><summary>split {esc(split)} ({len(rows)} classes)</summary>"
                   + table(["class", "examples", "error", f"mean raw VoG ({key})", "std",
                            "std = 0 (z = 0)"], body) + "</details>")
    return "".join(out)


def _findings(r: dict[str, Any]) -> str:
    items = r.get("findings") or []
    if not items:
        return '<p class="note">No findings: the run has no flag columns, labels or OoD groups to test.</p>'
    lis = []
    for f in items:
        no = f.get("reproduces") is False
        tag = ' <span class="badge">does not reproduce the paper\'s direction</span>' if no else ""
        lis.append(f'<li class="{"no" if no else ""}">{esc(f["text"])}{tag} <code class="note">{esc(f["key"])}</code></li>')
    return ("<p class='note'>Generated from <code>report.json</code>; each sentence ends with the key its "
            "number comes from.</p><ul class='findings'>" + "".join(lis) + "</ul>")


def _class_summary(r: dict[str, Any]) -> str:
    out = []
    for split, d in (r.get("class_summary") or {}).items():
        rows = [[esc(c["name"]), fmt(c["count"]), fmt(c["error_rate"]), fmt(c["mean_z"]), fmt(c["mean_vog"]),
                 fmt(c["top_decile_share"])] for c in d["classes"]]
        out.append(f"<h3>split {esc(split)}</h3>" + table(
            ["class", "examples", "error", f"mean z ({d['key']})", "mean raw VoG", "share in the top decile"], rows))
    if not out:
        return '<p class="note">No classes.</p>'
    return ("<p class='note'>Per target class: the share of its examples in the split's top z-decile is 0.1 "
            "when the class is as hard as the split.</p>" + "".join(out))


def _ci(ci: Any) -> str:
    return f' <span class="note">[{fmt(ci[0])}, {fmt(ci[1])}]</span>' if ci else ""


def _league_table(t: dict[str, Any]) -> str:
    rows = [[str(x["place"]), esc(x["signal"]), esc(x["orientation"]),
             fmt(x["auroc"]) + _ci(x.get("auroc_ci")), fmt(x["aupr"]) + _ci(x.get("aupr_ci")),
             fmt(x["aupr_base_rate"])] for x in t["table"]]
    return (f"<p class='note'>{fmt(t['n_positive'])} positives of {fmt(t['n'])} rows; intervals from "
            f"{fmt(t['resamples'])} stratified bootstrap resamples.</p>"
            + table(["#", "signal", "orientation (higher = more likely positive)", "AUROC", "AUPR",
                     "AUPR base rate"], rows, left=3))


def _league(r: dict[str, Any]) -> str:
    sig = r.get("signals") or {}
    out = []
    for col, per_split in (sig.get("flags") or {}).items():
        for split, t in per_split.items():
            out.append(f"<h3>finding {esc(col)} in {esc(split)}</h3>" + _league_table(t))
    ood = sig.get("ood")
    if ood:
        out.append("<h3>OoD: all groups pooled</h3>" + _league_table(ood["all"]))
        det = "".join(f"<h4>{esc(g)}</h4>" + _league_table(t) for g, t in ood["groups"].items())
        out.append("<details><summary>per OoD group</summary>" + det + "</details>")
    if not out:
        return '<p class="note">No flag columns or OoD groups: no league table.</p>'
    return ("<p class='note'>Which signal finds the flagged (or OoD) rows best: AUROC and AUPR "
            "(scikit-learn), best AUROC first, 95% bootstrap intervals.</p>" + "".join(out))


def _section(anchor: str, title: str, body: str, *, open_: bool = False) -> str:
    return (f"<details class='sec' id='{anchor}'{' open' if open_ else ''}><summary>{esc(title)}</summary>"
            f"{body}</details>")


NAV = (("findings", "Findings"), ("hardest", "Hardest examples"), ("per-class", "Per class"),
       ("summary", "Run"), ("league", "Signal league"), ("flip", "Early/late flip"), ("error", "Error by VoG"),
       ("flags", "Flagged examples"), ("flag-rules", "The run's flags"), ("ood", "OoD"), ("agreement", "Agreement"), ("figures", "Distributions"),
       ("examples", "Other grids"), ("classes", "Class moments"), ("conventions", "Conventions"),
       ("config", "Config"))


def render(report: dict[str, Any], *, error_figs: dict[str, list[dict]], other_figs: list[dict],
           grids: list[dict[str, Any]], config: dict[str, Any], flip_figs: list[dict] | None = None,
           heat_grids: Sequence[dict[str, Any]] = ()) -> str:
    from .flagged import flag_quality_html

    title = f"VoG audit report — {report['summary']['run_id']}"
    warns = "".join(f'<div class="warn">{esc(w)}</div>' for w in report["warnings"])
    hardest = [g for g in grids if g.get("which") == "highest" and g.get("class") is None]
    rest = [g for g in grids if g not in hardest]
    no_grids = '<p class="note">No image grids (see warnings).</p>'
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p class='note'>Variance of Gradients (Agarwal, D'souza &amp; Hooker, CVPR 2022). "
        "All numbers are in <code>report.json</code> beside this page.</p>",
        "<nav class='note'>" + " · ".join(f"<a href='#{a}'>{t}</a>" for a, t in NAV) + "</nav>",
        warns,
        "<h2 id='findings'>Findings</h2>", _findings(report),
        "<h2 id='hardest'>The hardest examples</h2>", (_grids(hardest) if hardest else no_grids),
        (_grids(list(heat_grids), "tile heat", HEAT_NOTE) if heat_grids else ""),
        "<h2 id='per-class'>Per class</h2>", _class_summary(report),
        "<h2>Details</h2>",
        _section("summary", "Run", _summary(report)),
        _section("league", "Signal league tables", _league(report)),
        _section("flip", "The early/late flip across windows",
                 "".join(figure(f) for f in flip_figs or []) or '<p class="note">No flags or labels.</p>'),
        _section("error", "Error by VoG", _error_section(report, error_figs)),
        _section("flags", "Flagged examples (Welch t-tests)", _flags_section(report)),
        _section("flag-rules", "The run's flags", flag_quality_html(report.get("flag_quality"))),
        _section("ood", "Out-of-distribution detection", _ood_section(report)),
        _section("agreement", "Agreement with other difficulty signals", _agreement_section(report)),
        _section("figures", "Distributions and data maps", "".join(figure(f) for f in other_figs)),
        _section("examples", "Other image grids: lowest VoG, and per class", _grids(rest) if rest else no_grids),
        _section("classes", "Class moments", _classes(report)),
        _section("conventions", "Conventions", _conventions(report)),
        _section("config", "Configuration",
                 "<pre>" + esc(json.dumps(config, indent=2, sort_keys=True, default=str)) + "</pre>"),
        "</body></html>",
    ]
    return "\n".join(parts)
