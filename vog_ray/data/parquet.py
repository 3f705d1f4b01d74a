"""Parquet splits: reading a file's rows (or a range of its row groups) inside a Ray read task,
row counts from the footers, the first image payloads, image payloads by id for reports, and
what the Hugging Face layout adds: an image struct holding only a ``path`` (read relative to the
Parquet file) and class names from the dataset's own metadata. Imports neither Ray nor torch."""

from __future__ import annotations

import json
import posixpath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from ..config import DataError
from ..core.table import keep_array
from ..storage import StorageOptions
from .listing import SourceFile, list_split_files
from .rows import (ids_array, image_column_to_binary, label_type_ok, labels_array, make_block, row_ids,
                   rows_per_block)
from .uris import Fetcher

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec
    from .datasource import Piece

__all__ = ["read_piece", "check_columns", "num_row_groups", "num_rows", "footer", "peek_payloads", "fetch_rows",
           "fetch_by_id_column", "class_names", "HF_METADATA_KEY", "HF_INFO_FILE"]

Found = Callable[[str, Any], None]   # called with (id, image payload) for each row fetched
HF_METADATA_KEY = b"huggingface"      # the Parquet schema metadata that `datasets` writes: {"info": {"features"}}
HF_INFO_FILE = "dataset_info.json"    # `datasets`' description of a dataset, beside its files
PATH_RETRIES = 2                      # retries of an image file a Hugging Face struct names by path


def _path_reader(fs, f: SourceFile, storage: StorageOptions | None) -> Callable[[str], Any]:
    """Reads the files a Hugging Face image struct names by ``path``, relative to ``f``'s directory."""
    return Fetcher(storage, fs, posixpath.dirname(f.path), PATH_RETRIES).fetch


def read_piece(fs, piece: "Piece", name: str, spec: "SplitSpec",
               storage: StorageOptions | None = None) -> Iterator[pa.Table]:
    """The rows of a piece (a file, or row groups ``[rg_start, rg_stop)`` of it) as blocks."""
    import pyarrow.parquet as pq

    f = piece.file
    read_path = _path_reader(fs, f, storage)
    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        cols = check_columns(pf.schema_arrow, spec, f)
        md = pf.metadata
        rgs = list(range(md.num_row_groups))
        if piece.rg_start is not None:
            rgs = rgs[piece.rg_start:piece.rg_stop]
        offset = sum(md.row_group(i).num_rows for i in range(rgs[0] if rgs else 0))
        per_row = f.size / max(1, md.num_rows)
        for batch in pf.iter_batches(batch_size=rows_per_block(per_row * 2), row_groups=rgs, columns=cols,
                                     use_threads=False):
            n = batch.num_rows
            tbl = pa.Table.from_batches([batch])
            ids = (ids_array(tbl.column(spec.id_column), n, f.rel, spec.id_column) if spec.id_column
                   else row_ids(f.rel, offset, n))
            labels = labels_array(tbl.column(spec.label_column) if spec.label_column else None,
                                  n, f.rel, spec.label_column or "")
            images = image_column_to_binary(tbl.column(spec.image_column), spec, f.rel, read_path)
            keep = {k: keep_array(tbl.column(k)) for k in spec.keep_columns}
            offset += n
            yield make_block(ids, name, labels, images, keep)


def check_columns(schema: pa.Schema, spec: "SplitSpec", f: SourceFile) -> list[str]:
    """The columns a split reads from a file (image, label, id, keep), checked against the file's
    schema: a missing one, or a label column that cannot hold labels, is an ``DataError``
    naming the file and the column."""
    names = schema.names
    wanted = [spec.image_column] + ([spec.label_column] if spec.label_column else []) \
        + ([spec.id_column] if spec.id_column else []) + list(spec.keep_columns)
    missing = [c for c in wanted if c not in names]
    if missing:
        hint = " (set label_column: null for an unlabelled split)" if spec.label_column in missing else ""
        raise DataError(f"{f.rel} ({f.path}): no column {missing[0]!r}; columns are {names}{hint}")
    if spec.label_column and not label_type_ok(schema.field(spec.label_column).type):
        raise DataError(f"{f.rel} ({f.path}): label column {spec.label_column!r} must be integer, "
                        f"got {schema.field(spec.label_column).type}")
    return list(dict.fromkeys(wanted))


