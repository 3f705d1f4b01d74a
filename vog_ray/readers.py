"""Ray Data readers for the audited splits, the decode stage, and image fetches for reports.

Every split becomes rows with the same columns, whatever its format:

=========  =========================================================================
``id``     string, stable across runs and independent of the block layout (below)
``split``  the split name
``label``  int64; ``-1`` when the split has no label column (or the label is null)
``image``  binary: the encoded file (PNG/JPEG/…) or, for raw arrays, ``.npy`` bytes
``…``      the split's ``keep_columns``
=========  =========================================================================

One binary ``image`` column for every format keeps the schema of a union of splits uniform
(encoded and raw splits mix), lets raw images of any shape travel, and leaves *all* decoding to
:func:`decode_batch`, where a bad row becomes a ``status`` reason instead of a failed task.

Ids (what :func:`fetch_images` reads back):

* ``parquet`` — the ``id_column`` when given, else ``"<file>:<row>"``: the file's path relative to
  the split's base directory and the row index within that file (``"part-00000.parquet:17"``);
* ``image_folder`` — the image's path relative to the root (``"cat/0001.png"``);
* ``cifar`` — ``"<batch file>:<row>"`` (``"data_batch_1:123"``), or the ``id_column`` (e.g. ``filenames``);
* ``npz`` — ``"<file>:<row>"`` (``"ood.npz:5"``), or the ``id_column`` array.

The base directory of a split is the directory a URL names, the parent of a single file, the
fixed prefix of a glob, and the common directory of those for a list of URLs.

Readers never drop a row: every row read leaves :func:`decode_batch` either with
``status == "ok"`` or with a reason, so ``rows_in == rows_scored + rows_rejected``;
:func:`count_rows` gives ``rows_in`` per split from metadata, without a Ray job.

The pipeline: ``decode(dataset_from_config(cfg, storage), cfg)`` → rows with ``id``, ``split``,
``label``, ``x`` (float32), ``status`` and the keep columns. Reports: :func:`fetch_images`.
"""

from __future__ import annotations

import functools
import io
import math
import pickle
import posixpath
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from .storage import StorageOptions, natural_key, resolve

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from .config import AuditConfig, SplitSpec, TransformSpec

__all__ = [
    "read_split", "dataset_from_config", "decode_batch", "decode", "split_rejected", "fetch_images",
    "count_rows", "count_split_rows", "infer_input_shape",
    "list_classes", "list_split_files", "SourceFile", "load_cifar_batch", "CifarPickleError",
    "write_parquet_split", "write_image_folder", "write_npz_split", "write_cifar_batches",
    "IMAGE_EXTENSIONS", "NPY_MAGIC", "ROW_COLUMNS",
]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm")
PARQUET_EXTENSIONS = (".parquet", ".pq", ".parq")
NPY_MAGIC = b"\x93NUMPY"
ROW_COLUMNS = ("id", "split", "label", "image")
OK = "ok"
_TARGET_BLOCK_BYTES = 32 * 1024 * 1024
_CIFAR_TRAIN = re.compile(r"^(data_batch_\d+|train)$")
_CIFAR_TEST = re.compile(r"^(test_batch|test)$")


# ----------------------------------------------------------------------------------------------
# listing


@dataclass(frozen=True)
class SourceFile:
    path: str        # the filesystem path (no scheme)
    rel: str         # path relative to the split's base directory (the id prefix)
    size: int = 0


def _has_magic(p: str) -> bool:
    return any(ch in p for ch in "*?[")


def _glob_base(p: str) -> str:
    parts = p.split("/")
    fixed = []
    for part in parts:
        if _has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or "/"


def _urls(spec: "SplitSpec") -> list[str]:
    return [spec.url] if isinstance(spec.url, str) else list(spec.url)


def _fs_for(spec: "SplitSpec", storage: StorageOptions | None):
    urls = _urls(spec)
    if not urls:
        raise ValueError("split url list is empty")
    protos = {re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", u).group(1).lower() if "://" in u else "file"
              for u in urls}
    if len(protos) > 1:
        raise ValueError(f"the urls of one split must share one filesystem, got {sorted(protos)}")
    fs, _ = resolve(urls[0], storage)
    return fs


def _accept(fmt: str, name: str, cifar_batches: str | None) -> bool:
    base = posixpath.basename(name)
    if any(part.startswith((".", "_")) for part in name.strip("/").split("/")):
        return False  # hidden or temporary (_SUCCESS, _temporary/, .ipynb_checkpoints/)
    if fmt == "parquet":
        return base.lower().endswith(PARQUET_EXTENSIONS)
    if fmt == "npz":
        return base.lower().endswith(".npz")
    if fmt == "cifar":
        if cifar_batches == "train":
            return bool(_CIFAR_TRAIN.match(base))
        if cifar_batches == "test":
            return bool(_CIFAR_TEST.match(base))
        return bool(_CIFAR_TRAIN.match(base) or _CIFAR_TEST.match(base))
    return True


def _base_and_files(spec: "SplitSpec", storage: StorageOptions | None,
                    *, list_files: bool = True) -> tuple[Any, str, list[SourceFile]]:
    """``(fs, base, files)`` for a split (files naturally sorted by relative path)."""
    fs = _fs_for(spec, storage)
    bases: list[str] = []
    found: list[tuple[str, int]] = []
    for u in _urls(spec):
        p = fs._strip_protocol(u) if "://" in u else resolve(u, storage)[1]
        p = p.rstrip("/") or p
        if _has_magic(p):
            bases.append(_glob_base(p))
            if list_files:
                hits = fs.glob(p, detail=True)
                hits = {k: v for k, v in hits.items() if v.get("type") != "directory"}
                if not hits:
                    raise FileNotFoundError(f"no file matches {u!r}")
                found.extend((k, int(v.get("size") or 0)) for k, v in hits.items())
        elif fs.isdir(p):
            bases.append(p)
            if list_files:
                hits = fs.find(p, detail=True)
                kept = [(k, int(v.get("size") or 0)) for k, v in hits.items()
                        if _accept(spec.format, k[len(p):], spec.cifar_batches)]
                if not kept:
                    what = f" ({spec.cifar_batches} batches)" if spec.format == "cifar" else ""
                    raise FileNotFoundError(f"no {spec.format} files{what} under {u!r}")
                found.extend(kept)
        else:
            if list_files and not fs.exists(p):
                raise FileNotFoundError(f"no such file: {u!r}")
            bases.append(posixpath.dirname(p))
            if list_files:
                found.append((p, int(fs.info(p).get("size") or 0)))
    base = bases[0] if len(bases) == 1 else posixpath.commonpath(bases)
    files: dict[str, SourceFile] = {}
    for path, size in found:
        rel = posixpath.relpath(path, base) if base not in ("", "/") else path.lstrip("/")
        files.setdefault(rel, SourceFile(path, rel, size))
    out = sorted(files.values(), key=lambda f: natural_key(f.rel))
    return fs, base, out


