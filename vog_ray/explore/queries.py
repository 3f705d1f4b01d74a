"""Queries over a published run's Parquet tables, run by DuckDB: a page of ranked examples under
filters and a sort, one example, its rank under every key, the per-class summary, the rejected
rows, and the selections that ``vog-ray export`` writes.

DuckDB reads the run's files where they are (local, or object storage through the run's fsspec
filesystem); the connection may read the run's directory and nothing else (``allowed_directories``,
external access off, configuration locked). Names from a request are checked against the run's
columns and quoted; values are bound parameters; no SQL text comes from a request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa

from ..core.flags import FLAGGED
from ..runs import Run
from ..storage import is_local, list_files, resolve, unstrip

__all__ = ["Filters", "Page", "RunTables", "SCORE_COLUMNS", "EXPORT_COLUMNS", "quote_ident"]

# the score-table columns vog-ray writes itself; every other column is a keep column
BASE_COLUMNS = ("id", "split", "label", "target_label", "pred", "correct", "score", "rank", "class_rank",
                "percentile", "decile", "status", FLAGGED)
SCORE_COLUMNS = ("score", "rank", "class_rank", "percentile", "decile")
EXPORT_COLUMNS = ("id", "split", "label", "pred", "z", "percentile", "rank")
MAX_CHOICES = 50     # a keep column with at most this many distinct values gets a value filter
MAX_PER_PAGE = 500   # rows per page a request may ask for


def quote_ident(name: str) -> str:
    """A column name as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


@dataclass
class Filters:
    """What the results page shows: every field left at its default filters nothing."""

    split: str | None = None
    label: int | None = None
    pred: int | None = None
    mismatch: bool = False                       # label != prediction (known labels only)
    flagged: bool | None = None                  # the run's ``flagged`` column
    keep: dict[str, Any] = field(default_factory=dict)   # keep column -> wanted value (bools for flags)
    pct_min: float | None = None
    pct_max: float | None = None
    z_min: float | None = None                   # on ``score``, the ranked z
    z_max: float | None = None


@dataclass
class Page:
    rows: list[dict[str, Any]]
    total: int
    page: int
    per_page: int
    elapsed_s: float

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def first(self) -> int:
        return (self.page - 1) * self.per_page + 1 if self.rows else 0

    @property
    def last(self) -> int:
        return (self.page - 1) * self.per_page + len(self.rows)


def _dicts(cur) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


