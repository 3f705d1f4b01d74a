"""A short plain-text summary of a report (what ``make demo`` prints after the findings), read from
``report.json``: :func:`summary_lines` (flag tests, error by decile, the OoD table) and
:func:`league_lines` (the signal league tables of the flag columns)."""

from __future__ import annotations

from typing import Any

__all__ = ["summary_lines", "league_lines"]


def _f(x: Any, d: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and (abs(x) < 1e-3 and x != 0):
        return f"{x:.1e}"
    return f"{x:.{d}f}" if isinstance(x, float) else str(x)


def summary_lines(report: dict[str, Any], *, window: str = "late", ood_scores: tuple[str, ...] = ("max_softmax",),
                  flag: str | None = None, split_for_flags: str | None = None) -> list[str]:
    """Lines: the flag t-tests, top vs bottom VoG decile error, and the OoD table."""
    out: list[str] = []
    flags = report.get("flags") or {}
    for col, per_split in flags.items():
        if flag and col != flag:
            continue
        for split, per_key in per_split.items():
            if split_for_flags and split != split_for_flags:
                continue
            out.append(f"Flagged examples ({col}) in {split}: Welch t-test of z-VoG, flagged vs rest")
            out.append(f"  {'window_target':<16} {'t':>8} {'p':>10} {'mean z flagged':>15} {'mean z rest':>12} "
                       f"{'top-decile share':>17} {'base rate':>10}")
            for key, r in per_key.items():
                out.append(f"  {key:<16} {_f(r.get('t'), 2):>8} {_f(r.get('p')):>10} {_f(r.get('mean_flagged')):>15} "
                           f"{_f(r.get('mean_rest')):>12} {_f(r.get('top_decile_share')):>17} {_f(r.get('base_rate')):>10}")
    err = report.get("error_by_vog") or {}
    for split, entry in err.items():
        keys = entry.get("keys") or {}
        sel = {k: v for k, v in keys.items() if k.startswith(window + "_")}
        if not sel:
            continue
        overall = (entry.get("overall") or {}).get("error_rate")
        out.append(f"Error of the last checkpoint by VoG decile in {split} ({window} window; overall {_f(overall)}):")
        for key, res in sel.items():
            dec = res.get("deciles") or []
            if not dec:
                continue
            bottom, top = dec[0], dec[-1]
            out.append(f"  {key:<16} top decile {_f(top.get('error_rate'))} "
                       f"[{_f(top.get('ci_low'))}, {_f(top.get('ci_high'))}]   bottom decile "
                       f"{_f(bottom.get('error_rate'))} [{_f(bottom.get('ci_low'))}, {_f(bottom.get('ci_high'))}]")
    ood = report.get("ood")
    if ood:
        groups = ood.get("group_names") or list((ood.get("groups") or {}).keys())
        vog_keys = [k for k in (next(iter(ood["groups"].values())) if ood.get("groups") else {})
                    if k.startswith(f"vog_{window}_")]
        cols = vog_keys + [s for s in ood_scores]
        out.append(f"OoD ({ood.get('in_distribution')} vs each group; OoD = positive; AUROC / AUPR-Out):")
        out.append("  " + f"{'group':<14}" + "".join(f"{c:>24}" for c in cols))
        for g in groups:
            row = ood["groups"][g]
            out.append("  " + f"{g:<14}" + "".join(
                f"{_f(row.get(c, {}).get('auroc')) + ' / ' + _f(row.get(c, {}).get('aupr_out')):>24}" for c in cols))
        summ = ood.get("summary") or {}

        def ms(c: str, m: str) -> str:
            d = (summ.get(c) or {}).get(m) or {}
            return f"{_f(d.get('mean'))}±{_f(d.get('std'), 2)}"

        out.append("  " + f"{'mean ± std':<14}" + "".join(f"{ms(c, 'auroc') + ' / ' + ms(c, 'aupr_out'):>24}" for c in cols))
    return out


def _ci(ci: Any) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def league_lines(report: dict[str, Any], *, ood: bool = False, top: int | None = None) -> list[str]:
    """The signal league table of every flag column (and with ``ood`` the pooled OoD table), best
    first; ``top``: only the first rows."""
    sig = report.get("signals") or {}
    tables = [(f"finding {col} in {split}", t) for col, per in (sig.get("flags") or {}).items()
              for split, t in per.items()]
    if ood and sig.get("ood"):
        tables.append(("OoD, all groups pooled", sig["ood"]["all"]))
    out: list[str] = []
    for title, t in tables:
        out.append(f"Signal league, {title} ({t['n_positive']} of {t['n']} rows; AUROC / AUPR, "
                   f"95% intervals from {t['resamples']} bootstrap resamples):")
        out.append(f"  {'#':>3} {'signal':<26} {'AUROC':>6} {'':<17} {'AUPR':>6} {'':<17}")
        for r in t["table"][:top]:
            out.append(f"  {r['place']:>3} {r['signal']:<26} {_f(r['auroc']):>6} {_ci(r.get('auroc_ci')):<17} "
                       f"{_f(r['aupr']):>6} {_ci(r.get('aupr_ci')):<17}")
    return out
