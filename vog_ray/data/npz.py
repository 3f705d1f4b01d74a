"""``.npz`` splits (numpy arrays, read without pickle): a file's rows inside a Ray read task,
row counts from the ``.npy`` headers inside the zip, and its arrays for payload peeks and
fetches. Imports neither Ray nor torch."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from .listing import SourceFile
from .rows import array_blocks, ids_array, labels_array

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["read_file", "num_rows", "load_arrays"]


def _npz_arrays(fs, path: str, rel: str) -> dict[str, np.ndarray]:
    with fs.open(path, "rb") as fh:
        data = io.BytesIO(fh.read())
    try:
        with np.load(data, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise ValueError(f"{rel}: cannot read npz without pickle ({e})") from None


def _npz_image_key(d: dict[str, np.ndarray], spec: "SplitSpec", rel: str) -> str:
    for k in (spec.image_column, "x"):
        if k in d:
            return k
    raise KeyError(f"{rel}: no image array {spec.image_column!r} or 'x' (arrays: {sorted(d)})")


def _npz_label_key(d: dict[str, np.ndarray], spec: "SplitSpec", rel: str) -> str | None:
    if spec.label_column is None:
        return None
    for k in (spec.label_column, "y"):
        if k in d:
            return k
    raise KeyError(f"{rel}: no label array {spec.label_column!r} or 'y' (arrays: {sorted(d)}); "
                   "set label_column: null for an unlabelled split")


def _npz_images(d: dict[str, np.ndarray], spec: "SplitSpec", rel: str) -> np.ndarray:
    x = d[_npz_image_key(d, spec, rel)]
    if x.ndim < 1:
        raise ValueError(f"{rel}: the image array is a scalar")
    if spec.image_shape and x.ndim == 2 and x.shape[1] == int(np.prod(spec.image_shape)):
        x = x.reshape((len(x), *spec.image_shape))
    return x


def read_file(fs, f: SourceFile, name: str, spec: "SplitSpec") -> Iterator[pa.Table]:
    """The rows of one ``.npz`` file as blocks (inside a Ray read task)."""
    d = _npz_arrays(fs, f.path, f.rel)
    x = _npz_images(d, spec, f.rel)
    n = len(x)
    lk = _npz_label_key(d, spec, f.rel)
    labels = labels_array(d[lk] if lk else None, n, f.rel, lk or "")
    ids = None
    if spec.id_column:
        if spec.id_column not in d:
            raise KeyError(f"{f.rel}: no array {spec.id_column!r} for id_column (arrays: {sorted(d)})")
        ids = ids_array(d[spec.id_column], n, f.rel, spec.id_column)
    keep = {}
    for k in spec.keep_columns:
        if k not in d:
            raise KeyError(f"{f.rel}: no array {k!r} for keep_columns (arrays: {sorted(d)})")
        keep[k] = d[k]
    yield from array_blocks(x, labels, ids, f.rel, name, keep)


def num_rows(fs, f: SourceFile, spec: "SplitSpec") -> int:
    """The number of rows of a file, from the header of its image array (no array is loaded)."""
    import zipfile

    with fs.open(f.path, "rb") as fh:
        with zipfile.ZipFile(fh) as zf:
            names = zf.namelist()
            key = next((k for k in (spec.image_column, "x") if f"{k}.npy" in names), None)
            if key is None:
                raise KeyError(f"{f.rel}: no image array {spec.image_column!r} or 'x' "
                               f"(arrays: {sorted(n[:-4] for n in names)})")
            with zf.open(f"{key}.npy") as m:
                version = np.lib.format.read_magic(m)
                if version == (1, 0):
                    shape = np.lib.format.read_array_header_1_0(m)[0]
                elif version == (2, 0):
                    shape = np.lib.format.read_array_header_2_0(m)[0]
                else:
                    return len(_npz_arrays(fs, f.path, f.rel)[key])
    return int(shape[0]) if shape else 1


def load_arrays(fs, f: SourceFile, spec: "SplitSpec") -> dict[str, Any]:
    """A file's arrays, plus its images (reshaped to ``image_shape`` if flat) under ``"__x__"``."""
    d = dict(_npz_arrays(fs, f.path, f.rel))
    d["__x__"] = _npz_images(d, spec, f.rel)
    return d
