"""Models and checkpoints: architectures by name (built-ins, torchvision, explicitly named
factories — :mod:`.registry`) and checkpoints read from any fsspec URL and loaded safely
(``weights_only=True`` or safetensors — :mod:`.checkpoints`)."""

from .registry import MODELS, build_model, normalize_spec, register

__all__ = ["MODELS", "build_model", "normalize_spec", "register"]
