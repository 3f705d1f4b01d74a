"""vog-ray: rank every example of a dataset by Variance of Gradients (VoG), on Ray.

The math (``moments``, ``engine``, ``reduce``, ``score``) imports nothing from Ray. Names are
imported lazily, so a Ray worker that only runs the reduce never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ClassMoments": "moments", "PixelMoments": "moments", "class_normalize": "moments",
    "vog_from_gradient_maps": "moments", "GradientEngine": "engine", "resolve_windows": "engine",
    "build_model": "models", "register": "models", "score": "single", "VogOptions": "single",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vog_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
