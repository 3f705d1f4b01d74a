"""Image-folder splits (ImageNet layout, one sub-folder per class): the Ray read (the split's
datasource over the files of :func:`~.listing.folder_sources` — the same listing the row count
uses — read by :func:`read_images`), the first payloads, and image files by id for reports.
Imports Ray only inside :func:`read_image_folder`."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import pyarrow as pa

from ..storage import StorageOptions
from .listing import SourceFile, folder_files, folder_root, folder_sources, list_classes
from .rows import rows_per_block

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from ..config import SplitSpec

__all__ = ["read_images", "class_indices", "read_image_folder", "peek_payloads", "fetch_files"]


def read_images(fs, files: Sequence[SourceFile], name: str, spec: "SplitSpec",
                class_to_idx: dict[str, int]) -> Iterator[pa.Table]:
    """Blocks of rows of image files (inside a Ray read task): id = the path under the root,
    label = the class folder's index; ``class_name`` and ``path`` are the keep columns there are.
    A file is opened through its path, so a symlink inside the root is read as its target."""
    files = list(files)
    step = rows_per_block(sum(f.size for f in files) / max(1, len(files)))
    for a in range(0, len(files), step):
        chunk = files[a:a + step]
        data = []
        for f in chunk:
            with fs.open(f.path, "rb") as fh:
                data.append(fh.read())
        ids = [f.rel for f in chunk]
        classes = [r.split("/", 1)[0] for r in ids]
        cols = {
            "id": pa.array(ids, pa.string()),
            "split": pa.array([name] * len(chunk), pa.string()),
            "label": pa.array([class_to_idx.get(c, -1) for c in classes], pa.int64()),
            "image": pa.array(data, pa.binary()),
        }
        for k in spec.keep_columns:
            cols[k] = pa.array(classes if k == "class_name" else ids, pa.string())
        yield pa.table(cols)


def class_indices(name: str, spec: "SplitSpec", storage: StorageOptions,
                  class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Label of each class folder: its index in ``class_names`` when given (a folder not in it is
    an error), else in the sorted folder names."""
    folders = list_classes(spec, storage)
    if class_names is None:
        return {c: i for i, c in enumerate(folders)}
    unknown = [c for c in folders if c not in class_names]
    if unknown:
        raise ValueError(f"split {name!r}: class folder(s) {unknown[:5]} are not in data.class_names")
    return {c: list(class_names).index(c) for c in folders}


def read_image_folder(name: str, spec: "SplitSpec", storage: StorageOptions, *,
                      override_num_blocks: int | None = None,
                      class_names: Sequence[str] | None = None) -> "ray.data.Dataset":
    """The Ray Dataset of an image-folder split (see :func:`vog_ray.data.dataset.read_split`)."""
    import ray.data

    from .datasource import SplitDatasource

    class_to_idx = class_indices(name, spec, storage, class_names)
    fs, _, files = folder_sources(spec, storage)
    return ray.data.read_datasource(SplitDatasource(name, spec, fs, files, class_to_idx=class_to_idx),
                                    override_num_blocks=override_num_blocks)


def peek_payloads(spec: "SplitSpec", storage: StorageOptions | None, n: int) -> list[Any]:
    """The bytes of the first ``n`` images (in the order of :func:`folder_files`)."""
    fs, root, rels = folder_files(spec, storage)
    return [fs.cat_file(posixpath.join(root, r)) for r in rels[:n]]


def fetch_files(spec: "SplitSpec", storage: StorageOptions, ids: Sequence[str], on_error: str,
                found: Callable[[str, bytes], None]) -> None:
    """``found(id, bytes)`` for each id (a path under the root); a missing file is a ``KeyError``
    with ``on_error="raise"``, else left out."""
    fs, root = folder_root(spec, storage)
    for i in ids:
        path = posixpath.join(root, i)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            if on_error == "raise":
                raise KeyError(f"id {i!r}: no file {path}") from None
            continue
        found(i, data)
