"""``compare_runs``: how much two audits agree, example by example (joined by split and id).

Per split and per key (``window_target``) present in both runs: Spearman and Kendall (tau-b)
correlation of z, overlap of the top-k examples by z (k = 1% and 10% of the joined rows;
overlap = |top-k of A ∩ top-k of B| / k; ties broken by id as in the score table), and the mean
absolute difference of z. Only the columns ``id``, ``split`` and ``z_*`` are read.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats as _st

from ..runs import Run
from ..storage import StorageOptions
from .build import open_published
from .common import ReportError, atomic_write, clean
from .frame import score_schema
from .stats import rank_order

__all__ = ["compare_runs", "TOP_FRACTIONS", "format_comparison"]

TOP_FRACTIONS = (0.01, 0.10)


def _read(run: Run, keys: list[str]) -> pa.Table:
    t = run.scores(columns=["id", "split"] + [f"z_{k}" for k in keys])
    return t.filter(pc.is_valid(t.column(f"z_{keys[0]}")))


def _topk_overlap(za: np.ndarray, zb: np.ndarray, ids: pa.Array, frac: float) -> dict[str, Any]:
    n = len(za)
    k = max(1, int(math.ceil(frac * n)))
    ta = rank_order(za, ids)[:k]
    tb = rank_order(zb, ids)[:k]
    inter = len(np.intersect1d(ta, tb))
    return {"k": k, "overlap": inter / k, "shared": inter}


def compare_runs(run_a: str | Run, run_b: str | Run, out: str | None = None,
                 storage: StorageOptions | None = None,
                 storage_b: StorageOptions | None = None) -> dict[str, Any]:
    """Compare two published runs; write ``compare.json`` to ``out`` (a file URL) when given.

    Returns the comparison as a dict, with ``text`` holding a printable table.
    """
    a = open_published(run_a, storage)
    b = open_published(run_b, storage_b if storage_b is not None else storage)
    sa, sb = set(score_schema(a).names), set(score_schema(b).names)
    keys_a = [k for k in a.manifest["keys"] if f"z_{k}" in sa]
    keys_b = [k for k in b.manifest["keys"] if f"z_{k}" in sb]
    keys = [k for k in keys_a if k in keys_b]
    if not keys:
        raise ReportError(f"runs {a.run_id!r} and {b.run_id!r} share no VoG key "
                          f"({keys_a} vs {keys_b})")
    ta, tb = _read(a, keys), _read(b, keys)
    ren = lambda t, p: t.rename_columns([c if c in ("id", "split") else p + c for c in t.column_names])  # noqa: E731
    j = ren(ta, "a_").join(ren(tb, "b_"), keys=["split", "id"], join_type="inner")
    splits_a = set(ta.column("split").to_pylist())
    splits_b = set(tb.column("split").to_pylist())
    result: dict[str, Any] = {
        "run_a": {"run_id": a.run_id, "url": a.url, "rows": ta.num_rows, "primary": a.manifest.get("primary")},
        "run_b": {"run_id": b.run_id, "url": b.url, "rows": tb.num_rows, "primary": b.manifest.get("primary")},
        "keys": keys,
        "keys_only_in_a": [k for k in keys_a if k not in keys_b],
        "keys_only_in_b": [k for k in keys_b if k not in keys_a],
        "splits_only_in_a": sorted(splits_a - splits_b),
        "splits_only_in_b": sorted(splits_b - splits_a),
        "conventions": {
            "join": "inner join on (split, id); rows with a null z are left out",
            "kendall": "Kendall tau-b (scipy.stats.kendalltau)",
            "top_k": "k = ceil(f * n_joined) for f in 1%, 10%; overlap = |top-k A ∩ top-k B| / k; "
                     "top-k by z, highest first, ties by id",
            "mean_abs_dz": "mean over joined rows of |z_A - z_B|",
        },
        "splits": {},
    }
    if j.num_rows == 0:
        raise ReportError(f"runs {a.run_id!r} and {b.run_id!r} share no example (joined on split and id)")
    jsplit = j.column("split").to_numpy(zero_copy_only=False).astype(str)
    for s in sorted(set(jsplit.tolist())):
        rows = np.flatnonzero(jsplit == s)
        sub = j.take(pa.array(rows))
        ids = sub.column("id").combine_chunks()
        n_a = int(pc.sum(pc.equal(ta.column("split"), s)).as_py() or 0)
        n_b = int(pc.sum(pc.equal(tb.column("split"), s)).as_py() or 0)
        entry: dict[str, Any] = {"n_a": n_a, "n_b": n_b, "n_joined": len(rows),
                                 "only_in_a": n_a - len(rows), "only_in_b": n_b - len(rows), "keys": {}}
        for k in keys:
            za = sub.column(f"a_z_{k}").to_numpy().astype(np.float64)
            zb = sub.column(f"b_z_{k}").to_numpy().astype(np.float64)
            d: dict[str, Any] = {"spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
            if len(za) >= 2 and np.ptp(za) > 0 and np.ptp(zb) > 0:
                sp = _st.spearmanr(za, zb)
                kt = _st.kendalltau(za, zb)
                d.update({"spearman": float(sp.statistic), "spearman_p": float(sp.pvalue),
                          "kendall": float(kt.statistic), "kendall_p": float(kt.pvalue)})
            for f in TOP_FRACTIONS:
                d[f"top_{int(round(f * 100))}pct"] = _topk_overlap(za, zb, ids, f)
            d["mean_abs_dz"] = float(np.mean(np.abs(za - zb)))
            entry["keys"][k] = d
        result["splits"][s] = entry
    result = clean(result)
    result["text"] = format_comparison(result)
    if out:
        atomic_write(out, json.dumps(result, indent=2, sort_keys=True, allow_nan=False).encode(), storage)
        result["file"] = out
    return result


def format_comparison(res: dict[str, Any]) -> str:
    """A plain-text table of a comparison (what ``vog-ray compare`` prints)."""
    def f(x: Any, d: int = 3) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    head = ["split", "key", "n", "spearman", "kendall", "top1%", "top10%", "mean|dz|"]
    rows = []
    for s, e in res["splits"].items():
        for k, d in e["keys"].items():
            rows.append([s, k, str(e["n_joined"]), f(d["spearman"]), f(d["kendall"]),
                         f(d["top_1pct"]["overlap"]), f(d["top_10pct"]["overlap"]), f(d["mean_abs_dz"])])
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    out = [f"A: {res['run_a']['run_id']} ({res['run_a']['url']})",
           f"B: {res['run_b']['run_id']} ({res['run_b']['url']})", line(head), line(["-" * x for x in w])]
    out += [line(r) for r in rows]
    for name in ("keys_only_in_a", "keys_only_in_b", "splits_only_in_a", "splits_only_in_b"):
        if res.get(name):
            out.append(f"{name.replace('_', ' ')}: {', '.join(res[name])}")
    for s, e in res["splits"].items():
        if e["only_in_a"] or e["only_in_b"]:
            out.append(f"split {s}: {e['only_in_a']} ids only in A, {e['only_in_b']} only in B")
    return "\n".join(out)
