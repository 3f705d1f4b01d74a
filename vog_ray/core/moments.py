"""Mergeable moment states: the core abstraction of VoG (DESIGN.md §1–2).

Everything that is "a variance" in vog-ray is a ``(n, mean, M2)`` state, updated one
observation at a time with Welford's algorithm and merged with Chan et al.'s parallel
formula. Two levels:

* :class:`PixelMoments` — per example and per pixel, over checkpoints. ``finalize()`` gives
  the raw VoG of every example: the mean over pixels of the population (ddof = 0) standard
  deviation across checkpoints.
* :class:`ClassMoments` — per class, over examples, of raw VoG (always float64). ``finalize()``
  gives the class mean ``m_c`` and population std ``s_c`` used for normalisation.

Both work on torch tensors (any device; float32 or float64 accumulation) and on numpy arrays.
Every merge in vog-ray — a checkpoint's map folded into the pixel moments (the engine), pixel and
class states, and the per-example merges of checkpoint-sharded and incremental audits — goes
through one kernel, :func:`chan_merge`. This module imports neither Ray nor torch (a torch tensor
is handled only when one is passed in).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np


class _LazyTorch:
    """torch, imported only when a torch tensor is actually used (the reduce runs without it)."""

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)


torch = _LazyTorch()

__all__ = [
    "PixelMoments",
    "ClassMoments",
    "chan_merge",
    "vog_from_gradient_maps",
    "class_normalize",
    "NORMALIZATIONS",
]

NORMALIZATIONS = ("zscore", "abs_zscore", "none")


def _column(n: Any, like: Any) -> Any:
    """A per-row count (shape ``[E]``) shaped to broadcast over ``like`` (``[E, *pixels]``)."""
    n = np.asarray(n)
    return n.reshape(n.shape + (1,) * (np.ndim(like) - n.ndim)) if n.ndim else n


def chan_merge(n_a: Any, mean_a: Any, m2_a: Any, n_b: Any, mean_b: Any, m2_b: Any = None, *,
               inplace: bool = False) -> tuple[Any, Any, Any]:
    """Chan et al.'s parallel update: the ``(n, mean, M2)`` of observation sets A ∪ B from A's and
    B's. The one merge kernel of vog-ray (see the module docstring).

    ``n_a``, ``n_b``: counts — plain numbers, or numpy arrays with one count per row (the first
    axis of the means: one example each). ``m2_b=None``: B is a single observation (M2 = 0), the
    Welford update. Rows with ``n_b = 0`` keep A; rows with ``n_a = 0`` take B exactly.

    ``inplace=True`` (torch tensors, scalar counts): A's tensors are updated with the fused
    ``add_``/``addcmul_`` and returned — the engine's hot loop, one pass over the maps per op.
    Otherwise new arrays are returned (numpy, or torch out of place) computed as
    ``mean = mean_a + delta * n_b/n``, ``M2 = M2_a + M2_b + delta² * n_a n_b / n``.
    """
    if inplace:
        if np.ndim(n_a) or np.ndim(n_b):
            raise ValueError("chan_merge(inplace=True) takes scalar counts")
        if n_b == 0:
            return n_a, mean_a, m2_a
        n = n_a + n_b
        delta = mean_b.to(mean_a.dtype) - mean_a
        mean_a.add_(delta, alpha=n_b / n)
        m2_a.addcmul_(delta, delta, value=n_a * n_b / n)
        if m2_b is not None:
            m2_a.add_(m2_b.to(m2_a.dtype))
        return n, mean_a, m2_a
    if np.ndim(n_a) == 0 and np.ndim(n_b) == 0:
        if n_b == 0:
            return n_a, _copy(mean_a), _copy(m2_a)
        if n_a == 0:
            return n_b, _copy(mean_b), _zeros_like(mean_b) if m2_b is None else _copy(m2_b)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean = mean_a + delta * (n_b / n)
        m2 = (m2_a if m2_b is None else m2_a + m2_b) + delta * delta * (n_a * n_b / n)
        return n, mean, m2
    # per-row counts (numpy): empty rows on either side handled row by row
    n_a, n_b = np.asarray(n_a), np.asarray(n_b)
    n = n_a + n_b
    safe = np.where(n > 0, n, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * _column(n_b / safe, mean_a)
    m2 = (m2_a if m2_b is None else m2_a + m2_b) + delta * delta * _column(n_a * n_b / safe, mean_a)
    take_b, keep_a = _column(n_a == 0, mean_a), _column(n_b == 0, mean_a)
    m2_b_ = np.zeros_like(mean_b) if m2_b is None else m2_b
    mean = np.where(keep_a, mean_a, np.where(take_b, mean_b, mean))
    m2 = np.where(keep_a, m2_a, np.where(take_b, m2_b_, m2))
    return n, mean, m2


def _is_torch(x: Any) -> bool:
    t = sys.modules.get("torch")  # a tensor exists only if torch was imported
    return t is not None and isinstance(x, t.Tensor)


def _zeros_like(x: Any, dtype: Any = None) -> Any:
    if _is_torch(x):
        return torch.zeros_like(x, dtype=dtype or x.dtype)
    return np.zeros_like(x, dtype=dtype or x.dtype)


def _sqrt(x: Any) -> Any:
    return torch.sqrt(x) if _is_torch(x) else np.sqrt(x)


@dataclass
class PixelMoments:
    """Per-example, per-pixel moments over checkpoints.

    ``mean`` and ``m2`` have shape ``[N, *pixels]`` (``[N, H, W]`` for images, ``[N, D]`` for
    vectors); ``n`` is the number of checkpoints folded in (the same for every example and
    pixel, so it is a plain int).
    """

    n: int
    mean: Any
    m2: Any

    @classmethod
    def empty(cls, shape: tuple[int, ...], *, like: Any = None, dtype: Any = None,
              device: Any = None) -> "PixelMoments":
        """An empty state (n = 0) of the given shape.

        ``like`` picks the backend: a torch tensor gives torch state on its device (and its
        dtype unless ``dtype`` is given), anything else gives numpy.
        """
        if like is not None and _is_torch(like):
            dt = dtype or like.dtype
            dev = device or like.device
            z = torch.zeros(shape, dtype=dt, device=dev)
            return cls(0, z, z.clone())
        z = np.zeros(shape, dtype=dtype or np.float64)
        return cls(0, z, z.copy())

    @classmethod
    def from_map(cls, x: Any, dtype: Any = None) -> "PixelMoments":
        """The state holding one observation ``x``."""
        if _is_torch(x):
            mean = x.to(dtype or x.dtype, copy=True)
        else:
            mean = np.array(x, dtype=dtype or np.asarray(x).dtype, copy=True)
        return cls(1, mean, _zeros_like(mean))

    def update(self, x: Any) -> "PixelMoments":
        """Fold one checkpoint's gradient maps ``x`` (shape ``[N, *pixels]``) in (Welford, via
        :func:`chan_merge` with a set of one); torch state is updated in place."""
        if self.n == 0:
            if _is_torch(self.mean):
                self.mean.copy_(x)
            else:
                self.mean[...] = x
            self.m2[...] = 0
            self.n = 1
            return self
        if _is_torch(self.mean):
            self.n, _, _ = chan_merge(self.n, self.mean, self.m2, 1, x, inplace=True)
        else:
            self.n, self.mean, self.m2 = chan_merge(self.n, self.mean, self.m2, 1,
                                                    np.asarray(x, dtype=self.mean.dtype))
        return self

    def merge(self, other: "PixelMoments") -> "PixelMoments":
        """A new state equal to both observation sets together (:func:`chan_merge`)."""
        return PixelMoments(*chan_merge(self.n, self.mean, self.m2, other.n, other.mean, other.m2))

    def variance(self) -> Any:
        """Per-pixel population variance (ddof = 0)."""
        if self.n == 0:
            raise ValueError("PixelMoments is empty (no checkpoint folded in): VoG is undefined")
        var = self.m2 / self.n
        # M2 can go a hair below zero through rounding; a variance cannot.
        return var.clamp_min(0) if _is_torch(var) else np.maximum(var, 0)

    def std(self) -> Any:
        return _sqrt(self.variance())

    def finalize(self) -> Any:
        """Raw VoG per example: mean over pixels of the per-pixel population std. Shape ``[N]``."""
        s = self.std()
        s = s.reshape(s.shape[0], -1)
        return s.mean(dim=1) if _is_torch(s) else s.mean(axis=1)

    def to_numpy(self) -> "PixelMoments":
        if _is_torch(self.mean):
            return PixelMoments(self.n, self.mean.detach().cpu().numpy(),
                                self.m2.detach().cpu().numpy())
        return self

    def select(self, idx: Any) -> "PixelMoments":
        """The moments of a subset of examples (index along the first axis)."""
        return PixelMoments(self.n, self.mean[idx], self.m2[idx])


def _copy(x: Any) -> Any:
    return x.clone() if _is_torch(x) else np.array(x, copy=True)


@dataclass
class ClassMoments:
    """Float64 moments of raw VoG over the examples of one class (or a vector of classes).

    ``n``, ``mean`` and ``m2`` are numpy float64 arrays of the same shape (scalars for one
    class). States merge with Chan's formula; ``finalize()`` gives ``(m_c, s_c)`` with the
    population std (ddof = 0).
    """

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, ...] = ()) -> "ClassMoments":
        return cls(np.zeros(shape), np.zeros(shape), np.zeros(shape))

    @classmethod
    def from_values(cls, values: Any) -> "ClassMoments":
        """Moments of one batch of values (two-pass in float64, exact to rounding)."""
        v = np.asarray(values.detach().cpu().numpy() if _is_torch(values) else values,
                       dtype=np.float64).ravel()
        if v.size == 0:
            return cls.empty()
        mean = v.mean()
        return cls(np.float64(v.size), mean, np.sum((v - mean) ** 2))

    @classmethod
    def from_groups(cls, values: Any, groups: Any, num_groups: int) -> "ClassMoments":
        """Vector state: moments of ``values`` per integer group id in ``[0, num_groups)``."""
        v = np.asarray(values, dtype=np.float64).ravel()
        g = np.asarray(groups, dtype=np.int64).ravel()
        n = np.bincount(g, minlength=num_groups).astype(np.float64)
        s = np.bincount(g, weights=v, minlength=num_groups)
        mean = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
        m2 = np.bincount(g, weights=(v - mean[g]) ** 2, minlength=num_groups)
        return cls(n, mean, m2)

    def update(self, value: float) -> "ClassMoments":
        """Fold one value in (Welford: :func:`chan_merge` with a set of one)."""
        return self.merge(ClassMoments(np.float64(1), np.float64(value), np.float64(0)))

    def merge(self, other: "ClassMoments") -> "ClassMoments":
        """Both sets of values together (:func:`chan_merge`, per class)."""
        n, mean, m2 = chan_merge(np.asarray(self.n, np.float64), np.asarray(self.mean, np.float64),
                                 np.asarray(self.m2, np.float64), np.asarray(other.n, np.float64),
                                 np.asarray(other.mean, np.float64), np.asarray(other.m2, np.float64))
        return ClassMoments(np.asarray(n, np.float64), np.asarray(mean, np.float64),
                            np.asarray(m2, np.float64))

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """``(m_c, s_c)``: mean and population std (ddof = 0). Empty classes give NaN."""
        n = np.asarray(self.n, np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, self.mean, np.nan)
            std = np.where(n > 0, np.sqrt(np.maximum(self.m2, 0) / n), np.nan)
        return mean, std


def vog_from_gradient_maps(maps: Any, dtype: Any = None) -> Any:
    """Raw VoG of ``N`` examples from their gradient maps over ``K`` checkpoints.

    ``maps`` has shape ``[K, N, H, W]`` (channel-averaged maps) or ``[K, N, D]`` (vector
    inputs). Returns the ``N`` values ``mean over pixels of sqrt((1/K) Σ_t (S_t − μ)²)``
    (DESIGN.md §1, steps 4–5). Numpy input is accumulated in float64 unless ``dtype`` says
    otherwise; torch input keeps its dtype and device.
    """
    if not _is_torch(maps):
        maps = np.asarray(maps)
        if not np.issubdtype(maps.dtype, np.floating):
            maps = maps.astype(np.float64)
        dtype = dtype or np.float64
    if maps.ndim < 3:
        raise ValueError(
            f"gradient maps must have shape [K, N, H, W] or [K, N, D]; got {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        raise ValueError("gradient maps hold zero checkpoints (K = 0): VoG is undefined")
    state = PixelMoments.from_map(maps[0], dtype=dtype)
    for t in range(1, maps.shape[0]):
        state.update(maps[t])
    return state.finalize()


def class_normalize(vog: np.ndarray, classes: np.ndarray, mean: np.ndarray, std: np.ndarray,
                    method: str = "zscore") -> np.ndarray:
    """Class-normalise raw VoG (DESIGN.md §1 step 6).

    ``mean``/``std`` are indexed by class id. A class whose std is 0 (or that has a single
    example) gets z = 0, never NaN. ``method``: ``zscore`` | ``abs_zscore`` | ``none``.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {method!r}; expected one of {NORMALIZATIONS}")
    vog = np.asarray(vog, dtype=np.float64)
    if method == "none":
        return vog.copy()
    classes = np.asarray(classes, dtype=np.int64)
    m = np.asarray(mean, np.float64)[classes]
    s = np.asarray(std, np.float64)[classes]
    ok = np.isfinite(s) & (s > 0)
    z = np.zeros_like(vog)
    np.divide(vog - m, s, out=z, where=ok)
    return np.abs(z) if method == "abs_zscore" else z
