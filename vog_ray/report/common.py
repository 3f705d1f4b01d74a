"""Shared pieces of the report package: the error type, JSON cleaning, seeds derived from names,
file names safe for any split or target, atomic writes and the removal of stale figures."""

from __future__ import annotations

import math
import re
import uuid
import zlib
from typing import Any, Iterable

import numpy as np

from ..storage import StorageOptions, resolve

__all__ = ["ReportError", "clean", "stable_seed", "safe_name", "atomic_write", "remove_stale",
           "finite_or_none"]


class ReportError(ValueError):
    """The run cannot be reported as asked; the message names the problem."""


def finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def clean(obj: Any) -> Any:
    """A JSON-safe copy: numpy scalars → Python, NaN / inf → ``None``, tuples → lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [clean(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite_or_none(obj)
    return obj


def stable_seed(seed: int, *parts: str) -> list[int]:
    """A seed for ``np.random.default_rng`` that depends on ``seed`` and names only (never on
    the order in which sections are computed), so every interval is reproducible alone."""
    return [int(seed)] + [zlib.crc32(str(p).encode()) for p in parts]


def safe_name(name: str) -> str:
    """``name`` with every character other than ``A-Za-z0-9_.-`` replaced by ``_`` (for file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def _is_local(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def atomic_write(url: str, data: bytes, storage: StorageOptions | None = None, *,
                 fs=None) -> None:
    """Write ``data`` so that a reader never sees a half-written file.

    Local files are written under a temporary name beside ``url`` and renamed into place (an
    atomic rename). On an object store a single PUT is already atomic — the object appears only
    once the upload completes — so the object is written directly (a copy + delete "move" would
    only add requests). ``fs``: an already resolved filesystem, ``url`` then being its path
    (saves building a new client per file on object stores).
    """
    if fs is None:
        fs, path = resolve(url, storage)
    else:
        path = url
    parent = path.rsplit("/", 1)[0]
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:  # pragma: no cover - best effort cleanup
            pass
        raise


def remove_stale(fs, path: str, keep: Iterable[str]) -> None:
    """Remove figures of an earlier report in directory ``path`` that this report did not write."""
    try:
        if not fs.isdir(path):
            return
    except FileNotFoundError:
        return
    keep = set(keep)
    for f in fs.ls(path, detail=False):
        name = f.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep and name.endswith(".png"):
            fs.rm(f)


