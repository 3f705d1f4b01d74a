"""Shared pieces of the report package: the error type, JSON cleaning, seeds derived from names,
file names safe for any split or target, and the removal of stale figures (atomic writes are
:func:`vog_ray.storage.atomic_write`, re-exported here)."""

from __future__ import annotations

import math
import re
import zlib
from typing import Any, Iterable

import numpy as np

from ..storage import atomic_write

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
    """``name`` with every character other than ``A-Za-z0-9_.-`` replaced by ``_`` (for file names);
    a name that had to change gets a short hash of the original, so two names never share a file
    (splits ``a b`` and ``a_b`` → ``a_b-…`` and ``a_b``)."""
    import hashlib

    name = str(name)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


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