def list_split_files(spec: "SplitSpec", storage: StorageOptions | None = None) -> list[SourceFile]:
    """The files a (non image-folder) split reads, naturally sorted; ``rel`` is the id prefix."""
    return _base_and_files(spec, storage)[2]


def _folder_root(spec: "SplitSpec", storage: StorageOptions | None):
    urls = _urls(spec)
    if len(urls) != 1 or _has_magic(urls[0]):
        raise ValueError("an image_folder split takes one directory url (one sub-folder per class)")
    fs, root = resolve(urls[0], storage)
    root = root.rstrip("/") or root
    if not fs.isdir(root):
        raise FileNotFoundError(f"image_folder root is not a directory: {urls[0]!r}")
    return fs, root


def list_classes(spec: "SplitSpec", storage: StorageOptions | None = None) -> list[str]:
    """Class folder names of an image-folder split, sorted (label = index in this list)."""
    fs, root = _folder_root(spec, storage)
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(root, detail=True)
                   if e.get("type") == "directory")
    names = [n for n in names if n and not n.startswith(".")]
    if not names:
        raise FileNotFoundError(f"image_folder {spec.url!r} has no class sub-folders")
    return names


# ----------------------------------------------------------------------------------------------
# CIFAR pickles, restricted


class CifarPickleError(ValueError):
    """A CIFAR batch file holds something other than plain dicts/lists/bytes/arrays."""


def _np_attr(*candidates: str):
    for dotted in candidates:
        mod, _, name = dotted.rpartition(".")
        try:
            m = __import__(mod, fromlist=[name])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(m, name)
        except (ImportError, AttributeError):
            continue
    return None


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    recon = _np_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    scalar = _np_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    frombuf = _np_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = recon
        allowed[(mod, "scalar")] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = frombuf
    return {k: v for k, v in allowed.items() if v is not None}


class _CifarUnpickler(pickle.Unpickler):
    """Only numpy array/dtype reconstruction may be looked up; anything else is refused."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        fn = _allowed_globals().get((module, name))
        if fn is None:
            raise CifarPickleError(
                f"{self._source}: refusing to unpickle {module}.{name} — a CIFAR batch may hold only "
                "dicts, lists, bytes and numpy arrays (pickle runs code: is this file really a CIFAR batch?)")
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise CifarPickleError(f"{self._source}: refusing a persistent id in a CIFAR batch")


def _check_plain(obj: Any, source: str, depth: int = 0) -> None:
    if depth > 3:
        raise CifarPickleError(f"{source}: unexpectedly nested content in a CIFAR batch")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise CifarPickleError(f"{source}: object arrays are not accepted in a CIFAR batch")
        return
    if isinstance(obj, (bytes, str, int, float, bool, np.generic)) or obj is None:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, source, depth + 1)
            _check_plain(v, source, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, (int, bytes, str, float)) for v in obj):
            return
        for v in obj:
            _check_plain(v, source, depth + 1)
        return
    raise CifarPickleError(f"{source}: unexpected {type(obj).__name__} in a CIFAR batch")


def load_cifar_batch(data: bytes | io.IOBase, source: str = "<cifar batch>") -> dict[str, Any]:
    """Unpickle one CIFAR-10/100 python batch with a restricted unpickler; keys become ``str``."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        obj = _CifarUnpickler(f, source).load()
    except CifarPickleError:
        raise
    except Exception as e:  # truncated / not a pickle
        raise CifarPickleError(f"{source}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CifarPickleError(f"{source}: a CIFAR batch is a dict, got {type(obj).__name__}")
    _check_plain(obj, source)
    out = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}
    if "data" not in out:
        raise CifarPickleError(f"{source}: no 'data' entry (keys: {sorted(out)})")
    return out


def _cifar_images(d: dict[str, Any], spec: "SplitSpec", source: str) -> np.ndarray:
    x = np.asarray(d["data"])
    n = x.shape[0]
    if spec.image_shape:
        shape = tuple(spec.image_shape)
    elif x.ndim == 2 and x.shape[1] == 3072:
        shape = (3, 32, 32)
    elif x.ndim == 4:
        shape = x.shape[1:]
    else:
        raise ValueError(f"{source}: 'data' has shape {x.shape}; set image_shape for this split")
    if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
        raise ValueError(f"{source}: 'data' rows of shape {x.shape[1:]} do not fit image_shape {shape}")
    return x.reshape((n, *shape))


def _cifar_label_key(d: dict[str, Any], spec: "SplitSpec", source: str) -> str | None:
    if spec.label_column is None:
        return None
    if spec.label_column in d:
        return spec.label_column
    if spec.label_column == "label":
        for k in ("labels", "fine_labels"):
            if k in d:
                return k
    raise KeyError(f"{source}: no label entry {spec.label_column!r} (keys: {sorted(d)})")


# ----------------------------------------------------------------------------------------------
# rows


@functools.lru_cache(maxsize=64)
def _npy_header_for(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(shape, np.dtype(dtype_str)), allow_pickle=False)
    data = buf.getvalue()
    return data[:len(data) - int(np.prod(shape)) * np.dtype(dtype_str).itemsize]


