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
This module imports nothing from Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import sys


class _LazyTorch:
    """torch, imported only when a torch tensor is actually used (the reduce runs without it)."""

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)


torch = _LazyTorch()

__all__ = [
    "PixelMoments",
    "ClassMoments",
    "vog_from_gradient_maps",
    "class_normalize",
    "NORMALIZATIONS",
]

NORMALIZATIONS = ("zscore", "abs_zscore", "none")


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
        """Fold one checkpoint's gradient maps ``x`` (shape ``[N, *pixels]``) in place (Welford)."""
        if self.n == 0:
            if _is_torch(self.mean):
                self.mean.copy_(x)
            else:
                self.mean[...] = x
            self.m2[...] = 0
            self.n = 1
            return self
        self.n += 1
        x = x.to(self.mean.dtype) if _is_torch(x) else np.asarray(x, dtype=self.mean.dtype)
        delta = x - self.mean
        self.mean += delta / self.n
        # M2 += delta * (x - new_mean)
        self.m2 += delta * (x - self.mean)
        return self

    def merge(self, other: "PixelMoments") -> "PixelMoments":
        """A new state equal to both observation sets together (Chan et al.)."""
        if other.n == 0:
            return PixelMoments(self.n, _copy(self.mean), _copy(self.m2))
        if self.n == 0:
            return PixelMoments(other.n, _copy(other.mean), _copy(other.m2))
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return PixelMoments(n, mean, m2)

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
        """Fold one value in (Welford)."""
        self.n = self.n + 1
        delta = value - self.mean
        self.mean = self.mean + delta / self.n
        self.m2 = self.m2 + delta * (value - self.mean)
        return self

    def merge(self, other: "ClassMoments") -> "ClassMoments":
        n = self.n + other.n
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            w = np.where(n > 0, other.n / np.where(n > 0, n, 1), 0.0)
            mean = self.mean + delta * w
            m2 = self.m2 + other.m2 + delta * delta * np.where(
                n > 0, self.n * other.n / np.where(n > 0, n, 1), 0.0)
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
