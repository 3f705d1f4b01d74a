"""Per-file summaries of a run's tables for the run validator: a score or rejected Parquet file
is streamed in record batches and reduced to what the invariants need — counts per split, rank
intervals with the (rank, score, id) at their ends, exact class sums, digests of ids and carried
values, and the first rows that break a per-row rule. Each summary is small whatever the file
holds; the validator combines them (:mod:`.invariants`). Imports neither torch nor Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.classes import classes_of, exact_class_sums
from ..core.digest import add_digests, row_digest
from ..core.table import vog_col, z_col
from ..storage import StorageOptions, resolve

__all__ = ["RunContext", "summarize_scores", "summarize_rejected", "intervals", "BATCH_ROWS", "Z_RTOL"]

BATCH_ROWS = 65_536  # rows read at a time: a summary's memory is bounded by this, not by the file
Z_RTOL = 1e-9  # the reduce computes z with the same expression; slack only for a platform that fuses it
EXAMPLES = 3  # offending ids kept per broken rule (the message names a few, the count says how many)


@dataclass
class RunContext:
    """What every file summary needs to know about the run (small, picklable)."""

    keys: list[str]
    primary: str
    normalization: str
    carried: list[str]
    split_sizes: dict[str, int]                      # scored rows per split (manifest), for percentiles
    lookup: dict[str, dict[str, list[float]]]        # classes.parquet: split -> mean_/std_<key> by class
    means: dict[str, list] = field(default_factory=dict)  # classes.parquet means, as exact_class_sums takes them
    reference: str | None = None  # vog.normalize_against: every split's z uses this split's class moments

    @property
    def score_columns(self) -> list[str]:
        return (["id", "split", "target_label", "correct", "rank", "class_rank", "percentile", "decile", "score"]
                + [vog_col(k) for k in self.keys] + [z_col(k) for k in self.keys])


class _Problems:
    """Per-rule counts of offending rows and the first few ids."""

    def __init__(self) -> None:
        self.d: dict[str, dict[str, Any]] = {}

    def add(self, rule: str, ids: pa.Array | list, mask: np.ndarray | None = None) -> None:
        """Rows ``ids`` (where ``mask``) break ``rule``; ids stay Arrow (no Python string per row)."""
        if mask is not None:
            mask = np.asarray(mask, bool)
            n = int(mask.sum())
            if n == 0:
                return
            ids = ids.filter(pa.array(mask)) if isinstance(ids, (pa.Array, pa.ChunkedArray)) else \
                [i for i, m in zip(ids, mask) if m]
        else:
            n = len(ids)
            if n == 0:
                return
        e = self.d.setdefault(rule, {"n": 0, "ids": []})
        e["n"] += n
        room = EXAMPLES - len(e["ids"])
        if room > 0:
            head = ids.slice(0, room).to_pylist() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids[:room]
            e["ids"].extend(str(i) for i in head)


def _floats(col: Any) -> np.ndarray:
    return pc.fill_null(pc.cast(col, pa.float64()), float("nan")).to_numpy(zero_copy_only=False)


def intervals(ranks: np.ndarray) -> list[list[int]]:
    """Sorted distinct ranks as runs of consecutive values ``[first, last]``."""
    if len(ranks) == 0:
        return []
    cut = np.flatnonzero(np.diff(ranks) != 1) + 1
    starts, ends = np.r_[0, cut], np.r_[cut, len(ranks)] - 1
    return [[int(ranks[a]), int(ranks[b])] for a, b in zip(starts, ends)]


class _ScoresAcc:
    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.problems = _Problems()
        self.rows: dict[str, int] = {}
        self.ranked: dict[str, int] = {}
        self.by_split: dict[str, list[tuple[np.ndarray, np.ndarray, pa.Array]]] = {}
        self.class_ranks: dict[tuple[str, int], list[np.ndarray]] = {}
        self.pass1: list[dict[str, Any]] = []
        self.pass2: list[dict[str, Any]] = []
        self.ids: dict[str, int] = {}
        self.values: dict[str, dict[str, int]] = {}

    def add(self, t: pa.Table) -> None:
        ctx = self.ctx
        splits = t.column("split").to_numpy(zero_copy_only=False).astype(str)
        cls = classes_of(t)
        for s in np.unique(splits):  # every row: counts, id and carried-value digests
            part = t.filter(pa.array(splits == s))
            self.rows[s] = self.rows.get(s, 0) + part.num_rows
            self.ids[s] = add_digests(self.ids.get(s, 0), row_digest(s, part.column("id")))
            vals = self.values.setdefault(s, {})
            for c in ctx.carried:
                if c in part.column_names:
                    vals[c] = add_digests(vals.get(c, 0), row_digest(s, part.column("id"), part.column(c)))
        keep = t.select(["split", "target_label", "correct"] + [vog_col(k) for k in ctx.keys])
        self.pass1.extend(exact_class_sums(keep, ctx.keys).to_pylist())
        known = {(s, int(c)) for s, c in zip(ctx.means.get("split", []), ctx.means.get("class", []))}
        pairs = set(zip(splits.tolist(), cls.tolist()))
        if pairs <= known:
            self.pass2.extend(exact_class_sums(keep, ctx.keys, means=ctx.means).to_pylist())
        else:
            self.problems.add("classes:missing", [f"{s}/{c}" for s, c in sorted(pairs - known)])
        if ctx.reference is not None:  # rows of a class the reference split lacks: no z, no rank
            unref = self._unreferenced(t, cls)
            if unref.any():
                t = t.filter(pa.array(~unref))
                splits, cls = splits[~unref], cls[~unref]
        ids = t.column("id").combine_chunks()
        rank = pc.fill_null(t.column("rank"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        crank = pc.fill_null(t.column("class_rank"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        score = _floats(t.column("score"))
        for c in [vog_col(k) for k in ctx.keys] + [z_col(k) for k in ctx.keys] + ["score"]:
            self.problems.add(f"finite:{c}", ids, ~np.isfinite(_floats(t.column(c))))
        self.problems.add("score", ids, ~(score == _floats(t.column(z_col(ctx.primary)))))
        for s in np.unique(splits):
            m = splits == s
            self.ranked[s] = self.ranked.get(s, 0) + int(m.sum())
            self._split_rows(t.filter(pa.array(m)), s, ids.filter(pa.array(m)), cls[m], rank[m], crank[m], score[m])

    def _unreferenced(self, t: pa.Table, cls: np.ndarray) -> np.ndarray:
        """Rows whose class has no moments in the reference split; checks that they carry no z,
        score or rank (NaN / null), as the reduce leaves them."""
        e = self.ctx.lookup.get(self.ctx.reference) or {}
        means = np.asarray(e.get(f"mean_{self.ctx.primary}", []), np.float64)
        inside = (cls >= 0) & (cls < len(means))
        unref = ~inside | ~np.isfinite(np.where(inside, means[np.clip(cls, 0, max(0, len(means) - 1))], np.nan))
        if unref.any():
            ids = t.column("id").combine_chunks()
            bad = np.zeros(t.num_rows, bool)
            for c in [z_col(k) for k in self.ctx.keys] + ["score"]:
                bad |= np.isfinite(_floats(t.column(c)))
            for c in ("rank", "class_rank", "percentile", "decile"):
                bad |= t.column(c).is_valid().to_numpy(zero_copy_only=False)
            self.problems.add("unreferenced", ids, unref & bad)
        return unref

    def _split_rows(self, t: pa.Table, split: str, ids: pa.Array, cls: np.ndarray, rank: np.ndarray,
                    crank: np.ndarray, score: np.ndarray) -> None:
        ctx = self.ctx
        self.by_split.setdefault(split, []).append((rank, score, ids))
        for c in np.unique(cls):
            self.class_ranks.setdefault((split, int(c)), []).append(crank[cls == c])
        size = ctx.split_sizes.get(split, 0)
        if size:
            pct = 100.0 * (size - rank + 1) / size
            dec = 10 - (10 * (rank - 1)) // size
            self.problems.add("percentile", ids, ~(_floats(t.column("percentile")) == pct))
            self.problems.add("decile", ids, ~(_floats(t.column("decile")) == dec))
        self._check_z(t, split, ids, cls)

    def _check_z(self, t: pa.Table, split: str, ids: pa.Array, cls: np.ndarray) -> None:
        ctx = self.ctx
        e = ctx.lookup.get(split if ctx.reference is None else ctx.reference)
        for k in ctx.keys:
            v, z = _floats(t.column(vog_col(k))), _floats(t.column(z_col(k)))
            if ctx.normalization == "none":
                want = v
            else:
                if e is None:
                    self.problems.add("z:no-class", ids)
                    return
                means, stds = np.asarray(e[f"mean_{k}"], np.float64), np.asarray(e[f"std_{k}"], np.float64)
                inside = (cls >= 0) & (cls < len(means))
                self.problems.add("z:no-class", ids, ~inside)
                m = np.where(inside, means[np.clip(cls, 0, max(0, len(means) - 1))], np.nan)
                s = np.where(inside, stds[np.clip(cls, 0, max(0, len(stds) - 1))], np.nan)
                degenerate = ~(np.isfinite(s) & (s > 0))
                with np.errstate(invalid="ignore", divide="ignore"):
                    want = np.where(degenerate, 0.0, (v - m) / np.where(degenerate, 1.0, s))
                if ctx.normalization == "abs_zscore":
                    want = np.abs(want)
            bad = ~(np.abs(z - want) <= Z_RTOL * np.maximum(1.0, np.abs(want)))
            self.problems.add(f"z:{k}", ids, bad)

    def result(self) -> dict[str, Any]:
        ranks: dict[str, Any] = {}
        for s, parts in self.by_split.items():
            r = np.concatenate([p[0] for p in parts])
            sc = np.concatenate([p[1] for p in parts])
            order = np.argsort(r, kind="stable")
            r, sc = r[order], sc[order]
            ids = pa.chunked_array([p[2] for p in parts]).combine_chunks().take(pa.array(order))
            self.problems.add(f"ranks:duplicate:{s}", ids.slice(1), r[1:] == r[:-1])
            # higher score first; equal scores by id ascending
            id_down = pc.less(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False) \
                if len(ids) > 1 else np.zeros(0, bool)
            worse = (sc[1:] > sc[:-1]) | ((sc[1:] == sc[:-1]) & id_down)
            self.problems.add(f"rank order:{s}", ids.slice(1), worse)
            runs = intervals(np.unique(r))
            first = np.searchsorted(r, [a for a, _ in runs])
            last = np.searchsorted(r, [b for _, b in runs], side="right") - 1
            ranks[s] = [[a, b, float(sc[i]), ids[int(i)].as_py(), float(sc[j]), ids[int(j)].as_py()]
                        for (a, b), i, j in zip(runs, first, last)]
        cranks: dict[str, Any] = {}
        for (s, c), parts in self.class_ranks.items():
            r = np.sort(np.concatenate(parts))
            dup = r[1:][r[1:] == r[:-1]]
            self.problems.add(f"class ranks:duplicate:{s}/{c}", [f"class_rank {v}" for v in dup[:EXAMPLES]])
            cranks[f"{s}\x1f{c}"] = intervals(np.unique(r))
        return {"rows": self.rows, "ranked": self.ranked, "ranks": ranks, "class_ranks": cranks, "pass1": self.pass1, "pass2": self.pass2,
                "ids": self.ids, "values": self.values, "problems": self.problems.d}


def _batches(path: str, url: str, storage: dict[str, Any], columns: list[str], need: list[str]):
    """``(schema, batches or None)`` of a Parquet file; None when a ``need``ed column is missing."""
    import pyarrow.parquet as pq

    fs, _ = resolve(url, StorageOptions(**storage))
    with fs.open(path, "rb") as fh, pq.ParquetFile(fh) as pf:
        schema = pf.schema_arrow
        if pf.metadata.num_rows == 0:  # an empty file (e.g. no rejected row) holds nothing to check
            yield schema, iter(())
            return
        if any(c not in schema.names for c in need):
            yield schema, None
            return
        yield schema, (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns,
                                                                           use_threads=False))


class _Carried:
    """Types of the carried columns in a file and which hold only nulls (their type then says
    nothing about the source)."""

    def __init__(self, schema: pa.Schema, carried: list[str]):
        self.types = {c: str(schema.field(c).type) for c in carried if c in schema.names}
        self.nulls = {c: 0 for c in carried}
        self.rows = 0

    def add(self, t: pa.Table) -> None:
        self.rows += t.num_rows
        for c in self.nulls:
            self.nulls[c] += t.column(c).null_count

    def result(self) -> dict[str, Any]:
        return {"types": self.types, "null_carried": [c for c, n in self.nulls.items() if n == self.rows]}


def summarize_scores(path: str, url: str, storage: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """The summary of one score-table file (``path`` in the filesystem of ``url``)."""
    cols = ctx.score_columns + ctx.carried
    gen = _batches(path, url, storage, cols, cols)
    schema, batches = next(gen)
    if batches is None:
        return {"file": path, "missing": [c for c in cols if c not in schema.names], "rows": {}, "problems": {}}
    acc, carried = _ScoresAcc(ctx), _Carried(schema, ctx.carried)
    for t in batches:
        acc.add(t)
        carried.add(t)
    gen.close()
    return {**acc.result(), **carried.result(), "file": path}


def summarize_rejected(path: str, url: str, storage: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """The summary of one ``rejected.parquet`` file: rows, id and carried digests per split, and
    rows without a reason."""
    cols = ["id", "split", "reason"] + ctx.carried
    gen = _batches(path, url, storage, cols, cols)
    schema, batches = next(gen)
    if batches is None:
        return {"file": path, "missing": [c for c in cols if c not in schema.names], "rows": {}, "problems": {}}
    problems, carried = _Problems(), _Carried(schema, ctx.carried)
    rows: dict[str, int] = {}
    ids_d: dict[str, int] = {}
    values: dict[str, dict[str, int]] = {}
    for t in batches:
        carried.add(t)
        ids = t.column("id").combine_chunks()
        has_reason = pc.fill_null(pc.greater(pc.utf8_length(t.column("reason")), 0), False)
        problems.add("reason", ids, ~has_reason.to_numpy(zero_copy_only=False))
        splits = t.column("split").to_numpy(zero_copy_only=False).astype(str)
        for s in np.unique(splits):
            part = t.filter(pa.array(splits == s))
            rows[s] = rows.get(s, 0) + part.num_rows
            ids_d[s] = add_digests(ids_d.get(s, 0), row_digest(s, part.column("id")))
            vals = values.setdefault(s, {})
            for c in ctx.carried:
                vals[c] = add_digests(vals.get(c, 0), row_digest(s, part.column("id"), part.column(c)))
    gen.close()
    return {"file": path, "rows": rows, "ids": ids_d, "values": values, "problems": problems.d, **carried.result()}