def _npy_bytes(a: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (C order); the header is built once per dtype and shape."""
    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise TypeError("object arrays cannot be stored as raw images")
    return _npy_header_for(a.dtype.str, a.shape) + a.tobytes()


def _labels_array(values: Any, n: int, source: str, column: str) -> np.ndarray:
    if values is None:
        return np.full(n, -1, np.int64)
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
                or pa.types.is_boolean(values.type) or pa.types.is_null(values.type)):
            raise TypeError(f"{source}: label column {column!r} must be integer, got {values.type}")
        values = values.cast(pa.float64()).fill_null(-1).to_numpy(zero_copy_only=False)
    arr = np.asarray(values)
    if arr.dtype.kind not in "iufb":
        raise TypeError(f"{source}: label column {column!r} must be integer, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        arr = np.where(np.isfinite(arr), arr, -1)
        if np.any(arr != np.round(arr)):
            raise TypeError(f"{source}: label column {column!r} holds non-integer values")
    arr = arr.astype(np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{source}: {n} images but {len(arr)} labels")
    return arr


def _ids_array(values: Any, n: int, source: str, column: str) -> pa.Array:
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


def _keep_array(values: Any) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    arr = np.asarray(values)
    if arr.dtype.kind == "S" or (arr.dtype == object and len(arr) and isinstance(arr.flat[0], bytes)):
        return pa.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in arr.tolist()])
    if arr.ndim > 1:
        return pa.array(list(arr))
    return pa.array(arr)


def _make_block(ids: pa.Array, split: str, labels: np.ndarray, images: pa.Array,
                keep: dict[str, pa.Array]) -> pa.Table:
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


def _row_ids(rel: str, start: int, n: int) -> pa.Array:
    return pa.array([f"{rel}:{i}" for i in range(start, start + n)], pa.string())


def _rows_per_block(bytes_per_row: float) -> int:
    return int(max(16, min(65536, _TARGET_BLOCK_BYTES // max(1.0, bytes_per_row))))


def _image_column_to_binary(col: pa.Array, spec: "SplitSpec", source: str) -> pa.Array:
    """The parquet image column as binary: encoded bytes as they are, raw arrays as ``.npy``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:  # Hugging Face {bytes, path}
        col = col.field("bytes")
        t = col.type
    if pa.types.is_large_binary(t):
        return col.cast(pa.binary())
    if pa.types.is_binary(t):
        return col
    rows = _raw_rows(col, source, spec.image_column)
    shape = tuple(spec.image_shape) if spec.image_shape else None
    out = []
    for r in rows:
        if r is None:
            out.append(None)
            continue
        if shape is not None and r.size == int(np.prod(shape)) and r.shape != shape:
            r = r.reshape(shape)
        out.append(_npy_bytes(r))
    return pa.array(out, pa.binary())


def _raw_rows(col: pa.Array, source: str, name: str) -> list[Optional[np.ndarray]]:
    t = col.type
    if isinstance(t, pa.ExtensionType):
        to_np = getattr(col, "to_numpy", None)
        try:
            arr = to_np(zero_copy_only=False) if to_np else None
        except TypeError:
            arr = to_np()
        if arr is None:
            return _raw_rows(col.storage, source, name)
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


# ---- per-format readers (run inside Ray read tasks) ------------------------------------------

@dataclass(frozen=True)
class _Piece:
    file: SourceFile
    rg_start: Optional[int] = None   # parquet row groups [rg_start, rg_stop); None: the whole file
    rg_stop: Optional[int] = None


def _read_parquet_piece(fs, piece: _Piece, name: str, spec: "SplitSpec") -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    f = piece.file
    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        wanted = [spec.image_column] + ([spec.label_column] if spec.label_column else []) \
            + ([spec.id_column] if spec.id_column else []) + list(spec.keep_columns)
        missing = [c for c in wanted if c not in names]
        if missing:
            hint = " (set label_column: null for an unlabelled split)" if spec.label_column in missing else ""
            raise KeyError(f"{f.rel} ({f.path}): no column {missing[0]!r}; columns are {names}{hint}")
        cols = list(dict.fromkeys(wanted))
        md = pf.metadata
        rgs = list(range(md.num_row_groups))
        if piece.rg_start is not None:
            rgs = rgs[piece.rg_start:piece.rg_stop]
        offset = sum(md.row_group(i).num_rows for i in range(rgs[0] if rgs else 0))
        per_row = f.size / max(1, md.num_rows)
        for batch in pf.iter_batches(batch_size=_rows_per_block(per_row * 2), row_groups=rgs, columns=cols,
                                     use_threads=False):
            n = batch.num_rows
            tbl = pa.Table.from_batches([batch])
            ids = (_ids_array(tbl.column(spec.id_column), n, f.rel, spec.id_column) if spec.id_column
                   else _row_ids(f.rel, offset, n))
            labels = _labels_array(tbl.column(spec.label_column) if spec.label_column else None,
                                   n, f.rel, spec.label_column or "")
            images = _image_column_to_binary(tbl.column(spec.image_column), spec, f.rel)
            keep = {k: _keep_array(tbl.column(k)) for k in spec.keep_columns}
            offset += n
            yield _make_block(ids, name, labels, images, keep)


def _array_rows_blocks(x: np.ndarray, labels: np.ndarray, ids: pa.Array | None, rel: str, name: str,
                       keep: dict[str, Any]) -> Iterator[pa.Table]:
    n = len(x)
    per_row = x[0].nbytes if n else 1
    step = _rows_per_block(per_row)
    for s in range(0, n, step):
        e = min(n, s + step)
        images = pa.array([_npy_bytes(x[i]) for i in range(s, e)], pa.binary())
        bid = ids.slice(s, e - s) if ids is not None else _row_ids(rel, s, e - s)
        yield _make_block(bid, name, labels[s:e], images, {k: _keep_array(v[s:e]) for k, v in keep.items()})


def _read_cifar_file(fs, f: SourceFile, name: str, spec: "SplitSpec") -> Iterator[pa.Table]:
    d = load_cifar_batch(fs.cat_file(f.path), f.rel)
    x = _cifar_images(d, spec, f.rel)
    n = len(x)
    lk = _cifar_label_key(d, spec, f.rel)
    labels = _labels_array(d[lk] if lk else None, n, f.rel, lk or "")
    ids = None
    if spec.id_column:
        if spec.id_column not in d:
            raise KeyError(f"{f.rel}: no entry {spec.id_column!r} for id_column (keys: {sorted(d)})")
        ids = _ids_array(d[spec.id_column], n, f.rel, spec.id_column)
    keep = {}
    for k in spec.keep_columns:
        if k not in d:
            raise KeyError(f"{f.rel}: no entry {k!r} for keep_columns (keys: {sorted(d)})")
        keep[k] = np.asarray(d[k]) if not isinstance(d[k], list) else np.array(d[k], dtype=object)
    yield from _array_rows_blocks(x, labels, ids, f.rel, name, keep)


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


def _read_npz_file(fs, f: SourceFile, name: str, spec: "SplitSpec") -> Iterator[pa.Table]:
    d = _npz_arrays(fs, f.path, f.rel)
    x = _npz_images(d, spec, f.rel)
    n = len(x)
    lk = _npz_label_key(d, spec, f.rel)
    labels = _labels_array(d[lk] if lk else None, n, f.rel, lk or "")
    ids = None
    if spec.id_column:
        if spec.id_column not in d:
            raise KeyError(f"{f.rel}: no array {spec.id_column!r} for id_column (arrays: {sorted(d)})")
        ids = _ids_array(d[spec.id_column], n, f.rel, spec.id_column)
    keep = {}
    for k in spec.keep_columns:
        if k not in d:
            raise KeyError(f"{f.rel}: no array {k!r} for keep_columns (arrays: {sorted(d)})")
        keep[k] = d[k]
    yield from _array_rows_blocks(x, labels, ids, f.rel, name, keep)


# ---- the datasource --------------------------------------------------------------------------


def _balanced_groups(pieces: list[_Piece], k: int, weight: Callable[[_Piece], float]) -> list[list[_Piece]]:
    """Split pieces (kept in order) into at most k contiguous groups of similar weight."""
    k = max(1, min(k, len(pieces)))
    total = sum(weight(p) for p in pieces) or float(len(pieces))
    groups: list[list[_Piece]] = [[]]
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


def _make_datasource(name: str, spec: "SplitSpec", fs, files: list[SourceFile]):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _SplitDatasource(Datasource):
        def __init__(self):
            super().__init__()
            self._name, self._spec, self._fs, self._files = name, spec, fs, files

        def get_name(self) -> str:
            return f"Read{self._spec.format.capitalize()}"

        def estimate_inmemory_data_size(self) -> Optional[int]:
            return int(sum(f.size for f in self._files)) or None

        def _pieces(self, parallelism: int) -> list[_Piece]:
            pieces = [_Piece(f) for f in self._files]
            if self._spec.format != "parquet" or len(self._files) >= parallelism:
                return pieces
            # fewer files than blocks asked for: split files by row groups (ids stay file:row)
            import pyarrow.parquet as pq
            from concurrent.futures import ThreadPoolExecutor

            def n_row_groups(f: SourceFile) -> int:
                with self._fs.open(f.path, "rb") as fh:
                    return pq.ParquetFile(fh).metadata.num_row_groups

            out: list[_Piece] = []
            per_file = max(1, math.ceil(parallelism / len(self._files)))
            with ThreadPoolExecutor(max_workers=min(16, len(self._files))) as pool:
                counts = list(pool.map(n_row_groups, self._files))
            for f, n_rg in zip(self._files, counts):
                k = min(per_file, n_rg)
                if k <= 1:
                    out.append(_Piece(f))
                    continue
                bounds = np.linspace(0, n_rg, k + 1).round().astype(int)
                out.extend(_Piece(SourceFile(f.path, f.rel, f.size * int(b - a) // n_rg), int(a), int(b))
                           for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
            return out

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                           data_context=None) -> list:
            parallelism = max(1, int(parallelism)) if parallelism and parallelism > 0 else len(self._files)
            groups = _balanced_groups(self._pieces(parallelism), parallelism, lambda p: p.file.size)
            fs_, spec_, name_ = self._fs, self._spec, self._name

            def read_fn(group: list[_Piece]) -> Iterable[pa.Table]:
                for p in group:
                    if spec_.format == "parquet":
                        yield from _read_parquet_piece(fs_, p, name_, spec_)
                    elif spec_.format == "cifar":
                        yield from _read_cifar_file(fs_, p.file, name_, spec_)
                    else:
                        yield from _read_npz_file(fs_, p.file, name_, spec_)

            tasks = []
            for g in groups:
                meta = BlockMetadata(num_rows=None, size_bytes=int(sum(p.file.size for p in g)) or None,
                                     input_files=[p.file.path for p in g], exec_stats=None)
                tasks.append(ReadTask(functools.partial(read_fn, g), meta,
                                      per_task_row_limit=per_task_row_limit))
            return tasks

    return _SplitDatasource()


def _folder_rows(batch: pa.Table, *, root: str, class_to_idx: dict[str, int], split: str,
                 keep: Sequence[str]) -> pa.Table:
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


def read_split(name: str, spec: "SplitSpec", storage: StorageOptions | None = None, *,
               override_num_blocks: int | None = None,
               class_names: Sequence[str] | None = None) -> "ray.data.Dataset":
    """A Ray Dataset of one split's rows (``id``, ``split``, ``label``, ``image``, keep columns).

    ``class_names`` (image folders): label = index of the folder name in this list instead of in
    the sorted folder names, so a split whose folders are a subset of the classes keeps the
    training indices; a folder that is not in the list is an error.
    """
    import ray.data

    storage = storage or StorageOptions()
    if spec.format == "image_folder":
        bad = [k for k in spec.keep_columns if k not in ("class_name", "path")]
        if bad:
            raise ValueError(f"split {name!r}: an image_folder split can keep only 'class_name' and 'path', "
                             f"not {bad}")
        if spec.id_column:
            raise ValueError(f"split {name!r}: an image_folder split takes its ids from the paths (no id_column)")
        fs, root = _folder_root(spec, storage)
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
        return ds.map_batches(_folder_rows, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                              fn_kwargs=dict(root=root, class_to_idx=class_to_idx, split=name,
                                             keep=list(spec.keep_columns)))
    if spec.format not in ("parquet", "cifar", "npz"):
        raise ValueError(f"split {name!r}: unknown format {spec.format!r}")
    fs, _, files = _base_and_files(spec, storage)
    return ray.data.read_datasource(_make_datasource(name, spec, fs, files),
                                    override_num_blocks=override_num_blocks)


def dataset_from_config(cfg: "AuditConfig", storage: StorageOptions | None = None, *,
                        override_num_blocks: int | None = None,
                        splits: Sequence[str] | None = None) -> "ray.data.Dataset":
    """The union of the config's splits (or of ``splits``), in config order.

    Splits whose keep columns differ union fine: a column a split lacks is null in its rows.
    """
    storage = storage or cfg.storage.options()
    blocks = override_num_blocks or cfg.compute.read_blocks
    names = list(splits) if splits is not None else list(cfg.data.splits)
    unknown = [s for s in names if s not in cfg.data.splits]
    if unknown:
        raise KeyError(f"unknown split(s) {unknown}; the config has {list(cfg.data.splits)}")
    all_keep = list(dict.fromkeys(k for s in names for k in cfg.data.splits[s].keep_columns))
    dss = []
    for s in names:
        spec = cfg.data.splits[s]
        ds = read_split(s, spec, storage, override_num_blocks=blocks, class_names=cfg.data.class_names)
        missing = [k for k in all_keep if k not in spec.keep_columns]
        if missing:
            ds = ds.map_batches(_add_null_columns, batch_format="pyarrow", batch_size=None,
                                zero_copy_batch=True, fn_kwargs={"columns": missing})
        dss.append(ds)
    return dss[0] if len(dss) == 1 else dss[0].union(*dss[1:])


def _add_null_columns(batch: pa.Table, *, columns: Sequence[str]) -> pa.Table:
    for c in columns:
        batch = batch.append_column(c, pa.nulls(batch.num_rows))
    return batch


# ----------------------------------------------------------------------------------------------
# decoding


class _Reject(Exception):
    pass


def _clean_error(e: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "decode_error: cannot identify image file"
    msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(e)).strip()
    return f"decode_error: {type(e).__name__}: {msg}"[:240]


def _fmt_shape(s: Sequence[int]) -> str:
    return "(" + ",".join(str(int(v)) for v in s) + ")"


def _raw_to_hwc(a: np.ndarray) -> np.ndarray:
    """A raw array as HxWxC (C in 1, 3), or a 1-D vector as it is."""
    if a.dtype.kind not in "uifb":
        raise _Reject(f"bad_dtype: {a.dtype}")
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    if a.ndim == 1:
        return a
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim == 3:
        first, last = a.shape[0] in (1, 3, 4), a.shape[2] in (1, 3, 4)
        if first:  # (C,H,W), also when both ends could be channels (image_shape says C,H,W)
            a = np.moveaxis(a, 0, -1)
        elif not last:
            raise _Reject(f"bad_shape: {_fmt_shape(a.shape)} has no channel axis of size 1 or 3")
        if a.shape[2] == 4:
            a = a[:, :, :3]
        return a
    raise _Reject(f"bad_shape: {_fmt_shape(a.shape)} is not an image")


def _pil_to_hwc(img, channels: int | None) -> np.ndarray:
    if channels == 1:
        img = img.convert("L") if img.mode not in ("L", "I", "I;16", "F") else img
    elif channels == 3:
        img = img.convert("RGB") if img.mode != "RGB" else img
    elif img.mode in ("1", "LA", "La"):
        img = img.convert("L")
    elif img.mode not in ("L", "RGB", "I", "I;16", "I;16B", "I;16L", "F"):
        img = img.convert("RGB")
    if img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float32) / np.float32(257.0)  # 16-bit on the 8-bit scale
    elif img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
    else:
        a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    return a


_IMAGE_FORMAT = {b"\x89PNG": ("PNG",), b"\xff\xd8\xff\xe0": ("JPEG",), b"\xff\xd8\xff\xe1": ("JPEG",),
                 b"\xff\xd8\xff\xdb": ("JPEG",), b"\xff\xd8\xff\xee": ("JPEG",)}


def _decode_payload(payload: Any) -> Any:
    """Raw ``np.ndarray`` (from ``.npy`` bytes / arrays) or a loaded PIL image."""
    if payload is None:
        raise _Reject("missing_image")
    if isinstance(payload, np.ndarray) and payload.dtype != object:
        return payload
    b = bytes(payload)
    if b.startswith(NPY_MAGIC):
        return _load_npy(b)
    from PIL import Image
    try:  # (PIL's warnings are silenced for the whole batch by decode_batch)
        img = Image.open(io.BytesIO(b), formats=_IMAGE_FORMAT.get(b[:4]))  # no probing of every format
        img.load()
        return img
    except Exception as e:
        raise _Reject(_clean_error(e)) from None


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> Optional[tuple[np.dtype, tuple[int, ...], bool]]:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None  # (3, 0): utf-8 field names; np.load handles it
    return dtype, tuple(shape), fortran


def _load_npy(b: bytes) -> np.ndarray:
    """``np.load`` of ``.npy`` bytes without pickle; headers parsed once per batch shape."""
    try:
        start = 10 if b[6] == 1 else 12
        hlen = int.from_bytes(b[8:start], "little")
        info = _npy_header(b[:start + hlen])
        if info is None:
            return np.load(io.BytesIO(b), allow_pickle=False)
        dtype, shape, fortran = info
    except Exception as e:
        raise _Reject(f"decode_error: bad .npy payload ({type(e).__name__}: {e})"[:240]) from None
    if dtype.hasobject:
        raise _Reject("decode_error: object arrays are not accepted")
    count = int(np.prod(shape))
    if len(b) - start - hlen != count * dtype.itemsize:
        raise _Reject(f"decode_error: .npy payload holds {len(b) - start - hlen} bytes, "
                      f"expected {count * dtype.itemsize}")
    a = np.frombuffer(b, dtype=dtype, count=count, offset=start + hlen)
    return a.reshape(shape, order="F" if fortran else "C")


def _convert_channels(a: np.ndarray, channels: int | None) -> np.ndarray:
    c = a.shape[2]
    if channels is None or channels == c:
        return a
    if channels == 3 and c == 1:
        return np.repeat(a, 3, axis=2)
    if channels == 1 and c == 3:
        w = np.array([0.299, 0.587, 0.114], np.float32)
        return (a.astype(np.float32) @ w)[:, :, None]
    raise _Reject(f"bad_channels: cannot convert {c} channels to {channels}")


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (aspect kept), bilinear — torchvision's ``Resize(int)`` on PIL."""
    from PIL import Image

    h, w = a.shape[:2]
    if min(h, w) == size:
        return a
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nw, nh = size, int(size * h / w)
    if a.dtype == np.uint8:
        if a.shape[2] == 3:
            return np.asarray(Image.fromarray(a).resize((nw, nh), Image.BILINEAR))
        return np.asarray(Image.fromarray(a[:, :, 0]).resize((nw, nh), Image.BILINEAR))[:, :, None]
    chans = [np.asarray(Image.fromarray(a[:, :, i].astype(np.float32), mode="F").resize((nw, nh), Image.BILINEAR))
             for i in range(a.shape[2])]
    return np.stack(chans, axis=2)


def _center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``CenterCrop``: zero-pad when smaller, then crop the centre."""
    h, w = a.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        a = np.pad(a, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = a.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return a[top:top + size, left:left + size]


def _decode_row(payload: Any, transform: "TransformSpec") -> np.ndarray:
    """One payload → float32 CHW (or a 1-D vector), before scaling. Raises ``_Reject``."""
    obj = _decode_payload(payload)
    if isinstance(obj, np.ndarray):
        a = _raw_to_hwc(obj)
        if a.ndim == 1:
            if transform.resize or transform.center_crop or transform.channels:
                raise _Reject(f"bad_shape: {_fmt_shape(a.shape)} is a vector; resize/center_crop/channels "
                              "need images")
            return a.astype(np.float32, copy=False)
        a = _convert_channels(a, transform.channels)
    else:
        a = _pil_to_hwc(obj, transform.channels)
    if transform.resize:
        a = _resize(a, transform.resize)
    if transform.center_crop:
        a = _center_crop(a, transform.center_crop)
    return np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32)


def _normalise(x: np.ndarray, transform: "TransformSpec") -> np.ndarray:
    """``x * scale``, then ``(x - mean) / std`` per channel (axis 1), in place on float32."""
    if transform.scale != 1:
        x *= np.float32(transform.scale)
    if transform.mean is None and transform.std is None:
        return x
    n_ch = x.shape[1]
    bshape = (1, n_ch) + (1,) * (x.ndim - 2)

    def vec(v: list[float] | None, what: str, default: float) -> np.ndarray:
        if v is None:
            return np.full(bshape, default, np.float32)
        v = np.asarray(v, np.float32)
        if v.size == 1:
            return v.reshape((1,) * x.ndim)
        if v.size != n_ch:
            raise ValueError(f"transform.{what} has {v.size} values but the images have {n_ch} "
                             f"{'features' if x.ndim == 2 else 'channels'}")
        return v.reshape(bshape)

    std = vec(transform.std, "std", 1.0)
    if np.any(std == 0):
        raise ValueError("transform.std holds a zero")
    x -= vec(transform.mean, "mean", 0.0)
    x /= std
    return x


def decode_batch(batch: dict[str, np.ndarray], transform: "TransformSpec",
                 input_shape: Sequence[int] | None = None, *, num_classes: int | None = None,
                 allow_unlabeled: bool = False) -> dict[str, np.ndarray]:
    """Decode + normalise a numpy batch of reader rows; never drops a row.

    Returns the input columns without ``image``, plus ``x`` (float32 ``[N, C, H, W]``, or
    ``[N, D]`` with ``transform.flatten`` / vector inputs) and ``status`` (``"ok"`` or the reason).
    Rejected rows get a zero ``x``. ``input_shape`` is the shape the model takes — (C, H, W), or
    (D,) for flattened/vector inputs; pass it, so every batch has the same ``x`` shape (without
    it the first good row of each batch sets the shape). ``num_classes``: labels outside
    ``[0, num_classes)`` are rejected (``-1`` is accepted with ``allow_unlabeled``, for audits
    against predicted labels).
    """
    images = batch["image"]
    n = len(images)
    status = np.full(n, OK, dtype=object)
    decoded: list[Optional[np.ndarray]] = [None] * n
    with warnings.catch_warnings():  # PIL's (e.g. DecompressionBomb, palette) warnings
        warnings.simplefilter("ignore")
        for i in range(n):
            try:
                decoded[i] = _decode_row(images[i], transform)
            except _Reject as r:
                status[i] = str(r)

    exp = tuple(int(v) for v in input_shape) if input_shape is not None else None
    if exp is None:
        first = next((d for d in decoded if d is not None), None)
        exp = tuple(first.shape) if first is not None else None

    def matches(s: tuple[int, ...]) -> bool:
        if s == exp:
            return True
        # a flattened model input given as (D,) takes any image of D values
        return transform.flatten and len(exp) == 1 and int(np.prod(s)) == exp[0]

    if exp is not None:
        for i, d in enumerate(decoded):
            if d is not None and not matches(tuple(d.shape)):
                status[i] = f"bad_shape: {_fmt_shape(d.shape)} != {_fmt_shape(exp)}"
                decoded[i] = None
    flat = transform.flatten or (exp is not None and len(exp) == 1)
    out_shape = ((int(np.prod(exp)),) if flat else exp) if exp is not None else (0,)
    x = np.zeros((n, *out_shape), np.float32)
    good = [i for i, d in enumerate(decoded) if d is not None]
    if good:
        stacked = np.stack([decoded[i] for i in good]).astype(np.float32, copy=False)
        stacked = _normalise(stacked, transform)  # per channel; per feature for [M, D] vectors
        stacked = stacked.reshape((len(good), *out_shape))
        finite = np.isfinite(stacked.reshape(len(good), -1)).all(axis=1)
        gi = np.asarray(good)
        x[gi[finite]] = stacked[finite]
        for i in gi[~finite]:
            status[i] = "non_finite_pixels"

    labels = np.asarray(batch["label"], np.int64) if "label" in batch else np.full(n, -1, np.int64)
    if num_classes is not None:
        bad = (labels < 0) | (labels >= num_classes)
        if allow_unlabeled:
            bad &= labels != -1
        for i in np.flatnonzero(bad):
            if status[i] == OK:
                status[i] = f"label_out_of_range: {int(labels[i])} not in [0, {int(num_classes)})"

    out = {k: v for k, v in batch.items() if k != "image"}
    out["x"] = x
    out["status"] = status
    return out


def split_rejected(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(ok_rows, rejected_rows)`` of a decoded batch; the rejected rows come without ``x``."""
    ok = np.asarray(batch["status"]) == OK
    good = {k: np.asarray(v)[ok] for k, v in batch.items()}
    bad = {k: np.asarray(v)[~ok] for k, v in batch.items() if k != "x"}
    return good, bad


# ----------------------------------------------------------------------------------------------
# the pipeline's entry points: row counts, the model input shape, the decode stage


def _map_threads(fn: Callable[[Any], Any], items: Sequence[Any], max_workers: int = 16) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _folder_files(spec: "SplitSpec", storage: StorageOptions | None) -> tuple[Any, str, list[str]]:
    """``(fs, root, rel paths)`` of the images ``read_split`` reads from an image folder — the
    same filter as Ray's directory listing (no ``.``/``_`` prefix inside a class folder) and
    the image extensions, case-insensitive."""
    fs, root = _folder_root(spec, storage)
    classes = set(list_classes(spec, storage))
    exts = tuple("." + e for e in IMAGE_EXTENSIONS)
    out = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        cls, _, inner = rel.partition("/")
        if cls in classes and inner and not inner.startswith((".", "_")) and inner.lower().endswith(exts):
            out.append(rel)
    return fs, root, sorted(out, key=natural_key)


def _npz_num_rows(fs, f: SourceFile, spec: "SplitSpec") -> int:
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


def count_split_rows(spec: "SplitSpec", storage: StorageOptions | None = None) -> int:
    """The number of rows ``read_split`` yields for a split, from metadata where the format has
    it (parquet footers, npz headers, the image-folder listing); CIFAR batches are unpickled."""
    import pyarrow.parquet as pq

    storage = storage or StorageOptions()
    if spec.format == "image_folder":
        return len(_folder_files(spec, storage)[2])
    fs, _, files = _base_and_files(spec, storage)

    def rows(f: SourceFile) -> int:
        if spec.format == "parquet":
            try:
                with fs.open(f.path, "rb") as fh:
                    return pq.ParquetFile(fh).metadata.num_rows
            except (pa.ArrowException, OSError) as e:  # truncated / corrupt / not Parquet at all
                if isinstance(e, FileNotFoundError):
                    raise
                raise ValueError(f"{f.rel} ({f.path}): not a readable Parquet file "
                                 f"(truncated or corrupt?): {e}") from None
        if spec.format == "npz":
            return _npz_num_rows(fs, f, spec)
        return len(load_cifar_batch(fs.cat_file(f.path), f.rel)["data"])

    return int(sum(_map_threads(rows, files)))


def count_rows(cfg: "AuditConfig", storage: StorageOptions | None = None) -> dict[str, int]:
    """Rows per split (``rows_in``), without running a Ray job."""
    storage = storage or cfg.storage.options()
    return {name: count_split_rows(spec, storage) for name, spec in cfg.data.splits.items()}


def _peek_payloads(spec: "SplitSpec", storage: StorageOptions | None, n: int = 16) -> list[Any]:
    """The image payloads of the first few rows of a split, read directly (no Ray)."""
    import pyarrow.parquet as pq

    if spec.format == "image_folder":
        fs, root, rels = _folder_files(spec, storage)
        return [fs.cat_file(posixpath.join(root, r)) for r in rels[:n]]
    fs, _, files = _base_and_files(spec, storage)
    for f in files:
        if spec.format == "parquet":
            with fs.open(f.path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                if pf.metadata.num_rows == 0:
                    continue
                g = next(i for i in range(pf.metadata.num_row_groups) if pf.metadata.row_group(i).num_rows)
                col = pf.read_row_group(g, columns=[spec.image_column]).column(0).slice(0, n)
            return _image_column_to_binary(col, spec, f.rel).to_pylist()
        x = _load_arrays(fs, f, spec)["__x__"]
        if len(x):
            return [_npy_bytes(a) for a in x[:n]]
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
                shapes[tuple(_decode_row(payload, t).shape)] += 1
            except _Reject:
                continue
        if shapes:
            shape = shapes.most_common(1)[0][0]
            return (int(np.prod(shape)),) if t.flatten else shape
    raise ValueError("cannot infer the model input shape: the first rows of no split decode "
                     f"(splits: {list(cfg.data.splits)})")


def decode(ds: "ray.data.Dataset", cfg: "AuditConfig", *, input_shape: Sequence[int] | None = None,
           storage: StorageOptions | None = None) -> "ray.data.Dataset":
    """The decode stage: ``decode_batch`` as CPU tasks over reader rows (a lazy Dataset).

    ``input_shape`` defaults to :func:`infer_input_shape`. Labels: ``-1`` passes (the scorer
    decides what an unlabelled row means for its label mode); with ``data.class_names`` a label
    outside ``[0, len(class_names))`` is rejected here, otherwise the scorer checks it against the
    model's output size.
    """
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(cfg, storage)
    num_classes = len(cfg.data.class_names) if cfg.data.class_names else None
    # Arrow in, Arrow out: carried columns pass through untouched (a numpy round trip would turn
    # an all-null string column into float NaN, and blocks of different splits would not unify)
    return ds.map_batches(_decode_arrow, batch_format="pyarrow", batch_size=cfg.compute.decode_batch_size,
                          fn_kwargs=dict(transform=cfg.data.transform, input_shape=shape,
                                         num_classes=num_classes, allow_unlabeled=True))


def _decode_arrow(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """:func:`decode_batch` on an Arrow batch; only ``image`` and ``label`` go through numpy."""
    from ray.data.extensions import ArrowTensorArray

    cols = {"image": batch.column("image").to_numpy(zero_copy_only=False)}
    if "label" in batch.column_names:
        cols["label"] = batch.column("label").to_numpy(zero_copy_only=False)
    out = decode_batch(cols, **kwargs)
    t = batch.drop_columns(["image"])
    t = t.append_column("x", ArrowTensorArray.from_numpy(out["x"]))
    return t.append_column("status", pa.array([str(v) for v in out["status"]], pa.string()))


# ----------------------------------------------------------------------------------------------
# fetching images for reports


def _display_uint8(a: np.ndarray) -> np.ndarray:
    """Any decoded array → uint8 HxW or HxWx3 for display (not normalised)."""
    if a.ndim == 1:
        s = int(round(math.sqrt(a.size)))
        a = a.reshape(s, s) if s * s == a.size else a.reshape(1, -1)
    if a.ndim == 3:
        try:
            a = _raw_to_hwc(a)
        except _Reject:
            a = a[:, :, :3]
        if a.shape[2] == 1:
            a = a[:, :, 0]
    if a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if f.size and f.max() <= 1.0 and f.min() >= 0.0 and a.dtype.kind == "f":
            f = f * 255.0
        a = np.clip(np.round(f), 0, 255).astype(np.uint8)
    return a


def _display_from_bytes(b: bytes, spec: "SplitSpec") -> np.ndarray:
    obj = _decode_payload(b)
    if isinstance(obj, np.ndarray):
        if spec.image_shape and obj.ndim == 1 and obj.size == int(np.prod(spec.image_shape)):
            obj = obj.reshape(spec.image_shape)
        return _display_uint8(obj)
    a = _pil_to_hwc(obj, None)
    return _display_uint8(a[:, :, 0] if a.shape[2] == 1 else a)


def _split_row_id(i: str) -> tuple[str, int]:
    rel, sep, row = i.rpartition(":")
    if not sep or not row.isdigit():
        raise KeyError(f"id {i!r} does not name a file row ('<file>:<row>')")
    return rel, int(row)


def fetch_images(spec: "SplitSpec", ids: Sequence[str], storage: StorageOptions | None = None, *,
                 on_error: str = "raise") -> dict[str, np.ndarray]:
    """Images for ``ids`` as uint8 HxW / HxWx3, read straight from the split's source.

    Reads only the files that hold the ids (a parquet split with an ``id_column`` scans that
    column of its files). ``on_error="skip"`` leaves out ids that are missing or undecodable
    instead of raising.
    """
    from PIL import UnidentifiedImageError

    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    ids = list(dict.fromkeys(str(i) for i in ids))
    out: dict[str, np.ndarray] = {}
    if not ids:
        return out

    def put(i: str, make: Callable[[], np.ndarray]) -> None:
        try:
            out[i] = make()
        except (_Reject, UnidentifiedImageError, OSError, ValueError) as e:
            if on_error == "raise":
                reason = str(e) if isinstance(e, _Reject) else _clean_error(e)
                raise ValueError(f"id {i!r}: {reason}") from None

    storage = storage or StorageOptions()
    if spec.format == "image_folder":
        fs, root = _folder_root(spec, storage)
        for i in ids:
            path = posixpath.join(root, i)
            try:
                data = fs.cat_file(path)
            except FileNotFoundError:
                if on_error == "raise":
                    raise KeyError(f"id {i!r}: no file {path}") from None
                continue
            put(i, lambda d=data: _display_from_bytes(d, spec))
        _check_all(ids, out, on_error)
        return out

    fs, base, _ = _base_and_files(spec, storage, list_files=False)
    if spec.format == "parquet" and spec.id_column:
        _fetch_parquet_by_column(fs, spec, storage, ids, put)
        _check_all(ids, out, on_error)
        return out

    if spec.id_column:  # cifar / npz with an id array: the ids do not name files; scan them
        wanted_ids = set(ids)
        for f in list_split_files(spec, storage):
            d = _load_arrays(fs, f, spec)
            col = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                   for v in np.asarray(d[spec.id_column]).tolist()]
            for row, v in enumerate(col):
                if v in wanted_ids and v not in out:
                    put(v, lambda r=row, d=d: _display_from_array(d["__x__"][r], spec))
        _check_all(ids, out, on_error)
        return out

    by_file: dict[str, list[tuple[str, int]]] = {}
    for i in ids:
        try:
            rel, row = _split_row_id(i)
        except KeyError:
            if on_error == "raise":
                raise
            continue
        by_file.setdefault(rel, []).append((i, row))
    for rel, wanted in by_file.items():
        path = posixpath.join(base, rel) if base not in ("", "/") else rel
        if not fs.exists(path):
            if on_error == "raise":
                raise KeyError(f"ids {[w[0] for w in wanted][:3]}: no file {rel!r} in the split")
            continue
        f = SourceFile(path, rel, 0)
        if spec.format == "parquet":
            _fetch_parquet_rows(fs, f, spec, wanted, put)
        else:
            d = _load_arrays(fs, f, spec)
            x = d["__x__"]
            for i, row in wanted:
                if 0 <= row < len(x):
                    put(i, lambda r=row: _display_from_array(x[r], spec))
    _check_all(ids, out, on_error)
    return out


def _check_all(ids: Sequence[str], out: dict[str, np.ndarray], on_error: str) -> None:
    missing = [i for i in ids if i not in out]
    if missing and on_error == "raise":
        raise KeyError(f"{len(missing)} id(s) not found in the split, e.g. {missing[:3]}")


def _display_from_array(a: np.ndarray, spec: "SplitSpec") -> np.ndarray:
    a = np.asarray(a)
    if spec.image_shape and a.ndim == 1 and a.size == int(np.prod(spec.image_shape)):
        a = a.reshape(spec.image_shape)
    return _display_uint8(a)


def _load_arrays(fs, f: SourceFile, spec: "SplitSpec") -> dict[str, Any]:
    if spec.format == "cifar":
        d = load_cifar_batch(fs.cat_file(f.path), f.rel)
        d["__x__"] = _cifar_images(d, spec, f.rel)
        return d
    d = dict(_npz_arrays(fs, f.path, f.rel))
    d["__x__"] = _npz_images(d, spec, f.rel)
    return d


def _fetch_parquet_rows(fs, f: SourceFile, spec: "SplitSpec", wanted: list[tuple[str, int]], put) -> None:
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
            col = _image_column_to_binary(col.take(pa.array([r for _, r in items])), spec, f.rel)
            for (i, _), b in zip(items, col.to_pylist()):
                put(i, lambda b=b: _display_from_bytes(b, spec))


def _fetch_parquet_by_column(fs, spec: "SplitSpec", storage, ids: list[str], put) -> None:
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
                col = _image_column_to_binary(col, spec, f.rel)
                for i, b in zip(idc.take(pa.array(rows)).to_pylist(), col.to_pylist()):
                    put(i, lambda b=b: _display_from_bytes(b, spec))


# ----------------------------------------------------------------------------------------------
# writers (tests, demos, conversions)


def _encode_image(img: np.ndarray, encode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(img)
    if encode == "png":
        im.save(buf, format="PNG", compress_level=1)
    elif encode in ("jpeg", "jpg"):
        im.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown encoding {encode!r} (png, jpeg or raw)")
    return buf.getvalue()


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))):
        raise ValueError(f"images must be uint8 [N,H,W] or [N,H,W,3], got {images.dtype} {images.shape}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    return images


def write_parquet_split(url: str, images: np.ndarray, labels: Sequence[int] | np.ndarray | None = None,
                        extra_columns: dict[str, Any] | None = None, storage: StorageOptions | None = None, *,
                        encode: str = "png", rows_per_file: int = 10000,
                        row_group_size: int | None = None, image_column: str = "image",
                        label_column: str = "label") -> list[str]:
    """Write images (uint8 ``[N,H,W]``/``[N,H,W,3]``) as ``part-00000.parquet``… under ``url``.

    ``encode``: ``"png"``/``"jpeg"`` (binary column) or ``"raw"`` (a flat ``list<uint8>`` column:
    set ``image_shape`` to ``[H, W]`` / ``[H, W, 3]`` in the split spec). Earlier ``part-*.parquet``
    files under ``url`` are removed first. Returns the URLs written.
    """
    import pyarrow.parquet as pq

    from .storage import unstrip

    images = _check_images(images)
    n = len(images)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    for k, v in (extra_columns or {}).items():
        if len(v) != n:
            raise ValueError(f"extra column {k!r} has {len(v)} values for {n} images")
    fs, root = resolve(url, storage)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    for old in fs.glob(posixpath.join(root, "part-*.parquet")):
        fs.rm(old)
    rows_per_file = max(1, int(rows_per_file))
    written = []
    for fi, s in enumerate(range(0, max(n, 1), rows_per_file)):
        e = min(n, s + rows_per_file)
        chunk = images[s:e]
        if encode == "raw":
            flat = pa.array(chunk.reshape(-1), pa.uint8())
            col = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(images.shape[1:])))
        else:
            col = pa.array([_encode_image(im, encode) for im in chunk], pa.binary())
        cols: dict[str, Any] = {image_column: col}
        if labels is not None:
            cols[label_column] = pa.array(np.asarray(labels[s:e], np.int64))
        for k, v in (extra_columns or {}).items():
            cols[k] = pa.array(np.asarray(v)[s:e]) if not isinstance(v, pa.Array) else v.slice(s, e - s)
        path = posixpath.join(root, f"part-{fi:05d}.parquet")
        with fs.open(path, "wb") as fh:
            pq.write_table(pa.table(cols), fh, row_group_size=row_group_size or max(1, e - s))
        written.append(unstrip(fs, path))
    return written


