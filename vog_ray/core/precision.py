"""Numeric precision of the gradient engine: the modes (``fp32``, ``tf32``, ``bf16``), the scopes that
apply one around the forward and backward passes, and the fidelity of a mode's scores against fp32
(max |Δz|, Spearman, top-decile overlap) with the Spearman below which a window counts as unsafe.

The pixel moments are never reduced: every mode folds float32 (or float64) gradient maps."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch

from .options import PRECISIONS

__all__ = ["PRECISIONS", "SAFE_SPEARMAN", "check_precision", "autocast", "cuda_flags", "precision_note",
           "fidelity", "unsafe_keys"]

# a mode is "safe" for a window/target when its scores rank the examples like fp32's: Spearman of
# z at least this (issue 14; a mode below it reorders the ranking enough to move examples across
# deciles, which is what a user of the ranked table reads)
SAFE_SPEARMAN = 0.99
# the share of the highest scores whose overlap the fidelity reports (the report's top decile)
TOP_SHARE = 0.1


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's autocast: bfloat16 for ``bf16`` (CUDA autocast on a GPU, CPU autocast on the
    CPU), nothing otherwise. The backward runs outside it, in the dtypes the forward recorded."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cuda_flags(device: torch.device, precision: str, benchmark: bool = True) -> Iterator[None]:
    """On CUDA: TF32 tensor-core matmuls and convolutions for ``tf32`` only, IEEE float32 otherwise
    (PyTorch's own default lets cuDNN convolutions use TF32, so ``fp32`` switches that off too), and
    ``cudnn.benchmark`` (the scorer's batches have one shape but the last). Set through PyTorch's
    ``fp32_precision`` API (reading the legacy ``allow_tf32`` flags fails once anything used the new
    one); the flags are process-wide: set for the scope, restored after it. On the CPU: nothing (TF32
    is a CUDA tensor-core format)."""
    if device.type != "cuda":
        yield
        return
    b = torch.backends
    saved = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark)
    mode = "tf32" if precision == "tf32" else "ieee"
    b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark = mode, mode, benchmark
    try:
        yield
    finally:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark = saved


def precision_note(device: torch.device, precision: str) -> str:
    """What a mode does on ``device``, in one line (the manifest's ``precision.effect``)."""
    if precision == "fp32":
        return "float32 forward and backward (TF32 off)" if device.type == "cuda" else "float32 forward and backward"
    if precision == "tf32":
        return ("TF32 tensor-core matmuls and convolutions, float32 elsewhere" if device.type == "cuda" else
                "no effect on the CPU (TF32 is a CUDA tensor-core format): computed in float32")
    return (f"forward under {device.type.upper()} autocast to bfloat16, backward in the forward's dtypes; "
            "float32 gradient maps and pixel moments")


def _ranks(v: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(v)


def fidelity(ref: np.ndarray, got: np.ndarray, top: float = TOP_SHARE) -> dict[str, Any]:
    """How closely ``got`` (a mode's scores, e.g. z) follows ``ref`` (fp32's) on the same examples:
    ``max_abs_dz``, ``spearman`` (of the two rankings) and ``top_decile_overlap`` (the share of ref's
    highest ``top`` of examples that are also among got's highest). Non-finite pairs are left out."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    ok = np.isfinite(ref) & np.isfinite(got)
    ref, got = ref[ok], got[ok]
    n = len(ref)
    if n < 3:
        return {"n": n, "max_abs_dz": None, "spearman": None, "top_decile_overlap": None}
    ra, rb = _ranks(ref), _ranks(got)
    if ra.std() == 0 or rb.std() == 0:  # a constant ranking: Spearman is undefined
        rho = 1.0 if np.array_equal(ra, rb) else 0.0
    else:
        rho = float(np.corrcoef(ra, rb)[0, 1])
    k = max(1, int(round(top * n)))
    top_ref = set(np.argsort(-ref, kind="stable")[:k].tolist())
    top_got = set(np.argsort(-got, kind="stable")[:k].tolist())
    return {"n": n, "max_abs_dz": float(np.max(np.abs(got - ref))), "spearman": rho,
            "top_decile_overlap": len(top_ref & top_got) / k}


def unsafe_keys(check: dict[str, dict[str, Any]], threshold: float = SAFE_SPEARMAN) -> list[str]:
    """The keys (``<window>_<target>``) of a fidelity check whose Spearman is below ``threshold``."""
    return [k for k, f in check.items() if f.get("spearman") is not None and f["spearman"] < threshold]
