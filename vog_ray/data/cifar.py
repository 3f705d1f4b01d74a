"""CIFAR-10/100 python batches: a restricted unpickler (numpy arrays, dicts, lists, bytes —
nothing that runs code), reading a batch's rows inside a Ray read task, and its arrays for
row counts, payload peeks and fetches. Imports neither Ray nor torch."""

from __future__ import annotations

import functools
import io
import pickle
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from .listing import SourceFile
from .rows import array_blocks, ids_array, labels_array

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["CifarPickleError", "load_cifar_batch", "read_file", "num_rows", "load_arrays"]


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
    """A batch's ``data`` as ``[N, *image_shape]`` (default ``(3, 32, 32)`` for 3072 values a row)."""
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


def read_file(fs, f: SourceFile, name: str, spec: "SplitSpec") -> Iterator[pa.Table]:
    """The rows of one batch file as blocks (inside a Ray read task)."""
    d = load_cifar_batch(fs.cat_file(f.path), f.rel)
    x = _cifar_images(d, spec, f.rel)
    n = len(x)
    lk = _cifar_label_key(d, spec, f.rel)
    labels = labels_array(d[lk] if lk else None, n, f.rel, lk or "")
    ids = None
    if spec.id_column:
        if spec.id_column not in d:
            raise KeyError(f"{f.rel}: no entry {spec.id_column!r} for id_column (keys: {sorted(d)})")
        ids = ids_array(d[spec.id_column], n, f.rel, spec.id_column)
    keep = {}
    for k in spec.keep_columns:
        if k not in d:
            raise KeyError(f"{f.rel}: no entry {k!r} for keep_columns (keys: {sorted(d)})")
        keep[k] = np.asarray(d[k]) if not isinstance(d[k], list) else np.array(d[k], dtype=object)
    yield from array_blocks(x, labels, ids, f.rel, name, keep)


def num_rows(fs, f: SourceFile) -> int:
    """The number of rows of a batch file (it is unpickled: the format has no other metadata)."""
    return len(load_cifar_batch(fs.cat_file(f.path), f.rel)["data"])


def load_arrays(fs, f: SourceFile, spec: "SplitSpec") -> dict[str, Any]:
    """A batch's entries, plus its images as ``[N, *image_shape]`` under ``"__x__"``."""
    d = load_cifar_batch(fs.cat_file(f.path), f.rel)
    d["__x__"] = _cifar_images(d, spec, f.rel)
    return d
