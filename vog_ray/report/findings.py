"""The findings a report opens with, generated from ``report.json`` alone: one plain sentence per
result, each with its number and the key of ``report.json`` it comes from, and whether it
reproduces the direction the VoG paper reports (``True`` / ``False``; ``None`` where the paper
makes no claim). :func:`findings` builds them, :func:`findings_lines` prints them (``make demo``,
``vog-ray report``).

The paper's directions (Agarwal et al., CVPR 2022): late in training, memorised / mislabeled
examples have higher VoG and the top VoG decile holds more test errors; early in training both
flip (§4.1, Fig. 4); OoD examples have higher VoG (Table 1). A window holding the run's last
checkpoint is "late"; one starting at the first checkpoint and not holding the last is "early";
other windows carry no expectation.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALPHA", "findings", "findings_lines", "window_stage"]

ALPHA = 0.05   # a Welch test with p below this separates the groups; above it they are "not separated"
VOG_PREFIXES = ("vog_", "z_", "abs_z_")


def window_stage(report: dict[str, Any], window: str) -> str | None:
    """``"late"``, ``"early"`` or None for a window of the run (see the module docstring)."""
    s = report.get("summary") or {}
    idx = (s.get("windows") or {}).get(window)
    K = s.get("num_checkpoints")
    if not idx or not K:
        return None
    if K - 1 in idx:
        return "late"
    return "early" if 0 in idx else None


def _expected(stage: str | None) -> str | None:
    """The sign the paper expects for flagged rows (and the top decile's error) at a stage."""
    return {"late": "higher", "early": "lower"}.get(stage or "")


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.2g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _f2(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _ci(ci: list | None) -> str:
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _finding(text: str, key: str, reproduces: bool | None, value: Any = None) -> dict[str, Any]:
    return {"text": text, "key": key, "reproduces": reproduces, "value": value}


def _window_of(key: str, report: dict[str, Any]) -> str:
    for w in (report.get("summary") or {}).get("windows") or {}:
        if key.startswith(w + "_"):
            return w
    return key.rsplit("_", 1)[0]


def _paper_clause(expected: str | None, stage: str | None, what: str) -> str:
    return (f"; the paper finds {expected} {what} {stage} in training, so this does not reproduce "
            "its direction.")


def flag_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One sentence per flag column, split and key: separated or not, in which direction."""
    out = []
    for col, per_split in (report.get("flags") or {}).items():
        for split, per_key in per_split.items():
            for k, r in per_key.items():
                if r.get("t") is None:
                    continue
                stage = window_stage(report, _window_of(k, report))
                expected = _expected(stage)
                seen = "higher" if r["t"] > 0 else "lower"
                stats = f"Welch t = {r['t']:.1f}, p = {_p(r['p'])}"
                share = (f"{_pct(r.get('top_decile_share'))} of the top decile against a "
                         f"{_pct(r.get('base_rate'))} base rate")
                if r["p"] is not None and r["p"] < ALPHA:
                    text = f"{col} rows in {split} have {seen} {k} z-VoG than the rest ({stats}); they are {share}"
                    ok = None if expected is None else seen == expected
                    text += ("." if ok is None else f", as the paper finds {stage} in training." if ok
                             else _paper_clause(expected, stage, "VoG for them"))
                else:
                    text = f"{col} rows in {split} are not separated from the rest by {k} z-VoG ({stats}; {share})"
                    ok = None if expected is None else False
                    text += "." if ok is None else _paper_clause(expected, stage, "VoG for them")
                out.append(_finding(text, f"flags.{col}.{split}.{k}", ok, r["t"]))
    return out


def error_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per labelled split, for the keys of the ranked key's window: the error of the top vs the
    bottom z-decile, separated when their 95% intervals do not overlap."""
    out = []
    primary = (report.get("summary") or {}).get("primary") or ""
    window = _window_of(primary, report)
    for split, entry in (report.get("error_by_vog") or {}).items():
        for k, res in (entry.get("keys") or {}).items():
            if _window_of(k, report) != window:
                continue
            dec = res.get("deciles") or []
            if len(dec) < 2 or dec[-1].get("error_rate") is None or dec[0].get("error_rate") is None:
                continue
            top, bot = dec[-1], dec[0]
            stage = window_stage(report, window)
            expected = _expected(stage)
            nums = (f"In {split}, the top decile of {k} z-VoG has an error of {top['error_rate']:.2f}"
                    f"{_ci([top['ci_low'], top['ci_high']] if top.get('ci_low') is not None else None)} against "
                    f"{bot['error_rate']:.2f}"
                    f"{_ci([bot['ci_low'], bot['ci_high']] if bot.get('ci_low') is not None else None)} "
                    "in the bottom decile")
            if top.get("ci_low") is not None and top["ci_low"] > bot["ci_high"]:
                seen = "higher"
            elif bot.get("ci_low") is not None and bot["ci_low"] > top["ci_high"]:
                seen = "lower"
            else:
                seen = None
            if seen is None:
                ok = None if expected is None else False
                text = nums + " (95% intervals overlap: not separated)" + (
                    "." if ok is None else _paper_clause(expected, stage, "error at high VoG"))
            else:
                ok = None if expected is None else seen == expected
                text = nums + ("." if ok is None else
                               ": high VoG marks the errors, as in the paper (Fig. 4)." if ok and seen == "higher"
                               else ": as in the paper's early-training curves (Fig. 4)." if ok
                               else _paper_clause(expected, stage, "error at high VoG"))
            out.append(_finding(text, f"error_by_vog.{split}.keys.{k}.deciles", ok, top["error_rate"]))
    return out


def _ood_mean(ood: dict[str, Any], name: str, metric: str = "auroc") -> tuple[float | None, float | None]:
    d = ((ood.get("summary") or {}).get(name) or {}).get(metric) or {}
    return d.get("mean"), d.get("std")


def _pm(m: float | None, s: float | None) -> str:
    return _f2(m) + (f" ± {s:.2f}" if s is not None else "")


def _group_ci(report: dict[str, Any], group: str, name: str) -> list | None:
    """The bootstrap interval of a score's AUROC in an OoD group's league table, if there is one."""
    t = ((((report.get("signals") or {}).get("ood") or {}).get("groups") or {}).get(group)) or {}
    row = next((r for r in t.get("table") or [] if r.get("signal") == name), None)
    return (row or {}).get("auroc_ci")


def _auroc_ci(auroc: float, ci: list | None) -> str:
    return f"{auroc:.2f}{_ci(ci)}"


def _groups_key(items: list, name: str) -> str:
    """The report.json key of a score's AUROC in several OoD groups: ``ood.groups.{a,b}.<name>.auroc``."""
    return "ood.groups.{" + ",".join(g for g, _, _ in items) + "}." + name + ".auroc"


def _ood_key_findings(report: dict[str, Any], ood: dict[str, Any], k: str) -> list[dict[str, Any]]:
    """Raw VoG of key ``k``: its mean AUROC beside max-softmax, then the groups where OoD has lower
    VoG (the interval below 0.5; without intervals, the AUROC) and those it does not separate."""
    out = []
    ind, n, raw = ood["in_distribution"], len(ood.get("group_names") or []), f"vog_{k}"
    m, s = _ood_mean(ood, raw)
    if m is None:
        return out
    base = _ood_mean(ood, "max_softmax")
    text = (f"Across {n} OoD groups (each against {ind}), raw {k} VoG has a mean AUROC of {_pm(m, s)}"
            + (f", max-softmax {_pm(*base)}" if base[0] is not None else "")
            + (", so VoG separates OoD in the paper's direction on average." if m > 0.5 else
               ", so on average OoD does not have the higher VoG the paper reports (Table 1)."))
    out.append(_finding(text, f"ood.summary.{raw}.auroc", m > 0.5, m))
    groups = ood.get("groups") or {}
    two = next((c for c in (f"abs_z_vs_{ind}_{k}", f"abs_z_{k}") if any(c in r for r in groups.values())), None)
    lower, unseparated = [], []
    for g, row in groups.items():
        a = (row.get(raw) or {}).get("auroc")
        if a is None:
            continue
        ci = _group_ci(report, g, raw)
        if (ci[1] < 0.5) if ci else a < 0.5:
            lower.append((g, a, ci))
        elif ci and ci[0] <= 0.5:
            unseparated.append((g, a, ci))

    def two_sided(items: list) -> str:
        if two is None:
            return "."
        return (f"; the two-sided {two} gives "
                + ", ".join(_f2((groups[g].get(two) or {}).get("auroc")) for g, _, _ in items) + ".")

    if lower:
        text = (f"On {', '.join(g for g, _, _ in lower)}, OoD images have lower raw {k} VoG than {ind} (AUROC "
                + ", ".join(_auroc_ci(a, ci) for _, a, ci in lower)
                + "): the paper's direction (higher VoG = OoD) does not hold there" + two_sided(lower))
        out.append(_finding(text, _groups_key(lower, raw), False, [a for _, a, _ in lower]))
    if unseparated:
        text = (f"On {', '.join(g for g, _, _ in unseparated)}, raw {k} VoG does not separate OoD images from "
                f"{ind} (AUROC " + ", ".join(_auroc_ci(a, ci) for _, a, ci in unseparated)
                + ", intervals holding 0.5): the paper's direction is not seen there" + two_sided(unseparated))
        out.append(_finding(text, _groups_key(unseparated, raw), False, [a for _, a, _ in unseparated]))
    return out


def ood_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """For each key of the ranked key's window, raw VoG against max-softmax and the groups where it
    does not reproduce the paper; for the ranked key, the other normalisations and the paper's
    AUPR-Out convention."""
    ood = report.get("ood")
    if not ood or not ood.get("summary"):
        return []
    out = []
    p = (report.get("summary") or {}).get("primary")
    ind, raw = ood["in_distribution"], f"vog_{p}"
    window = _window_of(p, report)
    keys = [k[4:] for k in ood["summary"] if k.startswith("vog_") and _window_of(k[4:], report) == window]
    for k in sorted(keys, key=lambda k: k != p):       # the ranked key first
        out += _ood_key_findings(report, ood, k)
    others = [(f"z_vs_{ind}_{p}", f"z against {ind}"), (f"abs_z_vs_{ind}_{p}", f"|z| against {ind}"),
              (f"z_{p}", "z as stored"), (f"abs_z_{p}", "|z| as stored"), (f"z_own_{p}", "per-split z")]
    parts = [(label, name, _ood_mean(ood, name)) for name, label in others if _ood_mean(ood, name)[0] is not None]
    if parts:
        text = (f"For {p}, mean AUROC of " + "; ".join(f"{label} ({name}) {_pm(*ms)}" for label, name, ms in parts)
                + ".")
        out.append(_finding(text, f"ood.summary.{parts[0][1]}.auroc", None, parts[0][2][0]))
    pm, _ = _ood_mean(ood, raw, "aupr_out_paper")
    om, _ = _ood_mean(ood, raw, "aupr_out")
    if pm is not None and om is not None:
        out.append(_finding(
            f"With the paper's convention (VoG × −1, Sec. 4.2) raw {p} VoG has a mean AUPR-Out of {pm:.2f}, "
            f"against {om:.2f} with this report's orientation (higher VoG = OoD).",
            f"ood.summary.{raw}.aupr_out_paper", None, pm))
    return out


def _is_vog(name: str) -> bool:
    return name.startswith(VOG_PREFIXES)


def _league_sentence(target: str, table: dict[str, Any]) -> str | None:
    rows = [r for r in table.get("table") or [] if r.get("auroc") is not None]
    if not rows:
        return None
    best = rows[0]
    text = (f"The best signal for {target} is {best['signal']} (AUROC {best['auroc']:.2f}{_ci(best.get('auroc_ci'))}, "
            f"AUPR {best['aupr']:.2f} against a base rate of {best['aupr_base_rate']:.2f})")
    vog = next((r for r in rows if _is_vog(r["signal"])), None)
    if vog is None or vog is best:
        return text + "."
    return text + (f"; the best VoG score, {vog['signal']}, is number {vog['place']} of {len(rows)} "
                   f"at AUROC {vog['auroc']:.2f}{_ci(vog.get('auroc_ci'))}.")


def league_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The best signal of each flag column's table and of the pooled OoD table, with VoG's place."""
    sig = report.get("signals") or {}
    out = []
    for col, per_split in (sig.get("flags") or {}).items():
        for split, table in per_split.items():
            text = _league_sentence(f"finding {col} rows in {split}", table)
            if text:
                out.append(_finding(text, f"signals.flags.{col}.{split}", None, table["table"][0]["auroc"]))
    pooled = (sig.get("ood") or {}).get("all")
    if pooled:
        ind = (report.get("ood") or {}).get("in_distribution", "in-distribution")
        text = _league_sentence(f"telling OoD from {ind} (all groups pooled)", pooled)
        if text:
            out.append(_finding(text, "signals.ood.all", None, pooled["table"][0]["auroc"]))
    return out


def normalisation_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    s = report.get("summary") or {}
    ref = s.get("normalize_against")
    if not ref:
        return []
    missing = s.get("rows_without_reference") or {}
    n = sum(int(v) for per in missing.values() for v in per.values())
    text = (f"Every split's z is normalised against the class moments of split {ref} "
            f"(vog.normalize_against): z says how unusual an example is for {ref}")
    text += (f"; {n} rows of classes {ref} lacks have no z and are left out." if n else ".")
    return [_finding(text, "summary.normalize_against", None, ref)]


def findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every finding of a report (a ``report.json`` dict), in reading order."""
    return (normalisation_findings(report) + flag_findings(report) + error_findings(report)
            + ood_findings(report) + league_findings(report))


def findings_lines(report: dict[str, Any]) -> list[str]:
    """The findings as printed: one line each, the key in brackets; results that do not reproduce
    the paper's direction are marked."""
    items = report.get("findings")
    items = findings(report) if items is None else items
    lines = ["Findings:"]
    for f in items:
        mark = "  ✗ " if f.get("reproduces") is False else "  - "
        lines.append(f"{mark}{f['text']} [{f['key']}]")
    if not items:
        lines.append("  (none: the report has no flag columns, labels or OoD groups to test)")
    return lines
