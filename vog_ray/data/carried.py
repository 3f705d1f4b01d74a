"""The source side of the run validator: for each file of a split, its rows, the digest of its
ids and of each carried column's values (``core.digest``), and the Arrow type of each carried
column — read straight from the file (Parquet: only the id and carried columns, never the
images), so a published run can be compared with its source without bringing rows together.
Imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa

from ..core.digest import add_digests, row_digest
from ..storage import StorageOptions
from .listing import SourceFile, folder_sources, split_files
from .rows import ids_array, row_ids

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["source_units", "digest_source", "merge_summaries", "empty_summary"]

ROWS_PER_BLOCK = 65_536  # rows hashed at a time (bounded memory per file)


def empty_summary(split: str, carried: list[str]) -> dict[str, Any]:
    return {"split": split, "rows": 0, "ids": 0, "values": {c: 0 for c in carried}, "types": {}}


def _add_block(acc: dict[str, Any], split: str, ids: pa.Array, block: pa.Table | None, carried: list[str]) -> None:
    acc["rows"] += len(ids)
    acc["ids"] = add_digests(acc["ids"], row_digest(split, ids))
    for c in carried:
        if block is None or c not in block.column_names:
            continue
        col = block.column(c)
        acc["values"][c] = add_digests(acc["values"][c], row_digest(split, ids, col))
        if not pa.types.is_null(col.type):
            acc["types"].setdefault(c, str(col.type))


def _parquet_blocks(fs, f: SourceFile, spec: "SplitSpec") -> Iterator[tuple[pa.Array, pa.Table | None]]:
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys(([spec.id_column] if spec.id_column else []) + list(spec.keep_columns)))
    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if not cols:  # ids from the row numbers only
            n = pf.metadata.num_rows
            for a in range(0, n, ROWS_PER_BLOCK):
                yield row_ids(f.rel, a, min(ROWS_PER_BLOCK, n - a)), None
            return
        offset = 0
        for batch in pf.iter_batches(batch_size=ROWS_PER_BLOCK, columns=cols, use_threads=False):
            t = pa.Table.from_batches([batch])
            n = t.num_rows
            ids = (ids_array(t.column(spec.id_column), n, f.rel, spec.id_column) if spec.id_column
                   else row_ids(f.rel, offset, n))
            offset += n
            yield ids, t


def _manifest_blocks(fs, f: SourceFile, spec: "SplitSpec") -> Iterator[tuple[pa.Array, pa.Table]]:
    """A manifest's ids (its ``id_column``, else the image URIs) and carried columns, read from the
    manifest table alone: no image is fetched."""
    from ..core.table import keep_array
    from .manifest import read_table_rows

    for t in read_table_rows(fs, f, spec):
        n = t.num_rows
        if spec.id_column:
            ids = ids_array(t.column(spec.id_column), n, f.rel, spec.id_column)
        else:
            ids = t.column(spec.image_column).cast(pa.string()).combine_chunks()
        yield ids, pa.table({k: keep_array(t.column(k)) for k in spec.keep_columns}) if spec.keep_columns else None


def source_units(name: str, spec: "SplitSpec", storage: StorageOptions | None) -> list[Any]:
    """The units of work of a split's source summary: its files (an image folder is one unit: its
    listing is all there is to read)."""
    if spec.format == "image_folder":
        return [None]
    return split_files(spec, storage)[2]


def digest_source(name: str, spec: "SplitSpec", storage: StorageOptions | None, unit: Any) -> dict[str, Any]:
    """The summary of one unit (:func:`source_units`) of split ``name``: ``rows``, ``ids`` (digest),
    ``values`` (carried column → digest) and ``types`` (carried column → Arrow type name)."""
    carried = list(spec.keep_columns)
    acc = empty_summary(name, carried)
    if spec.format == "image_folder":
        _, _, files = folder_sources(spec, storage)
        ids = pa.array([f.rel for f in files], pa.string())
        cols = {"class_name": pa.array([r.split("/", 1)[0] for r in ids.to_pylist()], pa.string()), "path": ids}
        _add_block(acc, name, ids, pa.table({c: cols[c] for c in carried}) if carried else None, carried)
        return acc
    fs = split_files(spec, storage, list_files=False)[0]
    if spec.format == "parquet":
        blocks: Any = _parquet_blocks(fs, unit, spec)
    elif spec.format == "manifest":
        blocks = _manifest_blocks(fs, unit, spec)
    else:  # npz / CIFAR files hold their arrays whole, a WebDataset shard its samples' members in any
        # order: their own reader gives ids and carried values
        from . import cifar, npz, webdataset

        reader = {"npz": npz.read_file, "webdataset": webdataset.read_file}.get(spec.format, cifar.read_file)
        blocks = ((b.column("id"), b) for b in reader(fs, unit, name, spec))
    for ids, block in blocks:
        _add_block(acc, name, ids, block, carried)
    return acc


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per split: the unit summaries added up (types: the first non-null type seen, and every
    other type seen under ``other_types``)."""
    out: dict[str, dict[str, Any]] = {}
    for p in parts:
        acc = out.setdefault(p["split"], {**empty_summary(p["split"], list(p["values"])), "other_types": {}})
        acc["rows"] += p["rows"]
        acc["ids"] = add_digests(acc["ids"], p["ids"])
        for c, d in p["values"].items():
            acc["values"][c] = add_digests(acc["values"].get(c, 0), d)
        for c, t in p["types"].items():
            if acc["types"].setdefault(c, t) != t:
                acc["other_types"].setdefault(c, t)
    return out
