"""Publishing's read-back: ``top_ids`` (the ids printed after an audit) reads the head of each
split from a multi-file score table through Parquet row-group statistics, never the whole table.

The score table here is written the way a run's is (sorted by split and rank, cut into files
wherever the sort's partitions end, so one file holds the end of one split and the start of the
next); a spy filesystem records every byte range read, and the row groups those ranges touch are
compared with the row groups whose ``rank`` statistics allow a rank ≤ k (read from the files'
metadata independently).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from vog_ray.distributed import publish

ROWS = {"test": 30_000, "train": 50_000}
FILE_ROWS = 20_000       # the files cut the sorted table at 20k, 40k, 60k rows
ROW_GROUP = 1_000
FLOAT_COLUMNS = 5        # 5 × 8 kB per row group after the columns top_ids reads: no read coalesces two groups
FOOTER_TAIL = 1 << 16    # pyarrow reads a file's last 64 KiB at once to find its footer


class SpyFS(LocalFileSystem):
    """The local filesystem, recording ``(path, offset, length)`` of every read."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.reads: list[tuple[str, int, int]] = []

    def _open(self, path, mode="rb", **kw):
        return _SpyFile(super()._open(path, mode, **kw), path, self.reads)


class _SpyFile:
    def __init__(self, f, path: str, log: list):
        self._f, self._path, self._log = f, path, log

    def read(self, n=-1):
        pos = self._f.tell()
        b = self._f.read(n)
        self._log.append((self._path, pos, len(b)))
        return b

    def readinto(self, buf):
        pos = self._f.tell()
        n = self._f.readinto(buf)
        self._log.append((self._path, pos, n))
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def _score_table(rng) -> tuple[pa.Table, dict[str, list[str]]]:
    parts, ranked = [], {}
    for split, n in ROWS.items():
        ids = np.array([f"{split}-{i:06d}" for i in rng.permutation(n)])   # ids not in rank order
        ranked[split] = ids.tolist()
        cols = {"id": ids, "split": [split] * n, "rank": np.arange(1, n + 1, dtype=np.int64)}
        cols.update({f"z_{j}": rng.normal(size=n) for j in range(FLOAT_COLUMNS)})
        parts.append(pa.table(cols))
    return pa.concat_tables(parts), ranked


def _row_group_spans(path: str) -> list[tuple[int, int, int]]:
    """``(start, end, min rank)`` of each row group of a file, from its metadata."""
    md = pq.ParquetFile(path).metadata
    rank_col = md.schema.to_arrow_schema().get_field_index("rank")
    out = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        cols = [rg.column(c) for c in range(rg.num_columns)]
        starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in cols]
        end = max(s + c.total_compressed_size for s, c in zip(starts, cols))
        out.append((min(starts), end, rg.column(rank_col).statistics.min))
    return out


def test_top_ids_reads_only_row_groups_that_can_hold_the_top_ranks(tmp_path, monkeypatch):
    table, ranked = _score_table(np.random.default_rng(0))
    run = tmp_path / "run"
    (run / "scores").mkdir(parents=True)
    for i, start in enumerate(range(0, table.num_rows, FILE_ROWS)):
        pq.write_table(table.slice(start, FILE_ROWS), run / "scores" / f"part-{i}.parquet", row_group_size=ROW_GROUP)
    files = sorted(str(p) for p in (run / "scores").glob("*.parquet"))
    spy = SpyFS()
    monkeypatch.setattr(publish, "list_files", lambda url, storage: (spy, files))

    k = 10
    top = publish.top_ids(str(run), None, ["train", "test", "empty"], k=k)
    assert top == {"train": ranked["train"][:k], "test": ranked["test"][:k], "empty": []}

    touched, allowed = set(), set()
    for f in files:
        size = (run / "scores" / f.rsplit("/", 1)[1]).stat().st_size
        spans = _row_group_spans(f)
        allowed |= {(f, g) for g, (_, _, lo) in enumerate(spans) if lo <= k}
        for path, pos, n in spy.reads:
            if path != f or pos + n >= size - FOOTER_TAIL:  # the footer read at the end of the file
                continue
            touched |= {(f, g) for g, (a, b, _) in enumerate(spans) if pos < b and pos + n > a}
    # the head of each split: row group 0 of the first file (test) and the row group of the
    # second file where train begins — and nothing else
    assert allowed == {(files[0], 0), (files[1], (ROWS["test"] - FILE_ROWS) // ROW_GROUP)}
    assert touched == allowed, (sorted(touched), sorted(allowed))
    data_read = sum(n for path, pos, n in spy.reads)
    total = sum((run / "scores" / f.rsplit("/", 1)[1]).stat().st_size for f in files)
    assert data_read < total / 4, (data_read, total)
