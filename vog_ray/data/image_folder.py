"""Image-folder splits (ImageNet layout, one sub-folder per class): the Ray read (Ray's binary
file reader, then :func:`folder_rows` maps paths to ids and labels), the first payloads, and
image files by id for reports. Imports Ray only inside :func:`read_image_folder`."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyarrow as pa

from ..storage import StorageOptions
from .listing import IMAGE_EXTENSIONS, folder_files, folder_root, list_classes

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from ..config import SplitSpec

__all__ = ["folder_rows", "read_image_folder", "peek_payloads", "fetch_files"]


def folder_rows(batch: pa.Table, *, root: str, class_to_idx: dict[str, int], split: str,
                keep: Sequence[str]) -> pa.Table:
    """Rows of Ray's binary-file batch (``path``, ``bytes``): id = path under the root, label =
    the class folder's index; ``class_name`` and ``path`` are the keep columns there are."""
    paths = batch.column("path").to_pylist()
    prefix = root.rstrip("/") + "/"
    ids, labels, classes = [], [], []
    for p in paths:
        p2 = p.split("://", 1)[-1] if "://" in p else p
        if not p2.startswith(prefix):
            i = p2.find(prefix.lstrip("/"))
            if i < 0:
                raise ValueError(f"image path {p!r} is not under the image_folder root {root!r}")
            rel = p2[i + len(prefix.lstrip("/")):]
        else:
            rel = p2[len(prefix):]
        cls = rel.split("/", 1)[0]
        ids.append(rel)
        classes.append(cls)
        labels.append(class_to_idx.get(cls, -1))
    n = len(paths)
    cols = {
        "id": pa.array(ids, pa.string()),
        "split": pa.array([split] * n, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "image": batch.column("bytes").cast(pa.binary()),
    }
    for k in keep:
        if k == "class_name":
            cols[k] = pa.array(classes, pa.string())
        elif k == "path":
            cols[k] = pa.array(ids, pa.string())
    return pa.table(cols)


def read_image_folder(name: str, spec: "SplitSpec", storage: StorageOptions, *,
                      override_num_blocks: int | None = None,
                      class_names: Sequence[str] | None = None) -> "ray.data.Dataset":
    """The Ray Dataset of an image-folder split (see :func:`vog_ray.data.dataset.read_split`)."""
    import ray.data

    bad = [k for k in spec.keep_columns if k not in ("class_name", "path")]
    if bad:
        raise ValueError(f"split {name!r}: an image_folder split can keep only 'class_name' and 'path', "
                         f"not {bad}")
    if spec.id_column:
        raise ValueError(f"split {name!r}: an image_folder split takes its ids from the paths (no id_column)")
    fs, root = folder_root(spec, storage)
    folders = list_classes(spec, storage)
    if class_names is not None:
        unknown = [c for c in folders if c not in class_names]
        if unknown:
            raise ValueError(f"split {name!r}: class folder(s) {unknown[:5]} are not in data.class_names")
        class_to_idx = {c: list(class_names).index(c) for c in folders}
    else:
        class_to_idx = {c: i for i, c in enumerate(folders)}
    ds = ray.data.read_binary_files(
        [posixpath.join(root, c) for c in folders], filesystem=fs, include_paths=True,
        file_extensions=list(IMAGE_EXTENSIONS), override_num_blocks=override_num_blocks)
    return ds.map_batches(folder_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                          fn_kwargs=dict(root=root, class_to_idx=class_to_idx, split=name,
                                         keep=list(spec.keep_columns)))


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
