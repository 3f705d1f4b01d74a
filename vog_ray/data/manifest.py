"""Manifest splits: a Parquet, CSV or JSONL table with one row per image — its URI (``s3://``,
``gs://``, a local path, or a path relative to the manifest's directory), its label, its id (the
URI unless an ``id_column`` is given) and carried columns. Read tasks read a range of manifest
rows and fetch their images with a bounded pool of threads (``manifest.fetch_threads``), retrying
failures (``manifest.fetch_retries``); an object that is missing or cannot be read becomes a
rejected row (``fetch_error: …``). Every image is read by its exact key: nothing lists the bucket
(100M objects must not mean 100M list calls). Imports neither Ray nor torch.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import pyarrow as pa

from ..core.table import keep_array
from ..storage import StorageOptions
from .listing import MANIFEST_FORMATS, SourceFile
from .rows import ids_array, labels_array, make_block
from .uris import Fetcher, fetch_uris

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec
    from .datasource import Piece

__all__ = ["table_format", "num_rows", "read_table_rows", "read_piece", "peek_payloads", "uris_for_ids",
           "ROWS_PER_BLOCK"]

ROWS_PER_BLOCK = 256      # images fetched and yielded together (a block of ~256 encoded images)


def table_format(spec: "SplitSpec", rel: str) -> str:
    """``parquet``, ``csv`` or ``jsonl``: ``manifest.table_format``, else from the extension."""
    fmt = spec.manifest.table_format
    if fmt != "auto":
        return fmt
    ext = posixpath.splitext(rel.lower())[1]
    if ext not in MANIFEST_FORMATS:
        raise ValueError(f"{rel}: cannot tell the manifest's format from its extension; set "
                         "manifest.table_format (parquet, csv or jsonl)")
    return MANIFEST_FORMATS[ext]


def _wanted(spec: "SplitSpec") -> list[str]:
    cols = [spec.image_column] + ([spec.label_column] if spec.label_column else []) \
        + ([spec.id_column] if spec.id_column else []) + list(spec.keep_columns)
    return list(dict.fromkeys(cols))


def _check_columns(names: Sequence[str], spec: "SplitSpec", f: SourceFile) -> None:
    missing = [c for c in _wanted(spec) if c not in names]
    if missing:
        hint = " (set label_column: null for an unlabelled split)" if spec.label_column in missing else ""
        raise KeyError(f"{f.rel} ({f.path}): no column {missing[0]!r}; columns are {list(names)}{hint}")


def num_rows(fs, f: SourceFile, spec: "SplitSpec") -> int:
    """Rows of a manifest: the Parquet footer, or a streamed parse of a CSV/JSONL file."""
    fmt = table_format(spec, f.rel)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(f.path, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows
    return sum(t.num_rows for t in read_table_rows(fs, f, spec))


def read_table_rows(fs, f: SourceFile, spec: "SplitSpec", start: int = 0,
                    stop: Optional[int] = None) -> Iterator[pa.Table]:
    """The manifest's rows ``[start, stop)`` (the wanted columns), in batches."""
    fmt = table_format(spec, f.rel)
    cols = _wanted(spec)
    with fs.open(f.path, "rb") as fh:
        if fmt == "parquet":
            yield from _parquet_rows(fh, f, spec, cols, start, stop)
            return
        if fmt == "csv":
            import pyarrow.csv as pacsv

            reader = pacsv.open_csv(fh, convert_options=pacsv.ConvertOptions(
                column_types={spec.image_column: pa.string(), **({spec.id_column: pa.string()} if spec.id_column
                                                                 else {})}))
            batches: Iterator[Any] = iter(reader)
            names = reader.schema.names
        else:
            import pyarrow.json as pajson

            tbl = pajson.read_json(fh)
            names = tbl.column_names
            batches = iter(tbl.to_batches())
        _check_columns(names, spec, f)
        pos = 0
        for b in batches:
            end = pos + b.num_rows
            a, e = max(start, pos), end if stop is None else min(stop, end)
            if e > a:
                yield pa.Table.from_batches([b.slice(a - pos, e - a)]).select(cols)
            pos += b.num_rows
            if stop is not None and pos >= stop:
                return


