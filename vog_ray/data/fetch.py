"""Images by id for reports and the explorer, read straight from a split's source files without
Ray: as uint8 arrays for display (:func:`fetch_images`, not normalised), or as the stored
payloads the decode stage takes (:func:`fetch_payloads`, for heat maps). Imports neither Ray nor
torch."""

from __future__ import annotations

import math
import posixpath
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..storage import StorageOptions
from . import cifar, image_folder, manifest, npz, parquet, webdataset
from .uris import Fetcher, is_absolute
from .decode import Reject, clean_error, decode_payload, pil_to_hwc, raw_to_hwc
from .listing import SourceFile, list_split_files, split_files

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["fetch_images", "fetch_payloads", "display_payload"]

Put = Callable[[str, Callable[[], np.ndarray]], None]   # put(id, make): out[id] = make()
Convert = Callable[[Any], Any]   # a stored payload (bytes or an array row) -> what a fetch returns


def _display_uint8(a: np.ndarray) -> np.ndarray:
    """Any decoded array → uint8 HxW or HxWx3 for display (not normalised)."""
    if a.ndim == 1:
        s = int(round(math.sqrt(a.size)))
        a = a.reshape(s, s) if s * s == a.size else a.reshape(1, -1)
    if a.ndim == 3:
        try:
            a = raw_to_hwc(a)
        except Reject:
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
    obj = decode_payload(b)
    if isinstance(obj, np.ndarray):
        if spec.image_shape and obj.ndim == 1 and obj.size == int(np.prod(spec.image_shape)):
            obj = obj.reshape(spec.image_shape)
        return _display_uint8(obj)
    a = pil_to_hwc(obj, None)
    return _display_uint8(a[:, :, 0] if a.shape[2] == 1 else a)


def _display_from_array(a: np.ndarray, spec: "SplitSpec") -> np.ndarray:
    a = np.asarray(a)
    if spec.image_shape and a.ndim == 1 and a.size == int(np.prod(spec.image_shape)):
        a = a.reshape(spec.image_shape)
    return _display_uint8(a)


def _split_row_id(i: str) -> tuple[str, int]:
    rel, sep, row = i.rpartition(":")
    if not sep or not row.isdigit():
        raise KeyError(f"id {i!r} does not name a file row ('<file>:<row>')")
    return rel, int(row)


def _check_all(ids: Sequence[str], out: dict[str, np.ndarray], on_error: str) -> None:
    missing = [i for i in ids if i not in out]
    if missing and on_error == "raise":
        raise KeyError(f"{len(missing)} id(s) not found in the split, e.g. {missing[:3]}")


def _putter(out: dict[str, np.ndarray], on_error: str) -> Put:
    """``put(id, make)``: ``out[id] = make()``; a decode error raises (``on_error="raise"``) or
    leaves the id out."""
    from PIL import UnidentifiedImageError

    def put(i: str, make: Callable[[], np.ndarray]) -> None:
        try:
            out[i] = make()
        except (Reject, UnidentifiedImageError, OSError, ValueError) as e:
            if on_error == "raise":
                reason = str(e) if isinstance(e, Reject) else clean_error(e)
                raise ValueError(f"id {i!r}: {reason}") from None

    return put


def _fetch_arrays_by_id_column(fs, spec: "SplitSpec", storage: StorageOptions, ids: list[str],
                               out: dict[str, np.ndarray], put: Put, from_array: Convert) -> None:
    """CIFAR / npz with an id array: the ids do not name files; scan them."""
    wanted_ids = set(ids)
    for f in list_split_files(spec, storage):
        d = (cifar if spec.format == "cifar" else npz).load_arrays(fs, f, spec)
        col = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
               for v in np.asarray(d[spec.id_column]).tolist()]
        for row, v in enumerate(col):
            if v in wanted_ids and v not in out:
                put(v, lambda r=row, d=d: from_array(d["__x__"][r]))


def _inside(rel: str) -> bool:
    """Whether a file name taken from an id stays under the split's base directory (an id of a
    tampered or hand-written run may name ``../elsewhere.parquet``: never read)."""
    norm = posixpath.normpath(rel)
    return bool(rel) and not rel.startswith("/") and norm != ".." and not norm.startswith("../") and "://" not in rel


def _fetch_by_file_row(fs, base: str, spec: "SplitSpec", ids: list[str], on_error: str, put: Put,
                       from_bytes: Convert, from_array: Convert) -> None:
    """Ids ``"<file>:<row>"``: read only the files they name (under the split's base directory)."""
    by_file: dict[str, list[tuple[str, int]]] = {}
    for i in ids:
        try:
            rel, row = _split_row_id(i)
            if not _inside(rel):
                raise KeyError(f"id {i!r} names a file outside the split's directory")
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
            parquet.fetch_rows(fs, f, spec, wanted, lambda i, b: put(i, lambda: from_bytes(b)))
        else:
            d = (cifar if spec.format == "cifar" else npz).load_arrays(fs, f, spec)
            x = d["__x__"]
            for i, row in wanted:
                if 0 <= row < len(x):
                    put(i, lambda r=row: from_array(x[r]))


def _fetch(spec: "SplitSpec", ids: Sequence[str], storage: StorageOptions | None, on_error: str,
           from_bytes: Convert, from_array: Convert) -> dict[str, Any]:
    """id -> ``from_bytes(payload)`` / ``from_array(row)`` for each id found in the split."""
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    ids = list(dict.fromkeys(str(i) for i in ids))
    out: dict[str, Any] = {}
    if not ids:
        return out
    put = _putter(out, on_error)

    def found(i: str, b: Any) -> None:
        put(i, lambda: from_bytes(b))

    storage = storage or StorageOptions()
    if spec.format == "image_folder":
        image_folder.fetch_files(spec, storage, ids, on_error, found)
    else:
        fs, base, _ = split_files(spec, storage, list_files=False)
        if spec.format == "manifest":
            _fetch_manifest_images(fs, spec, storage, ids, put, from_bytes)
        elif spec.format == "webdataset":
            _fetch_shard_samples(fs, base, spec, ids, on_error, put, from_bytes)
        elif spec.format == "parquet" and spec.id_column:
            parquet.fetch_by_id_column(fs, spec, storage, ids, found)
        elif spec.id_column:
            _fetch_arrays_by_id_column(fs, spec, storage, ids, out, put, from_array)
        else:
            _fetch_by_file_row(fs, base, spec, ids, on_error, put, from_bytes, from_array)
    _check_all(ids, out, on_error)
    return out


def _fetch_shard_samples(fs, base: str, spec: "SplitSpec", ids: list[str], on_error: str, put: Put,
                         from_bytes: Convert) -> None:
    """WebDataset ids ``"<shard>.tar:<key>"``: read only the shards they name."""
    by_shard: dict[str, dict[str, str]] = {}
    for i in ids:
        try:
            rel, key = webdataset.shard_of_id(i)
            if not _inside(rel):
                raise KeyError(f"id {i!r} names a shard outside the split's directory")
        except KeyError:
            if on_error == "raise":
                raise
            continue
        by_shard.setdefault(rel, {})[key] = i
    for rel, wanted in by_shard.items():
        path = posixpath.join(base, rel) if base not in ("", "/") else rel
        if not fs.exists(path):
            if on_error == "raise":
                raise KeyError(f"ids {list(wanted.values())[:3]}: no shard {rel!r} in the split")
            continue
        webdataset.fetch_samples(fs, SourceFile(path, rel, 0), spec, wanted,
                                 lambda i, b: put(i, lambda: from_bytes(b)))


def _fetch_manifest_images(fs, spec: "SplitSpec", storage: StorageOptions, ids: list[str], put: Put,
                           from_bytes: Convert) -> None:
    """Manifest ids: absolute URIs are read as they are; relative ones, and ids of an
    ``id_column``, are looked up in the manifests (a relative URI is under its manifest's directory)."""
    files = list_split_files(spec, storage)
    located: dict[str, tuple[str, SourceFile]] = {}
    if not spec.id_column:
        located = {i: (i, files[0]) for i in ids if is_absolute(i)}
    rest = {i for i in ids if i not in located}
    if rest:
        manifest.uris_for_ids(fs, files, spec, rest, lambda i, u, f: located.setdefault(i, (u, f)))
    for i, (uri, f) in located.items():
        fetcher = Fetcher(storage, fs, posixpath.dirname(f.path), spec.manifest.fetch_retries)
        payload = fetcher.fetch(uri)
        put(i, lambda b=payload: from_bytes(b))


def fetch_images(spec: "SplitSpec", ids: Sequence[str], storage: StorageOptions | None = None, *,
                 on_error: str = "raise") -> dict[str, np.ndarray]:
    """Images for ``ids`` as uint8 HxW / HxWx3, read straight from the split's source.

    Reads only the files that hold the ids (a parquet split with an ``id_column`` scans that
    column of its files). ``on_error="skip"`` leaves out ids that are missing or undecodable
    instead of raising.
    """
    return _fetch(spec, ids, storage, on_error, lambda b: _display_from_bytes(b, spec),
                  lambda a: _display_from_array(a, spec))


def display_payload(payload: Any, spec: "SplitSpec") -> np.ndarray:
    """A payload of :func:`fetch_payloads` as :func:`fetch_images` shows it (uint8, not normalised)."""
    if isinstance(payload, np.ndarray) and payload.dtype != object:
        return _display_from_array(payload, spec)
    return _display_from_bytes(payload, spec)


def fetch_payloads(spec: "SplitSpec", ids: Sequence[str], storage: StorageOptions | None = None, *,
                   on_error: str = "raise") -> dict[str, Any]:
    """The stored payload of each id as the decode stage receives it (encoded image or ``.npy``
    bytes, or the array row of a CIFAR / npz file): ``decode.decode_batch`` turns it into the
    model input the audit scored. Reads what :func:`fetch_images` reads."""
    return _fetch(spec, ids, storage, on_error, lambda b: b, lambda a: np.asarray(a))