class RunTables:
    """DuckDB views ``scores``, ``rejected`` (and ``classes``) over one published run."""

    def __init__(self, run: Run):
        import duckdb

        self.run = run
        self.con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                          "autoload_known_extensions": False})
        fs, score_files = list_files(run.path("scores"), run.storage)
        if not score_files:
            raise FileNotFoundError(f"run {run.url!r} has no score files")
        if not is_local(fs):
            self.con.register_filesystem(fs)
        root = unstrip(fs, resolve(run.url, run.storage)[1]).rstrip("/") + "/"
        self.con.execute(f"SET allowed_directories=[{_literal(root)}]")
        self._view("scores", [unstrip(fs, p) for p in score_files])
        _, rej = list_files(run.path("rejected.parquet"), run.storage)
        self.has_rejected = bool(rej)
        if rej:
            self._view("rejected", [unstrip(fs, p) for p in rej])
        self.con.execute("SET enable_external_access=false")
        self.con.execute("SET lock_configuration=true")
        self.types = {r[0]: str(r[1]) for r in self.con.execute("DESCRIBE scores").fetchall()}
        self.keys: list[str] = list(run.manifest.get("keys") or [])
        self.primary: str = run.manifest.get("primary", self.keys[0] if self.keys else "")
        self.splits = [r[0] for r in self.con.execute(
            "SELECT DISTINCT split FROM scores ORDER BY split").fetchall()]
        self.keep_columns = [c for c in self.types if c not in BASE_COLUMNS
                             and not c.startswith(("vog_", "z_", "sig_"))]
        self.keep_choices = self._keep_choices()

    def _view(self, name: str, files: Sequence[str]) -> None:
        lst = ", ".join(_literal(f) for f in files)
        self.con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{lst}], union_by_name = true)")

    def _keep_choices(self) -> dict[str, list[Any]]:
        """Keep columns a page can filter on: booleans, and columns of few distinct values."""
        out: dict[str, list[Any]] = {}
        for c in self.keep_columns:
            if self.types[c] == "BOOLEAN":
                out[c] = [True, False]
                continue
            if self.types[c].endswith("[]") or self.types[c].startswith(("STRUCT", "MAP", "BLOB")):
                continue
            vals = self.con.execute(f"SELECT DISTINCT {quote_ident(c)} AS v FROM scores WHERE v IS NOT NULL "
                                    f"ORDER BY v LIMIT {MAX_CHOICES + 1}").fetchall()
            if len(vals) <= MAX_CHOICES:
                out[c] = [v[0] for v in vals]
        return out

    # ------------------------------------------------------------------ columns
    @property
    def has_flagged(self) -> bool:
        return FLAGGED in self.types

    @property
    def signal_columns(self) -> list[str]:
        return [c for c in self.types if c.startswith("sig_")]

    def num_classes(self) -> int:
        """Classes the score table shows: the largest label, prediction or target class + 1."""
        cur = self.con.cursor()
        try:
            top = cur.execute("SELECT greatest(max(label), max(pred), max(target_label)) FROM scores").fetchone()[0]
        finally:
            cur.close()
        return int(top or 0) + 1

    def sort_options(self) -> list[str]:
        """Columns a page can be sorted by: the scores, raw and z VoG of each key, the signals
        (their last checkpoint's value)."""
        keys = [c for k in self.keys for c in (f"z_{k}", f"vog_{k}") if c in self.types]
        return [c for c in SCORE_COLUMNS if c in self.types] + keys + \
            [c for c in self.signal_columns if self.types[c] not in ("BOOLEAN[]",)]

    def _sort_expr(self, sort: str) -> str:
        if sort not in self.sort_options():
            raise ValueError(f"cannot sort by {sort!r}")
        return f"{quote_ident(sort)}[-1]" if sort.startswith("sig_") else quote_ident(sort)

    # ------------------------------------------------------------------ filters
    def where(self, f: Filters) -> tuple[str, list[Any]]:
        """``WHERE`` clause and parameters of ``f`` (columns checked against the run's)."""
        conds: list[str] = []
        params: list[Any] = []

        def add(sql: str, *vals: Any) -> None:
            conds.append(sql)
            params.extend(vals)

        if f.split is not None:
            add("split = ?", f.split)
        if f.label is not None:
            add("label = ?", int(f.label))
        if f.pred is not None:
            add("pred = ?", int(f.pred))
        if f.mismatch:
            add("label >= 0 AND label <> pred")
        if f.flagged is not None:
            if not self.has_flagged:
                raise ValueError("this run has no flagged column (no flags section in its config)")
            add(f"{FLAGGED} = ?", bool(f.flagged))
        for c, v in f.keep.items():
            if c not in self.keep_choices:
                raise ValueError(f"cannot filter on column {c!r}")
            add(f"{quote_ident(c)} = ?", v)
        for col, lo, hi in (("percentile", f.pct_min, f.pct_max), ("score", f.z_min, f.z_max)):
            if lo is not None:
                add(f"{col} >= ?", float(lo))
            if hi is not None:
                add(f"{col} <= ?", float(hi))
        return ("WHERE " + " AND ".join(conds)) if conds else "", params

    # ------------------------------------------------------------------ queries
    def page(self, f: Filters, *, sort: str = "score", descending: bool = True, page: int = 1,
             per_page: int = 50, columns: Sequence[str] | None = None) -> Page:
        """One page of the filtered, sorted score rows and the total.

        Rows are ordered by the sort column, then split and rank (a unique key: within a split,
        rank order is score order with ties by id). The page's keys are found first and its
        columns read for those rows only (late materialisation: a deep page does not sort whole
        rows); sorted by score within one split, the page is a window of ranks, which Parquet's
        row-group statistics find without a sort (the score files are written in rank order).
        """
        t0 = time.perf_counter()
        per_page = max(1, min(int(per_page), MAX_PER_PAGE))
        page = max(1, int(page))
        where, params = self.where(f)
        cols = list(columns or self.list_columns())
        offset = (page - 1) * per_page
        cur = self.con.cursor()
        try:
            total = int(cur.execute(f"SELECT count(*) FROM scores {where}", params).fetchone()[0])
            if sort in ("score", "rank") and f.split is not None and f == Filters(split=f.split):
                rows = self._rank_window(cur, f.split, total, offset, per_page, cols,
                                         descending == (sort == "score"))
            else:
                rows = self._late_page(cur, where, params, self._order(sort, descending, f), offset, per_page, cols)
        finally:
            cur.close()
        return Page(rows, total, page, per_page, time.perf_counter() - t0)

    def _order(self, sort: str, descending: bool, f: Filters) -> str:
        if sort in ("score", "rank") and f.split is not None:   # one split: rank order is score order
            return f"rank {'ASC' if descending == (sort == 'score') else 'DESC'}"
        return f"{self._sort_expr(sort)} {'DESC' if descending else 'ASC'} NULLS LAST, split, rank"

    def _rank_window(self, cur, split: str, n: int, offset: int, per_page: int, cols: list[str],
                     top_first: bool) -> list[dict[str, Any]]:
        """Rows ``offset+1 …`` of one split in rank order (``top_first``) or reversed."""
        lo, hi = (offset + 1, offset + per_page) if top_first else (n - offset - per_page + 1, n - offset)
        sel = ", ".join(quote_ident(c) for c in cols)
        return _dicts(cur.execute(f"SELECT {sel} FROM scores WHERE split = ? AND rank BETWEEN ? AND ? "
                                  f"ORDER BY rank {'ASC' if top_first else 'DESC'}", [split, lo, hi]))

    def _late_page(self, cur, where: str, params: list[Any], order: str, offset: int, per_page: int,
                   cols: list[str]) -> list[dict[str, Any]]:
        """The page's ``(split, rank)`` keys in order, then its columns for those rows."""
        keys = cur.execute(f"SELECT split, rank FROM scores {where} ORDER BY {order} LIMIT ? OFFSET ?",
                           [*params, per_page, offset]).fetchall()
        by_split: dict[str, list[int]] = {}
        for s, r in keys:
            by_split.setdefault(s, []).append(int(r))
        sel = ", ".join(quote_ident(c) for c in dict.fromkeys(["split", "rank", *cols]))
        found: dict[tuple[str, int], dict[str, Any]] = {}
        for s, ranks in by_split.items():
            marks = ", ".join("?" * len(ranks))
            for r in _dicts(cur.execute(f"SELECT {sel} FROM scores WHERE split = ? AND rank IN ({marks})",
                                        [s, *ranks])):
                found[(r["split"], int(r["rank"]))] = r
        return [{c: found[(s, int(r))][c] for c in cols} for s, r in keys]

    def list_columns(self) -> list[str]:
        """The columns of a results row: everything but the per-checkpoint signals."""
        return [c for c in self.types if not c.startswith("sig_")]

    def example(self, split: str, example_id: str, rank: int | None = None) -> dict[str, Any] | None:
        """Every column of one scored example (None when it is not in the run). ``rank``: where a
        page showed it (the score files are in rank order: found from row-group statistics
        instead of a scan of every id); a wrong hint falls back to the scan."""
        cur = self.con.cursor()
        try:
            rows = []
            if rank is not None:
                rows = _dicts(cur.execute("SELECT * FROM scores WHERE split = ? AND rank = ? AND id = ?",
                                          [split, int(rank), example_id]))
            if not rows:
                rows = _dicts(cur.execute("SELECT * FROM scores WHERE split = ? AND id = ?", [split, example_id]))
        finally:
            cur.close()
        return rows[0] if rows else None

    def rejected_row(self, split: str, example_id: str) -> dict[str, Any] | None:
        if not self.has_rejected:
            return None
        cur = self.con.cursor()
        try:
            rows = _dicts(cur.execute("SELECT * FROM rejected WHERE split = ? AND id = ?", [split, example_id]))
        finally:
            cur.close()
        return rows[0] if rows else None

    def key_ranks(self, row: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The example's rank and percentile within its split under every key's z (rank 1 =
        highest; ties by id, as the score table ranks; percentile = 100 (n - rank + 1) / n)."""
        keys = [k for k in self.keys if f"z_{k}" in self.types and row.get(f"z_{k}") is not None]
        if not keys:
            return {}
        parts, params = [], []
        for j, k in enumerate(keys):
            z = quote_ident(f"z_{k}")
            parts += [f"count_if({z} > ?) AS above{j}", f"count_if({z} = ?) AS equal{j}"]
            params += [row[f"z_{k}"], row[f"z_{k}"]]
        cur = self.con.cursor()
        try:
            res = _dicts(cur.execute(f"SELECT count(*) AS n, {', '.join(parts)} FROM scores WHERE split = ?",
                                     [*params, row["split"]]))[0]
            out = {}
            for j, k in enumerate(keys):
                before = int(res[f"above{j}"])
                if int(res[f"equal{j}"]) > 1:   # ties: the rows of equal z with a smaller id come first
                    before += int(cur.execute(f"SELECT count(*) FROM scores WHERE split = ? AND {quote_ident(f'z_{k}')} "
                                              "= ? AND id < ?", [row["split"], row[f"z_{k}"], row["id"]]).fetchone()[0])
                out[k] = before
        finally:
            cur.close()
        n = int(res["n"])
        return {k: {"rank": b + 1, "percentile": 100.0 * (n - b) / n} for k, b in out.items()}

    def classes(self, split: str) -> list[dict[str, Any]]:
        """Per class (the normalisation class, ``target_label``) of a split: examples, error rate
        of the last checkpoint, mean z and raw VoG of the ranked key, share in the split's top
        decile, flagged share."""
        vog = quote_ident(f"vog_{self.primary}")
        flagged = f", avg({FLAGGED}::DOUBLE) AS flagged_share" if self.has_flagged else ""
        cur = self.con.cursor()
        try:
            return _dicts(cur.execute(
                f"SELECT target_label AS class, count(*) AS n, "
                f"avg(CASE WHEN correct IS NULL THEN NULL WHEN correct THEN 0.0 ELSE 1.0 END) AS error, "
                f"avg(score) AS mean_z, avg({vog}) AS mean_vog, avg((decile = 10)::DOUBLE) AS top_decile_share"
                f"{flagged} FROM scores WHERE split = ? GROUP BY target_label ORDER BY target_label", [split]))
        finally:
            cur.close()

    def rejected(self, split: str | None, *, page: int = 1, per_page: int = 50) -> Page:
        t0 = time.perf_counter()
        if not self.has_rejected:
            return Page([], 0, 1, per_page, 0.0)
        per_page = max(1, min(int(per_page), MAX_PER_PAGE))
        page = max(1, int(page))
        where, params = ("WHERE split = ?", [split]) if split else ("", [])
        cur = self.con.cursor()
        try:
            total = cur.execute(f"SELECT count(*) FROM rejected {where}", params).fetchone()[0]
            rows = _dicts(cur.execute(f"SELECT * FROM rejected {where} ORDER BY split, id LIMIT ? OFFSET ?",
                                      [*params, per_page, (page - 1) * per_page]))
        finally:
            cur.close()
        return Page(rows, int(total), page, per_page, time.perf_counter() - t0)

    def has_example(self, split: str, example_id: str) -> bool:
        """Whether ``(split, id)`` is a row of the run (scored or rejected)."""
        cur = self.con.cursor()
        try:
            if cur.execute("SELECT 1 FROM scores WHERE split = ? AND id = ? LIMIT 1", [split, example_id]).fetchone():
                return True
            return bool(self.has_rejected and cur.execute(
                "SELECT 1 FROM rejected WHERE split = ? AND id = ? LIMIT 1", [split, example_id]).fetchone())
        finally:
            cur.close()

    def select(self, f: Filters | None = None, *, where_sql: str | None = None, top: int | None = None,
               columns: Sequence[str] | None = None) -> pa.Table:
        """The rows of an export: ``f`` and/or a SQL condition over the score columns (``where_sql``,
        from the command line only), the ``top`` highest scores (ties by split, id); all columns
        unless ``columns``."""
        where, params = self.where(f or Filters())
        if where_sql:
            where = (where + " AND " if where else "WHERE ") + f"({where_sql})"
        cols = ", ".join(quote_ident(c) for c in columns) if columns else "*"
        limit = f" LIMIT {int(top)}" if top is not None else ""
        cur = self.con.cursor()
        try:
            return cur.sql(f"SELECT {cols} FROM scores {where} ORDER BY score DESC NULLS LAST, split, id{limit}",
                           params=params).to_arrow_table()
        finally:
            cur.close()

    def close(self) -> None:
        self.con.close()