def _parquet_rows(fh, f: SourceFile, spec: "SplitSpec", cols: list[str], start: int,
                  stop: Optional[int]) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fh)
    _check_columns(pf.schema_arrow.names, spec, f)
    md = pf.metadata
    stop = md.num_rows if stop is None else min(stop, md.num_rows)
    pos = 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if pos + n > start and pos < stop:
            for b in pf.iter_batches(batch_size=ROWS_PER_BLOCK * 4, row_groups=[g], columns=cols, use_threads=False):
                a, e = max(start, pos), min(stop, pos + b.num_rows)
                if e > a:
                    yield pa.Table.from_batches([b.slice(a - pos, e - a)])
                pos += b.num_rows
                if pos >= stop:
                    return
        else:
            pos += n
        if pos >= stop:
            return


def read_piece(fs, piece: "Piece", name: str, spec: "SplitSpec", storage: StorageOptions) -> Iterator[pa.Table]:
    """The rows of a piece of a manifest (rows ``[row_start, row_stop)``, or all) as blocks of
    ``ROWS_PER_BLOCK`` rows, their images fetched (inside a Ray read task)."""
    f = piece.file
    fetcher = Fetcher(storage, fs, posixpath.dirname(f.path), spec.manifest.fetch_retries)
    for t in read_table_rows(fs, f, spec, piece.row_start or 0, piece.row_stop):
        for a in range(0, t.num_rows, ROWS_PER_BLOCK):
            yield _block(t.slice(a, ROWS_PER_BLOCK), fetcher, name, spec, f)


def _block(t: pa.Table, fetcher: Fetcher, name: str, spec: "SplitSpec", f: SourceFile) -> pa.Table:
    n = t.num_rows
    uris = t.column(spec.image_column).cast(pa.string())
    if spec.id_column:
        ids = ids_array(t.column(spec.id_column), n, f.rel, spec.id_column)
    else:
        if uris.null_count:
            raise ValueError(f"{f.rel}: column {spec.image_column!r} holds nulls; they cannot be ids "
                             "(give an id_column)")
        ids = uris.combine_chunks() if isinstance(uris, pa.ChunkedArray) else uris
    labels = labels_array(t.column(spec.label_column) if spec.label_column else None, n, f.rel,
                          spec.label_column or "")
    images = fetch_uris(fetcher, uris.to_pylist(), spec.manifest.fetch_threads)
    keep = {k: keep_array(t.column(k)) for k in spec.keep_columns}
    return make_block(ids, name, labels, pa.array(images, pa.binary()), keep)


def peek_payloads(fs, f: SourceFile, spec: "SplitSpec", n: int, storage: StorageOptions) -> Optional[list[Any]]:
    """The images of the first ``n`` rows of a manifest; ``None`` when it has no rows."""
    fetcher = Fetcher(storage, fs, posixpath.dirname(f.path), spec.manifest.fetch_retries)
    for t in read_table_rows(fs, f, spec, 0, n):
        if t.num_rows:
            return fetch_uris(fetcher, t.column(spec.image_column).cast(pa.string()).to_pylist(),
                              spec.manifest.fetch_threads)
    return None


def uris_for_ids(fs, files: list[SourceFile], spec: "SplitSpec", ids: set[str],
                 found: Callable[[str, str, SourceFile], None]) -> None:
    """``found(id, uri, manifest file)`` for each row whose id is in ``ids`` (scans the manifests)."""
    for f in files:
        for t in read_table_rows(fs, f, spec):
            uris = t.column(spec.image_column).cast(pa.string()).to_pylist()
            col = t.column(spec.id_column).cast(pa.string()).to_pylist() if spec.id_column else uris
            for i, u in zip(col, uris):
                if i in ids and u is not None:
                    found(i, u, f)