def num_row_groups(fs, f: SourceFile) -> int:
    """The number of row groups of a file (from its footer)."""
    import pyarrow.parquet as pq

    with fs.open(f.path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_row_groups


def num_rows(fs, f: SourceFile) -> int:
    """The number of rows of a file (from its footer); a file that is not Parquet is an error. The
    columns a split reads are checked from the footers while planning (``metadata.scan_splits``)
    and again by the reader (:func:`check_columns`)."""
    return footer(fs, f)[0]


def footer(fs, f: SourceFile) -> tuple[int, pa.Schema]:
    """The number of rows and the Arrow schema of a file, from its footer; a file that is not
    Parquet is an error naming it."""
    import pyarrow.parquet as pq

    try:
        with fs.open(f.path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            return pf.metadata.num_rows, pf.schema_arrow
    except (pa.ArrowException, OSError) as e:  # truncated / corrupt / not Parquet at all
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{f.rel} ({f.path}): not a readable Parquet file "
                         f"(truncated or corrupt?): {e}") from None


def peek_payloads(fs, f: SourceFile, spec: "SplitSpec", n: int) -> Optional[list[Any]]:
    """The image payloads of the first ``n`` rows of a file; ``None`` when it has no rows."""
    import pyarrow.parquet as pq

    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        check_columns(pf.schema_arrow, spec, f)
        if pf.metadata.num_rows == 0:
            return None
        g = next(i for i in range(pf.metadata.num_row_groups) if pf.metadata.row_group(i).num_rows)
        col = pf.read_row_group(g, columns=[spec.image_column]).column(0).slice(0, n)
    return image_column_to_binary(col, spec, f.rel, _path_reader(fs, f, None)).to_pylist()


def fetch_rows(fs, f: SourceFile, spec: "SplitSpec", wanted: list[tuple[str, int]], found: Found) -> None:
    """``found(id, payload)`` for each ``(id, row)`` of ``wanted`` that is a row of the file."""
    import pyarrow.parquet as pq

    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        md = pf.metadata
        starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
        by_rg: dict[int, list[tuple[str, int]]] = {}
        for i, row in wanted:
            if 0 <= row < md.num_rows:
                g = int(np.searchsorted(starts, row, side="right") - 1)
                by_rg.setdefault(g, []).append((i, row - int(starts[g])))
        for g, items in sorted(by_rg.items()):
            col = pf.read_row_group(g, columns=[spec.image_column], use_threads=False).column(0)
            col = image_column_to_binary(col.take(pa.array([r for _, r in items])), spec, f.rel,
                                         _path_reader(fs, f, None))
            for (i, _), b in zip(items, col.to_pylist()):
                found(i, b)


def fetch_by_id_column(fs, spec: "SplitSpec", storage: StorageOptions | None, ids: list[str],
                       found: Found) -> None:
    """``found(id, payload)`` for each row whose ``id_column`` value is in ``ids`` (scans the column)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(ids, pa.string())
    for f in list_split_files(spec, storage):
        with fs.open(f.path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            for g in range(pf.metadata.num_row_groups):
                idc = pf.read_row_group(g, columns=[spec.id_column]).column(0).cast(pa.string())
                hit = pc.is_in(idc, value_set=wanted)
                if not pc.any(hit).as_py():
                    continue
                rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
                col = pf.read_row_group(g, columns=[spec.image_column]).column(0).take(pa.array(rows))
                col = image_column_to_binary(col, spec, f.rel, _path_reader(fs, f, storage))
                for i, b in zip(idc.take(pa.array(rows)).to_pylist(), col.to_pylist()):
                    found(i, b)


def _label_names(features: Any, label_column: str) -> Optional[list[str]]:
    """The names of a ``ClassLabel`` feature (``{"names": [...], "_type": "ClassLabel"}``)."""
    feat = features.get(label_column) if isinstance(features, dict) else None
    if isinstance(feat, dict) and feat.get("_type") == "ClassLabel" and isinstance(feat.get("names"), list):
        return [str(n) for n in feat["names"]]
    return None


def class_names(fs, files: list[SourceFile], base: str, label_column: str) -> Optional[list[str]]:
    """Class names the dataset itself declares for ``label_column``: the ``huggingface`` schema
    metadata of its first file, else a ``dataset_info.json`` beside the files; None without one."""
    import pyarrow.parquet as pq

    if files:
        with fs.open(files[0].path, "rb") as fh:
            meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
        if HF_METADATA_KEY in meta:
            try:
                info = json.loads(meta[HF_METADATA_KEY]).get("info") or {}
            except ValueError:
                info = {}
            names = _label_names(info.get("features"), label_column)
            if names:
                return names
    for d in dict.fromkeys([posixpath.dirname(files[0].path) if files else base, base]):
        p = posixpath.join(d, HF_INFO_FILE)
        if fs.exists(p):
            with fs.open(p, "rb") as fh:
                try:
                    info = json.loads(fh.read())
                except ValueError as e:
                    raise ValueError(f"{p}: not valid JSON ({e})") from None
            names = _label_names(info.get("features") if isinstance(info, dict) else None, label_column)
            if names:
                return names
    return None
