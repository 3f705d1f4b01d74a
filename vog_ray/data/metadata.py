"""What the pipeline learns about the splits before any Ray job: rows per split (``rows_in``,
from metadata where the format has it) and the model input shape, from decoding the first rows
of each split. Imports neither Ray nor torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..storage import StorageOptions
from . import cifar, image_folder, npz, parquet
from .decode import Reject, decode_row
from .listing import SourceFile, folder_files, split_files
from .rows import npy_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AuditConfig, SplitSpec

__all__ = ["count_split_rows", "count_rows", "infer_input_shape"]


def _map_threads(fn: Callable[[Any], Any], items: Sequence[Any], max_workers: int = 16) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        return list(pool.map(fn, items))


def count_split_rows(spec: "SplitSpec", storage: StorageOptions | None = None) -> int:
    """The number of rows ``read_split`` yields for a split, from metadata where the format has
    it (parquet footers, npz headers, the image-folder listing); CIFAR batches are unpickled.
    Parquet footers are checked for the columns the split reads (``parquet.check_columns``)."""
    storage = storage or StorageOptions()
    if spec.format == "image_folder":
        return len(folder_files(spec, storage)[2])
    fs, _, files = split_files(spec, storage)

    def rows(f: SourceFile) -> int:
        if spec.format == "parquet":
            return parquet.num_rows(fs, f, spec)
        if spec.format == "npz":
            return npz.num_rows(fs, f, spec)
        return cifar.num_rows(fs, f)

    return int(sum(_map_threads(rows, files)))


def count_rows(cfg: "AuditConfig", storage: StorageOptions | None = None) -> dict[str, int]:
    """Rows per split (``rows_in``), without running a Ray job."""
    storage = storage or cfg.storage.options()
    return {name: count_split_rows(spec, storage) for name, spec in cfg.data.splits.items()}


def _peek_payloads(spec: "SplitSpec", storage: StorageOptions | None, n: int = 16) -> list[Any]:
    """The image payloads of the first few rows of a split, read directly (no Ray)."""
    if spec.format == "image_folder":
        return image_folder.peek_payloads(spec, storage, n)
    fs, _, files = split_files(spec, storage)
    for f in files:
        if spec.format == "parquet":
            payloads = parquet.peek_payloads(fs, f, spec, n)
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
