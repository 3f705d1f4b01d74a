"""The invariants of a published run, checked on the per-file summaries (:mod:`.summaries`) and
the source summaries (``data.carried``): each check returns the problems it found, every one
naming its invariant first (``ranks: …``). Imports neither torch nor Ray.

1. ``rows`` — per split, rows in (manifest, and the source when it is read) = scored + rejected,
   and the manifest's counts are the tables' counts;
2. ``ranks`` / ``class ranks`` — a permutation of 1..n per split (per split and class) of the
   ranked rows;
3. ``rank order`` — rank 1 is the highest score, ties broken by id;
4. ``finite`` — every published VoG, z and score is a finite number; ``unreferenced`` — with
   ``vog.normalize_against``, the rows of a class the reference split lacks (and only they) have
   NaN z and score and null ranks;
5. ``z`` / ``score`` / ``percentile`` / ``decile`` — consistent with ``classes.parquet`` (the
   reference split's class moments, when there is one) and the ranks;
6. ``classes`` — ``classes.parquet`` holds the count, error rate, mean and std of the scored rows;
7. ``carried columns`` — the types and values of the source; ``ids`` — the rows are the source's rows.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pyarrow as pa

from ..core.classes import exact_class_table
from ..core.digest import add_digests

__all__ = ["check_rows", "check_ranks", "check_row_rules", "check_classes", "check_source", "CLASS_RTOL"]

CLASS_RTOL = 1e-12  # classes.parquet is computed from the same exact sums: equal up to the last bit


def _sum_rows(parts: Iterable[dict[str, Any]], what: str = "rows") -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for s, n in p.get(what, p.get("rows", {}) if what == "ranked" else {}).items():
            out[s] = out.get(s, 0) + int(n)
    return out


def check_rows(manifest: dict[str, Any], scores: list[dict], rejected: list[dict]) -> list[str]:
    """Rows in = scored + rejected per split, and the manifest's counts are the tables'."""
    out = []
    for part in scores + rejected:
        if part.get("missing"):
            out.append(f"columns: {part['file']} lacks column(s) {part['missing']}")
    scored, rej = _sum_rows(scores), _sum_rows(rejected)
    splits = manifest.get("splits") or {}
    for s in sorted(set(splits) | set(scored) | set(rej)):
        m = splits.get(s)
        if m is None:
            out.append(f"rows: the tables hold rows of split {s!r}, which the manifest does not list")
            continue
        n_s, n_r = scored.get(s, 0), rej.get(s, 0)
        if m.get("rows_in") != n_s + n_r:
            out.append(f"rows: split {s!r}: {m.get('rows_in')} rows in != {n_s} scored + {n_r} rejected in the tables")
        if m.get("rows_scored") != n_s or m.get("rows_rejected") != n_r:
            out.append(f"rows: split {s!r}: the manifest says {m.get('rows_scored')} scored / {m.get('rows_rejected')} "
                       f"rejected, the tables hold {n_s} / {n_r}")
    tot = manifest.get("rows") or {}
    if (tot.get("scored"), tot.get("rejected")) != (sum(scored.values()), sum(rej.values())) or \
            tot.get("in") != sum(v.get("rows_in", 0) for v in splits.values()):
        out.append(f"rows: the manifest's totals {tot} do not add up to its splits and tables")
    return out


def _tiles(runs: list[list], n: int) -> str | None:
    """Whether intervals ``[a, b, …]`` tile 1..n exactly; else what is wrong."""
    runs = sorted(runs, key=lambda r: r[0])
    expect = 1
    for r in runs:
        if r[0] != expect:
            return f"rank {expect} is missing" if r[0] > expect else f"rank {r[0]} appears twice"
        expect = r[1] + 1
    if expect != n + 1:
        return f"ranks run to {expect - 1}, not to the {n} scored rows" if runs else f"no rank for {n} rows"
    return None


def check_ranks(scores: list[dict]) -> list[str]:
    """Ranks a permutation of 1..n per split, in score order across the files; class ranks a
    permutation of 1..n_c per split and class (n_c from the tables' own class counts). n counts
    the ranked rows: with ``vog.normalize_against``, rows of a class the reference split lacks
    have no rank."""
    out = []
    rows = _sum_rows(scores, "ranked")
    by_split: dict[str, list[list]] = {}
    for p in scores:
        for s, runs in p.get("ranks", {}).items():
            by_split.setdefault(s, []).extend(runs)
    for s, runs in sorted(by_split.items()):
        why = _tiles(runs, rows.get(s, 0))
        if why:
            out.append(f"ranks: split {s!r}: not a permutation of 1..{rows.get(s, 0)} ({why})")
            continue
        runs = sorted(runs, key=lambda r: r[0])
        for a, b in zip(runs, runs[1:]):  # a's last row, then b's first row
            if b[2] > a[4] or (b[2] == a[4] and b[3] < a[5]):
                out.append(f"rank order: split {s!r}: rank {b[0]} ({b[3]!r}, score {b[2]}) should not follow "
                           f"rank {a[1]} ({a[5]!r}, score {a[4]})")
                break
    counts: dict[str, int] = {}
    cruns: dict[str, list[list]] = {}
    for p in scores:
        for key, runs in p.get("class_ranks", {}).items():
            cruns.setdefault(key, []).extend(runs)
        for r in p.get("pass1", []):
            k = f"{r['split']}\x1f{r['class']}"
            counts[k] = counts.get(k, 0) + int(r["n"])
    for key, runs in sorted(cruns.items()):
        why = _tiles(runs, counts.get(key, 0))
        if why:
            s, c = key.split("\x1f")
            out.append(f"class ranks: split {s!r}, class {c}: not a permutation of 1..{counts.get(key, 0)} ({why})")
    return out


def check_row_rules(parts: list[dict]) -> list[str]:
    """The per-row rules the file summaries counted (finite values, z, score, percentile …)."""
    merged: dict[str, dict[str, Any]] = {}
    for p in parts:
        for rule, e in p.get("problems", {}).items():
            m = merged.setdefault(rule, {"n": 0, "ids": []})
            m["n"] += e["n"]
            m["ids"].extend(e["ids"][:3 - len(m["ids"])])
    out = []
    for rule, e in sorted(merged.items()):
        head, _, what = rule.partition(":")
        name = "rejected" if head == "reason" else head
        ex = ", ".join(repr(i) for i in e["ids"])
        detail = {
            "finite": f"{e['n']} value(s) of {what} are not finite numbers (rows {ex})",
            "score": f"{e['n']} row(s) whose score is not z_<primary> (rows {ex})",
            "percentile": f"{e['n']} row(s) whose percentile does not follow from the rank (rows {ex})",
            "decile": f"{e['n']} row(s) whose decile does not follow from the rank (rows {ex})",
            "z": (f"{e['n']} row(s) whose class is not in classes.parquet (rows {ex})" if what == "no-class" else
                  f"{e['n']} z_{what} value(s) differ from (vog - class mean) / class std (rows {ex})"),
            "ranks": f"rank given twice in split {what.split(':', 1)[-1]!r} (rows {ex})",
            "rank order": f"split {what!r}: {e['n']} row(s) out of score order (rows {ex})",
            "class ranks": f"{what.split(':', 1)[-1]}: {ex}",
            "classes": f"scored classes missing from classes.parquet: {ex}",
            "reason": f"{e['n']} rejected row(s) without a reason (rows {ex})",
            "unreferenced": f"{e['n']} row(s) of a class the reference split lacks carry a z, score or rank "
                            f"(rows {ex})",
        }.get(head, f"{e['n']} row(s) ({ex})")
        out.append(f"{name}: {detail}")
    return out


def _close(a: Any, b: Any, rtol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rtol * max(1.0, abs(b))


def check_classes(scores: list[dict], classes: pa.Table, keys: list[str]) -> list[str]:
    """``classes.parquet`` = the count, error rate, mean and std of each (split, class) of the
    scored rows, recomputed from exact sums of the score files."""
    pass1 = [r for p in scores for r in p.get("pass1", [])]
    pass2 = [r for p in scores for r in p.get("pass2", [])]
    if not pass1:
        return []
    want = {(r["split"], r["class"]): r for r in exact_class_table(pass1, pass2, keys).to_pylist()}
    got = {(r["split"], r["class"]): r for r in classes.to_pylist()}
    out = []
    if set(want) != set(got):
        extra, lost = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        out.append(f"classes: classes.parquet lists (split, class) {extra[:3]} without scored rows"
                   if extra else f"classes: scored (split, class) {lost[:3]} are missing from classes.parquet")
    for g in sorted(set(want) & set(got)):
        w, h = want[g], got[g]
        cols = ["count", "error_rate"] + [f"{p}_{k}" for k in keys for p in ("mean", "std")]
        bad = [c for c in cols if not _close(h.get(c), w.get(c), CLASS_RTOL)]
        bad += [f"degenerate_{k}" for k in keys if bool(h.get(f"degenerate_{k}")) != bool(w.get(f"degenerate_{k}"))]
        if bad:
            c = bad[0]
            out.append(f"classes: split {g[0]!r}, class {g[1]}: {c} is {h.get(c)} in classes.parquet, "
                       f"{w.get(c)} from the scored rows" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return out


def check_source(source: dict[str, dict[str, Any]], scores: list[dict], rejected: list[dict],
                 manifest: dict[str, Any], carried: list[str]) -> list[str]:
    """The published rows are the source's rows (ids), with the source's carried values and types."""
    out = []
    splits = manifest.get("splits") or {}
    for s, src in sorted(source.items()):
        if splits.get(s, {}).get("rows_in") != src["rows"]:
            out.append(f"rows: split {s!r}: the source holds {src['rows']} rows, the manifest says "
                       f"{splits.get(s, {}).get('rows_in')} in")
        ids = add_digests(*[p.get("ids", {}).get(s, 0) for p in scores + rejected])
        if ids != src["ids"]:
            out.append(f"ids: the scored and rejected rows of split {s!r} are not the rows of its source "
                       "(an id is missing, added or repeated)")
            continue
        for c in carried:
            if c not in src["values"]:
                continue
            got = add_digests(*[p.get("values", {}).get(s, {}).get(c, 0) for p in scores + rejected])
            if got != src["values"][c]:
                out.append(f"carried columns: the values of {c!r} in split {s!r} differ from its source")
        for c, t in src.get("other_types", {}).items():
            out.append(f"carried columns: {c!r} is {src['types'][c]} in some files of split {s!r}, {t} in others")
    want: dict[str, str] = {}
    for src in source.values():
        for c, t in src["types"].items():
            want.setdefault(c, t)
    for p in scores + rejected:
        for c, t in p.get("types", {}).items():
            if c in want and t != want[c] and c not in p.get("null_carried", []):
                out.append(f"carried columns: {c!r} is {t} in {p['file']}, {want[c]} in the source")
                break
    return out
