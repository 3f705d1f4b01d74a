"""The Ray ``Datasource`` of a parquet, CIFAR, npz, image-folder, WebDataset or manifest split: its
files (parquet files split by row groups when there are fewer files than blocks, Parquet manifests
by rows: ``manifest.rows_per_task`` images fetched per task) in contiguous groups of similar size,
one read task per group. Imports ``ray.data``: only the dataset code imports this module."""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..storage import StorageOptions
from . import cifar, image_folder, manifest, npz, parquet, webdataset
from .listing import SourceFile

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["Piece", "balanced_groups", "SplitDatasource"]


@dataclass(frozen=True)
class Piece:
    file: SourceFile
    rg_start: Optional[int] = None   # parquet row groups [rg_start, rg_stop); None: the whole file
    rg_stop: Optional[int] = None
    row_start: Optional[int] = None  # manifest rows [row_start, row_stop); None: the whole file
    row_stop: Optional[int] = None


def balanced_groups(pieces: list[Piece], k: int, weight: Callable[[Piece], float]) -> list[list[Piece]]:
    """Split pieces (kept in order) into at most k contiguous groups of similar weight."""
    k = max(1, min(k, len(pieces)))
    total = sum(weight(p) for p in pieces) or float(len(pieces))
    groups: list[list[Piece]] = [[]]
    acc = 0.0
    for i, p in enumerate(pieces):
        remaining_pieces = len(pieces) - i
        remaining_groups = k - len(groups)
        if groups[-1] and remaining_groups > 0 and (acc >= total * len(groups) / k
                                                    or remaining_pieces <= remaining_groups):
            groups.append([])
        groups[-1].append(p)
        acc += weight(p) or total / len(pieces)
    return groups


class SplitDatasource(Datasource):
    """The rows of one split (``name``) read from ``files`` on ``fs``."""

    def __init__(self, name: str, spec: "SplitSpec", fs, files: list[SourceFile], *,
                 class_to_idx: dict[str, int] | None = None, storage: StorageOptions | None = None):
        super().__init__()
        self._name, self._spec, self._fs, self._files = name, spec, fs, files
        self._class_to_idx = class_to_idx  # image folders: the label of each class folder
        self._storage = storage or StorageOptions()  # manifests: the images' filesystems

    def get_name(self) -> str:
        return f"Read{self._spec.format.capitalize()}"

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return int(sum(f.size for f in self._files)) or None

    def _manifest_pieces(self) -> list[Piece]:
        """Parquet manifests in ranges of ``manifest.rows_per_task`` rows (their footers say how
        many); CSV/JSONL manifests whole (one task each: they cannot be split without parsing)."""
        per = self._spec.manifest.rows_per_task
        out: list[Piece] = []
        for f in self._files:
            if manifest.table_format(self._spec, f.rel) != "parquet":
                out.append(Piece(f))
                continue
            n = manifest.num_rows(self._fs, f, self._spec)
            for a in range(0, max(n, 1), per):
                b = min(n, a + per)
                out.append(Piece(SourceFile(f.path, f.rel, f.size * (b - a) // max(n, 1)), row_start=a, row_stop=b))
        return out

    def _pieces(self, parallelism: int) -> list[Piece]:
        if self._spec.format == "manifest":
            return self._manifest_pieces()
        pieces = [Piece(f) for f in self._files]
        if self._spec.format != "parquet" or len(self._files) >= parallelism:
            return pieces
        # fewer files than blocks asked for: split files by row groups (ids stay file:row)
        out: list[Piece] = []
        per_file = max(1, math.ceil(parallelism / len(self._files)))
        with ThreadPoolExecutor(max_workers=min(16, len(self._files))) as pool:
            counts = list(pool.map(functools.partial(parquet.num_row_groups, self._fs), self._files))
        for f, n_rg in zip(self._files, counts):
            k = min(per_file, n_rg)
            if k <= 1:
                out.append(Piece(f))
                continue
            bounds = np.linspace(0, n_rg, k + 1).round().astype(int)
            out.extend(Piece(SourceFile(f.path, f.rel, f.size * int(b - a) // n_rg), int(a), int(b))
                       for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
        return out

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list:
        parallelism = max(1, int(parallelism)) if parallelism and parallelism > 0 else len(self._files)
        pieces = self._pieces(parallelism)
        if self._spec.format == "manifest":  # a task per piece: fetching, not reading, is the work
            parallelism = max(parallelism, len(pieces))
        groups = balanced_groups(pieces, parallelism, lambda p: p.file.size)
        fs_, spec_, name_, classes_, storage_ = self._fs, self._spec, self._name, self._class_to_idx, self._storage

        def read_fn(group: list[Piece]) -> Iterable[pa.Table]:
            if spec_.format == "image_folder":
                yield from image_folder.read_images(fs_, [p.file for p in group], name_, spec_, classes_ or {})
                return
            for p in group:
                if spec_.format == "parquet":
                    yield from parquet.read_piece(fs_, p, name_, spec_, storage_)
                elif spec_.format == "cifar":
                    yield from cifar.read_file(fs_, p.file, name_, spec_)
                elif spec_.format == "webdataset":
                    yield from webdataset.read_file(fs_, p.file, name_, spec_)
                elif spec_.format == "manifest":
                    yield from manifest.read_piece(fs_, p, name_, spec_, storage_)
                else:
                    yield from npz.read_file(fs_, p.file, name_, spec_)

        tasks = []
        for g in groups:
            meta = BlockMetadata(num_rows=None, size_bytes=int(sum(p.file.size for p in g)) or None,
                                 input_files=[p.file.path for p in g], exec_stats=None)
            tasks.append(ReadTask(functools.partial(read_fn, g), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks
