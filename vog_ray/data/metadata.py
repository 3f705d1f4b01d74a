"""What the pipeline learns about the splits before any Ray job: rows per split (``rows_in``,
from metadata where the format has it), what the Parquet footers say about the columns an audit
reads (:func:`scan_splits`: present in every file, one type per column, labels numeric), that the
output lies apart from the inputs, and the model input shape, from decoding the first rows of
each split. Imports neither Ray nor torch: a caller may pass a ``mapper`` that runs the per-file
counts elsewhere (the audit runs the WebDataset header passes as Ray tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from ..config import ConfigError
from ..storage import StorageOptions, resolve
from . import cifar, image_folder, manifest, npz, parquet, webdataset
from .decode import Reject, decode_row
from .listing import SourceFile, folder_files, split_bases, split_files
from .rows import npy_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AuditConfig, SplitSpec

__all__ = ["count_split_rows", "count_rows", "infer_input_shape", "SplitScan", "scan_splits", "check_output_apart",
           "file_rows", "Mapper", "declared_class_names"]

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]  # map(fn, items) → [fn(i) …]


def _map_threads(fn: Callable[[Any], Any], items: Sequence[Any], max_workers: int = 16) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        return list(pool.map(fn, items))


def file_rows(fs: Any, f: SourceFile, spec: "SplitSpec") -> int:
    """The rows ``read_split`` yields for one file of a split (not an image folder)."""
    if spec.format == "parquet":
        return parquet.num_rows(fs, f)
    if spec.format == "npz":
        return npz.num_rows(fs, f, spec)
    if spec.format == "webdataset":
        return webdataset.num_rows(fs, f)
    if spec.format == "manifest":
        return manifest.num_rows(fs, f, spec)
    return cifar.num_rows(fs, f)


def _file_rows_of(args: tuple[Any, SourceFile, "SplitSpec"]) -> int:
    return file_rows(*args)


def count_split_rows(spec: "SplitSpec", storage: StorageOptions | None = None, *,
                     mapper: Mapper | None = None) -> int:
    """The number of rows ``read_split`` yields for a split, from metadata where the format has
    it (parquet footers, npz headers, manifest footers, the image-folder listing); WebDataset
    shards from a pass over their member headers, CIFAR batches unpickled. ``mapper`` runs the
    per-file counts (default: 16 threads here)."""
    storage = storage or StorageOptions()
    if spec.format == "image_folder":
        return len(folder_files(spec, storage)[2])
    fs, _, files = split_files(spec, storage)
    return int(sum((mapper or _map_threads)(_file_rows_of, [(fs, f, spec) for f in files])))


def count_rows(cfg: "AuditConfig", storage: StorageOptions | None = None, *,
               mapper: Mapper | None = None) -> dict[str, int]:
    """Rows per split (``rows_in``); ``mapper`` as in :func:`count_split_rows`."""
    storage = storage or cfg.storage.options()
    return {name: count_split_rows(spec, storage, mapper=mapper) for name, spec in cfg.data.splits.items()}


def declared_class_names(cfg: "AuditConfig", storage: StorageOptions | None = None) -> list[str] | None:
    """The class names a dataset declares itself (Hugging Face: the ``huggingface`` Parquet schema
    metadata, or ``dataset_info.json`` beside the files), for configs without ``data.class_names``:
    the first Parquet split that declares them; a split that declares others is an error."""
    storage = storage or cfg.storage.options()
    found: tuple[str, list[str]] | None = None
    for name, spec in cfg.data.splits.items():
        if spec.format != "parquet" or not spec.label_column:
            continue
        fs, base, files = split_files(spec, storage)
        names = parquet.class_names(fs, files, base, spec.label_column)
        if names is None:
            continue
        if found is not None and names != found[1]:
            raise ValueError(f"splits {found[0]!r} and {name!r} declare different class names in their metadata "
                             f"({found[1][:5]}… vs {names[:5]}…); set data.class_names")
        found = found or (name, names)
    return found[1] if found else None


@dataclass
class SplitScan:
    """What planning learns from the splits' metadata."""

    rows_in: dict[str, int]
    # the Arrow type of each carried column, where the source fixes it (Parquet footers; the
    # image-folder columns are strings); the published table keeps exactly these types
    carried_types: dict[str, pa.DataType] = field(default_factory=dict)