def write_image_folder(url: str, images: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                       storage: StorageOptions | None = None, *, encode: str = "png") -> list[str]:
    """ImageNet layout: ``<url>/<class>/<i:06d>.png``. Returns the ids (relative paths)."""
    images = _check_images(images)
    fs, root = resolve(url, storage)
    root = root.rstrip("/")
    ext = "png" if encode == "png" else "jpg"
    ids = []
    for i, (im, y) in enumerate(zip(images, labels)):
        rel = f"{class_names[int(y)]}/{i:06d}.{ext}"
        p = posixpath.join(root, rel)
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        fs.pipe_file(p, _encode_image(im, encode))
        ids.append(rel)
    return ids


def write_npz_split(url: str, x: np.ndarray, y: np.ndarray | None = None,
                    storage: StorageOptions | None = None, **extra: np.ndarray) -> str:
    """One ``.npz`` file with ``x`` (and ``y``, extra arrays); written without pickle."""
    fs, path = resolve(url, storage)
    buf = io.BytesIO()
    arrays = {"x": np.asarray(x), **({"y": np.asarray(y)} if y is not None else {}),
              **{k: np.asarray(v) for k, v in extra.items()}}
    for k, v in arrays.items():
        if v.dtype == object:
            raise ValueError(f"array {k!r} has dtype object; npz splits are read without pickle")
    np.savez(buf, **arrays)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
    return url


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes ``bytes`` as protocol-2 ``BINSTRING`` like the Python 2 pickles CIFAR ships."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_bytes(self, obj: bytes) -> None:
        import struct

        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes


def write_cifar_batches(url: str, images: np.ndarray, labels: Sequence[int], *,
                        storage: StorageOptions | None = None, names: Sequence[str] = ("data_batch_1",),
                        label_key: str = "labels", extra: dict[str, Any] | None = None) -> list[str]:
    """CIFAR-style python batches (``dict`` with ``data`` uint8 ``[N, 3072]`` in CHW order).

    ``images`` uint8 ``[N,32,32,3]`` (HWC) are split evenly over ``names``; written like the
    official Python 2 pickles (protocol 2, ``numpy.core.multiarray._reconstruct``).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError("CIFAR images are uint8 [N, H, W, 3]")
    fs, root = resolve(url, storage)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    chunks = np.array_split(np.arange(len(images)), len(names))
    out = []
    for name, idx in zip(names, chunks):
        d: dict[bytes, Any] = {
            b"batch_label": f"{name} of {len(names)}".encode(),
            label_key.encode(): [int(labels[i]) for i in idx],
            b"data": np.ascontiguousarray(images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)),
            b"filenames": [f"img_{i:06d}.png".encode() for i in idx],
        }
        for k, v in (extra or {}).items():
            d[k.encode()] = [v[i] for i in idx]
        buf = io.BytesIO()
        _Py2StylePickler(buf, protocol=2).dump(d)
        data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        p = posixpath.join(root, name)
        fs.pipe_file(p, data)
        out.append(p)
    return out
