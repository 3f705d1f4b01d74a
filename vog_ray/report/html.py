"""``report.html``: one self-contained page (inline CSS, images as base64 data URIs, no script,
no external request), readable offline. Every string that comes from the run — class names, ids,
split names, URLs, config values — goes through :func:`esc` (``html.escape``)."""

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
    out = [f'<p>In-distribution split <b>{esc(o["in_distribution"])}</b> (n = {fmt(o["n_in"])}); '
           f'OoD groups: {esc(", ".join(o["group_names"]))}.</p>']
    names = list(o["summary"])
    rows = [[esc(n), esc(o["scores"][n])] + [_pm(o["summary"][n][m]) for m in METRICS] for n in names]
    out.append("<h3>Mean ± std across OoD groups (paper Table 1 layout)</h3>")
    out.append(table(["score", "orientation (higher = more OoD)", "AUROC", "AUPR-In", "AUPR-Out",
                      "FPR@95%TPR"], rows, left=2))
    out.append("<h3>AUROC per OoD group</h3>")
    groups = o["group_names"]
    rows = [[esc(n)] + [fmt(o["groups"][g][n]["auroc"]) for g in groups] for n in names]
    out.append(table(["score"] + list(groups), rows))
    det = []
    for g in groups:
        rows = [[esc(n)] + [fmt(o["groups"][g][n][m]) for m in METRICS]
                + [fmt(o["groups"][g][n]["n_ood"])] for n in names]
        det.append(f"<h4>{esc(g)}</h4>" + table(["score", "AUROC", "AUPR-In", "AUPR-Out", "FPR@95%TPR",
                                                 "n OoD"], rows))
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
                       "<code>figures/grid_*.png</code>.") -> str:
    out = [f"<p class='note'>{note}</p>"]
    for g in grids:
        out.append(f"<h3>{esc(g['title'])}</h3>")
        tiles = []
        for t in g["tiles"]:
            cap = f"{esc(t['id'])}<br>label {esc(t['label'])} · pred {esc(t['pred'])}<br>z {fmt(t['z'], 2)}"
            img = (f'<img alt="{esc(t["id"])}" src="{data_uri(t["png"])}">' if t.get("png")
                   else '<span class="missing">missing</span>')
            tiles.append(f'<figure class="{tile_class}" data-id="{esc(t["id"])}">{img}<figcaption>{cap}</figcaption></figure>')
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


def render(report: dict[str, Any], *, error_figs: dict[str, list[dict]], other_figs: list[dict],
           grids: list[dict[str, Any]], config: dict[str, Any], heat_grids: Sequence[dict[str, Any]] = ()) -> str:
    from .flagged import flag_quality_html

    title = f"VoG audit report — {report['summary']['run_id']}"
    warns = "".join(f'<div class="warn">{esc(w)}</div>' for w in report["warnings"])
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p class='note'>Variance of Gradients (Agarwal, D'souza &amp; Hooker, CVPR 2022). "
        "All numbers are in <code>report.json</code> beside this page.</p>",
        "<nav class='note'>" + " · ".join(
            f"<a href='#{a}'>{t}</a>" for a, t in (
                ("summary", "Summary"), ("error", "Error by VoG"), ("flags", "Flagged examples"),
                ("ood", "OoD"), ("agreement", "Agreement"), ("figures", "Distributions"),
                ("examples", "Examples"), ("classes", "Classes"), ("conventions", "Conventions"),
                ("config", "Config"))) + "</nav>",
        warns,
        "<h2 id='summary'>Summary</h2>", _summary(report),
        "<h2 id='error'>Error by VoG</h2>", _error_section(report, error_figs),
        "<h2 id='flags'>Flagged examples</h2>", _flags_section(report),
        "<h3 id='flag-rules'>The run's flags</h3>", flag_quality_html(report.get("flag_quality")),
        "<h2 id='ood'>Out-of-distribution detection</h2>", _ood_section(report),
        "<h2 id='agreement'>Agreement with other difficulty signals</h2>", _agreement_section(report),
        "<h2 id='figures'>Distributions and data maps</h2>", "".join(figure(f) for f in other_figs),
        "<h2 id='examples'>Lowest- and highest-VoG examples</h2>",
        (_grids(grids) if grids else '<p class="note">No image grids (see warnings).</p>'),
        (_grids(list(heat_grids), "tile heat", HEAT_NOTE) if heat_grids else ""),
        "<h2 id='classes'>Classes</h2>", _classes(report),
        "<h2 id='conventions'>Conventions</h2>", _conventions(report),
        "<h2 id='config'>Configuration</h2>",
        "<details><summary>audit config</summary><pre>"
        + esc(json.dumps(config, indent=2, sort_keys=True, default=str)) + "</pre></details>",
        "</body></html>",
    ]
    return "\n".join(parts)
