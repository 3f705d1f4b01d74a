"""vog-ray: rank every example of a dataset by Variance of Gradients (VoG), on Ray.

The package is laid out as the data flows: ``core`` (the math: moments, windows, the engine,
class normalisation and ranks — no Ray), ``models`` (architectures, checkpoints), ``data``
(listing, formats, decoding), ``distributed`` (the audit on Ray), ``report``; ``single`` is the
single-process audit (:func:`score`), ``runs`` opens published runs. Names are imported lazily,
so a Ray worker that only runs the reduce never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ClassMoments": "core.moments", "PixelMoments": "core.moments", "class_normalize": "core.moments",
    "vog_from_gradient_maps": "core.moments", "GradientEngine": "core.engine", "resolve_windows": "core.windows",
    "build_model": "models", "register": "models", "score": "single", "VogOptions": "core.options",
    "open_run": "runs", "vog_map": "explore.heatmap", "vog_maps": "explore.heatmap",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vog_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
