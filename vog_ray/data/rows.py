"""The row schema every format reads into (``id``, ``split``, ``label``, ``image``, keep
columns): building blocks of rows, ids, labels and ``.npy`` payloads, and the conversion of a
table's image column to the binary ``image`` column. Imports neither Ray nor torch."""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from ..config import DataError
from ..core.table import keep_array

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["ROW_COLUMNS", "OK", "NPY_MAGIC", "REJECT_MAGIC", "reject_payload", "npy_bytes", "label_type_ok",
           "labels_array", "ids_array", "make_block",
           "row_ids", "rows_per_block", "array_blocks", "image_column_to_binary", "raw_rows"]

NPY_MAGIC = b"\x93NUMPY"
# a reader that cannot produce a row's image (a fetch failed, a shard was cut short) puts this
# marker and the reason in the ``image`` column; the decode stage turns it into the row's status
REJECT_MAGIC = b"\x00vog-ray-reject\x00"
ROW_COLUMNS = ("id", "split", "label", "image")
OK = "ok"
_TARGET_BLOCK_BYTES = 32 * 1024 * 1024
PATH_READ_THREADS = 16   # concurrent reads of image files named by a Hugging Face image struct's path


@functools.lru_cache(maxsize=64)
def _npy_header_for(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(shape, np.dtype(dtype_str)), allow_pickle=False)
    data = buf.getvalue()
    return data[:len(data) - int(np.prod(shape)) * np.dtype(dtype_str).itemsize]


def reject_payload(reason: str) -> bytes:
    """An ``image`` payload that the decode stage rejects with ``reason`` as the row's status."""
    return REJECT_MAGIC + reason.encode("utf-8", "replace")


def npy_bytes(a: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (C order); the header is built once per dtype and shape."""
    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise TypeError("object arrays cannot be stored as raw images")
    return _npy_header_for(a.dtype.str, a.shape) + a.tobytes()


def label_type_ok(t: pa.DataType) -> bool:
    """Whether a column of this type can hold labels (integers; whole floats, bools and nulls pass)."""
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)


def labels_array(values: Any, n: int, source: str, column: str) -> np.ndarray:
    """Labels as int64 (``-1`` for none or null); non-integer labels are an :class:`DataError`."""
    if values is None:
        return np.full(n, -1, np.int64)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if not label_type_ok(values.type):
            raise DataError(f"{source}: label column {column!r} must be integer, got {values.type}")
        values = values.cast(pa.float64()).fill_null(-1).to_numpy(zero_copy_only=False)
    arr = np.asarray(values)
    if arr.dtype.kind not in "iufb":
        raise DataError(f"{source}: label column {column!r} must be integer, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        arr = np.where(np.isfinite(arr), arr, -1)
        if np.any(arr != np.round(arr)):
            raise DataError(f"{source}: label column {column!r} holds non-integer values")
    arr = arr.astype(np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{source}: {n} images but {len(arr)} labels")
    return arr


def ids_array(values: Any, n: int, source: str, column: str) -> pa.Array:
    """An ``id_column`` as Arrow strings; nulls or a wrong length are an error."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.cast(pa.string()) if not pa.types.is_binary(values.type) else \
            pa.array([v.decode("utf-8", "replace") if v is not None else None for v in values.to_pylist()])
    else:
        vals = np.asarray(values).reshape(-1)
        arr = pa.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in vals], pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) != n:
        raise ValueError(f"{source}: id column {column!r} has {len(arr)} values for {n} rows")
    if arr.null_count:
        raise ValueError(f"{source}: id column {column!r} holds nulls")
    return arr


def make_block(ids: pa.Array, split: str, labels: np.ndarray, images: pa.Array,
               keep: dict[str, pa.Array]) -> pa.Table:
    """One block of rows: ``id``, ``split``, ``label``, ``image``, then the keep columns."""
    n = len(ids)
    cols = {
        "id": ids,
        "split": pa.array([split] * n, pa.string()) if n else pa.array([], pa.string()),
        "label": pa.array(labels, pa.int64()),
        "image": images,
    }
    for k, v in keep.items():
        cols[k] = v
    return pa.table(cols)


def row_ids(rel: str, start: int, n: int) -> pa.Array:
    """The ids ``"<rel>:<row>"`` of ``n`` rows of a file from row ``start``."""
    return pa.array([f"{rel}:{i}" for i in range(start, start + n)], pa.string())


