"""What the pipeline learns about the splits before any Ray job: rows per split (``rows_in``,
from metadata where the format has it) and the model input shape, from decoding the first rows
of each split. Imports neither Ray nor torch: a caller may pass a ``mapper`` that runs the
per-file counts elsewhere (the audit runs the WebDataset header passes as Ray tasks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..storage import StorageOptions
from . import cifar, image_folder, manifest, npz, parquet, webdataset
from .decode import Reject, decode_row
from .listing import SourceFile, folder_files, split_files
from .rows import npy_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AuditConfig, SplitSpec

__all__ = ["count_split_rows", "count_rows", "infer_input_shape", "file_rows", "Mapper", "declared_class_names"]

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
