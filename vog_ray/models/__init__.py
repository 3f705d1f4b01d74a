"""Models and checkpoints: architectures by name (built-ins, torchvision, explicitly named
factories — :mod:`.registry`; which factories a config may name — :mod:`.factories`) and
checkpoints read from any fsspec URL and loaded safely (``weights_only=True`` or safetensors —
:mod:`.checkpoints`). Names are re-exported lazily: importing this package imports no torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"MODELS": "registry", "build_model": "registry", "normalize_spec": "registry", "register": "registry"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vog_ray.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