def rows_per_block(bytes_per_row: float) -> int:
    """Rows per block for blocks of about 32 MiB (16 to 65,536 rows)."""
    return int(max(16, min(65536, _TARGET_BLOCK_BYTES // max(1.0, bytes_per_row))))


def array_blocks(x: np.ndarray, labels: np.ndarray, ids: pa.Array | None, rel: str, name: str,
                 keep: dict[str, Any]) -> Iterator[pa.Table]:
    """Blocks of rows from in-memory arrays (CIFAR, npz): images as ``.npy`` payloads."""
    n = len(x)
    per_row = x[0].nbytes if n else 1
    step = rows_per_block(per_row)
    for s in range(0, n, step):
        e = min(n, s + step)
        images = pa.array([npy_bytes(x[i]) for i in range(s, e)], pa.binary())
        bid = ids.slice(s, e - s) if ids is not None else row_ids(rel, s, e - s)
        yield make_block(bid, name, labels[s:e], images, {k: keep_array(v[s:e]) for k, v in keep.items()})


def image_column_to_binary(col: pa.Array, spec: "SplitSpec", source: str,
                           read_path: Optional[Callable[[str], Optional[bytes]]] = None) -> pa.Array:
    """The parquet image column as binary: encoded bytes as they are, raw arrays as ``.npy``.

    A Hugging Face image struct ``{bytes, path}`` gives its ``bytes``; a row whose ``bytes`` are
    null and whose ``path`` is set is read with ``read_path(path)`` (the Parquet reader resolves
    it against the file's directory)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:  # Hugging Face {bytes, path}
        paths = col.field("path").to_pylist() if t.get_field_index("path") >= 0 else None
        col = col.field("bytes")
        if paths is not None and read_path is not None and col.null_count:
            data = col.to_pylist()
            need = [i for i, (b, p) in enumerate(zip(data, paths)) if b is None and p]
            for i, b in zip(need, _read_all(read_path, [paths[i] for i in need])):
                data[i] = b
            col = pa.array(data, pa.binary())
        t = col.type
    if pa.types.is_large_binary(t):
        return col.cast(pa.binary())
    if pa.types.is_binary(t):
        return col
    rows = raw_rows(col, source, spec.image_column)
    shape = tuple(spec.image_shape) if spec.image_shape else None
    out = []
    for r in rows:
        if r is None:
            out.append(None)
            continue
        if shape is not None and r.size == int(np.prod(shape)) and r.shape != shape:
            r = r.reshape(shape)
        out.append(npy_bytes(r))
    return pa.array(out, pa.binary())


def _read_all(read_path: Callable[[str], Optional[bytes]], paths: list[str]) -> list[Optional[bytes]]:
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) <= 1:
        return [read_path(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(PATH_READ_THREADS, len(paths))) as pool:
        return list(pool.map(read_path, paths))


def raw_rows(col: pa.Array, source: str, name: str) -> list[Optional[np.ndarray]]:
    """The rows of a list/array (or tensor extension) image column as numpy arrays (None: null)."""
    t = col.type
    if isinstance(t, pa.ExtensionType):
        to_np = getattr(col, "to_numpy", None)
        try:
            arr = to_np(zero_copy_only=False) if to_np else None
        except TypeError:
            arr = to_np()
        if arr is None:
            return raw_rows(col.storage, source, name)
        return [np.asarray(a) for a in arr]
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        vt = t.value_type
        if not (pa.types.is_list(vt) or pa.types.is_fixed_size_list(vt) or pa.types.is_large_list(vt)):
            # one level: slice the flat values by offsets
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            if pa.types.is_fixed_size_list(t):
                flat = col.flatten().to_numpy(zero_copy_only=False)
                size = t.list_size
                starts = np.cumsum(valid) - 1
                return [flat[starts[i] * size:(starts[i] + 1) * size] if valid[i] else None
                        for i in range(len(col))]
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False)
            return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(col))]
        out = []
        for v in col.to_pylist():
            try:
                out.append(None if v is None else np.asarray(v))
            except ValueError:
                out.append(np.asarray(v, dtype=object))  # ragged: decode rejects the row
        return out
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        raise TypeError(f"{source}: image column {name!r} holds scalars ({t}), not images")
    raise TypeError(f"{source}: image column {name!r} has unsupported type {t} "
                    "(expected encoded bytes, a list/array, or a {bytes, path} struct)")