def _plain(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded type compares as its values' type (files may differ in index width)."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _numeric_or_null(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)


def _read_columns(spec: "SplitSpec") -> dict[str, str]:
    """The columns an audit reads from a Parquet split → the config key that names each."""
    cols = {spec.image_column: "image_column"}
    if spec.label_column:
        cols[spec.label_column] = "label_column"
    if spec.id_column:
        cols[spec.id_column] = "id_column"
    for k in spec.keep_columns:
        cols.setdefault(k, "keep_columns")
    return cols


def _parquet_types(cfg: "AuditConfig", name: str, spec: "SplitSpec", files: list[SourceFile],
                   footers: list[tuple[int, pa.Schema]]) -> dict[str, pa.DataType]:
    """Check a Parquet split's footers: every read column in every file, one type per column
    across the files (null, an all-null column, agrees with any), labels numeric. Returns the
    type of each read column (null when every file holds only nulls)."""
    wanted = _read_columns(spec)
    seen: dict[str, tuple[pa.DataType, str, str]] = {}  # column -> (type, file, its full path)
    for f, (_, schema) in zip(files, footers):
        for col, key in wanted.items():
            i = schema.get_field_index(col)
            if i < 0:
                hint = " (set label_column: null for an unlabelled split)" if key == "label_column" else ""
                raise cfg.error(f"data.splits.{name}.{key}", f"{f.rel} ({f.path}) has no column {col!r}{hint}; "
                                f"its columns are {schema.names}")
            t = schema.field(i).type
            if pa.types.is_null(t):
                continue
            if col in seen and _plain(seen[col][0]) != _plain(t):
                raise cfg.error(f"data.splits.{name}.{key}",
                                f"column {col!r} is {seen[col][0]} in {seen[col][1]} but {t} in {f.rel}: the files of "
                                "a split must agree on the type of every column the audit reads")
            seen.setdefault(col, (t, f.rel, f.path))
    for col, key in wanted.items():
        t, rel, path = seen.get(col, (pa.null(), "", ""))
        where = f"{rel} ({path})" if path else rel
        problem = None
        if key == "label_column" and not _numeric_or_null(_plain(t)):
            problem = "labels must be integers (class indices)"
        elif key == "image_column" and not pa.types.is_null(t) and (
                _numeric_or_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            problem = "images must be encoded bytes (PNG/JPEG/…) or arrays"
        elif key == "id_column" and (pa.types.is_nested(t) or pa.types.is_floating(t)):
            problem = "ids must be strings or integers"
        if problem:
            raise cfg.error(f"data.splits.{name}.{key}", f"column {col!r} is {t} in {where}: {problem}")
    return {col: seen.get(col, (pa.null(), "", ""))[0] for col in wanted}


def scan_splits(cfg: "AuditConfig", storage: StorageOptions | None = None, *,
                mapper: Mapper | None = None, defer: Sequence[str] = ()) -> SplitScan:
    """Rows per split and the carried columns' types, from metadata (no Ray job; ``mapper`` runs
    the per-file counts of the formats without footers, as in :func:`count_split_rows`); a split
    that cannot be read as configured is a :class:`~vog_ray.config.ConfigError` naming the file and
    key. Splits of a format in ``defer`` are left out of ``rows_in`` (the caller counts them:
    WebDataset shards need a pass over every member header, run as Ray tasks)."""
    storage = storage or cfg.storage.options()
    rows: dict[str, int] = {}
    types: dict[str, tuple[pa.DataType, str]] = {}
    for name, spec in cfg.data.splits.items():
        split_types: dict[str, pa.DataType] = {}
        try:
            if spec.format == "parquet":
                fs, _, files = split_files(spec, storage)
                footers = _map_threads(lambda f: parquet.footer(fs, f), files)
                rows[name] = int(sum(n for n, _ in footers))
                read = _parquet_types(cfg, name, spec, files, footers)
                split_types = {k: read[k] for k in spec.keep_columns}
            else:
                if spec.format not in defer:
                    rows[name] = count_split_rows(spec, storage, mapper=mapper)
                if spec.format == "image_folder":
                    split_types = {k: pa.string() for k in spec.keep_columns}
        except ConfigError as e:
            if str(e).startswith("invalid config"):
                raise
            raise cfg.error(f"data.splits.{name}.url", str(e)) from None
        except FileNotFoundError as e:  # a failure (exit 1), naming the key
            raise FileNotFoundError(f"data.splits.{name}.url: {e}") from None
        for col, t in split_types.items():
            if pa.types.is_null(t):
                continue
            if col in types and _plain(types[col][0]) != _plain(t):
                raise cfg.error(f"data.splits.{name}.keep_columns",
                                f"carried column {col!r} is {t} here but {types[col][0]} in split {types[col][1]!r}: "
                                "splits must agree on the type of a column they carry")
            types.setdefault(col, (t, name))
    return SplitScan(rows, {c: t for c, (t, _) in types.items()})


def check_output_apart(cfg: "AuditConfig", storage: StorageOptions | None = None) -> None:
    """The output URL may not lie inside an input URL, nor an input inside the output: a rerun
    would read the published Parquet as input (or a split's listing would change under it)."""
    storage = storage or cfg.storage.options()
    ofs, out = resolve(cfg.output.url, storage)
    oproto = ofs.protocol if isinstance(ofs.protocol, str) else ofs.protocol[0]
    out = out.rstrip("/") or out
    for name, spec in cfg.data.splits.items():
        for proto, base in split_bases(spec, storage):
            if proto != oproto:
                continue
            if out == base or out.startswith(base.rstrip("/") + "/"):
                raise cfg.error("output.url", f"{cfg.output.url!r} lies inside the input of split {name!r} ({base}): "
                                "the published tables would be read as input by the next audit; write the "
                                "output elsewhere")
            if base.startswith(out.rstrip("/") + "/"):
                raise cfg.error("output.url", f"{cfg.output.url!r} holds the input of split {name!r} ({base}): "
                                "write the output apart from the data")


def _peek_payloads(spec: "SplitSpec", storage: StorageOptions | None, n: int = 16) -> list[Any]:
    """The image payloads of the first few rows of a split, read directly (no Ray)."""
    if spec.format == "image_folder":
        return image_folder.peek_payloads(spec, storage, n)
    fs, _, files = split_files(spec, storage)
    for f in files:
        if spec.format in ("parquet", "webdataset", "manifest"):
            if spec.format == "parquet":
                payloads = parquet.peek_payloads(fs, f, spec, n)
            elif spec.format == "webdataset":
                payloads = webdataset.peek_payloads(fs, f, spec, n)
            else:
                payloads = manifest.peek_payloads(fs, f, spec, n, storage or StorageOptions())
            if payloads is None:
                continue
            return payloads
        x = (cifar if spec.format == "cifar" else npz).load_arrays(fs, f, spec)["__x__"]
        if len(x):
            return [npy_bytes(a) for a in x[:n]]
    return []


def infer_input_shape(cfg: "AuditConfig", storage: StorageOptions | None = None, *,
                      sample: int = 16) -> tuple[int, ...]:
    """The model input shape the decode stage produces: (C, H, W), or (D,) with flatten/vectors.

    Decodes the first rows of each split in config order; the most common shape among the
    decodable rows of the first split that has any wins. Rows of another shape are rejected
    later (``bad_shape``), never silently reshaped.
    """
    from collections import Counter

    storage = storage or cfg.storage.options()
    t = cfg.data.transform
    for name, spec in cfg.data.splits.items():
        shapes: Counter = Counter()
        for payload in _peek_payloads(spec, storage, sample):
            try:
                shapes[tuple(decode_row(payload, t).shape)] += 1
            except Reject:
                continue
        if shapes:
            shape = shapes.most_common(1)[0][0]
            return (int(np.prod(shape)),) if t.flatten else shape
    raise ValueError("cannot infer the model input shape: the first rows of no split decode "
                     f"(splits: {list(cfg.data.splits)})")
