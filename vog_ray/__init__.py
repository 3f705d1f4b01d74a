"""vog-ray: rank every example of a dataset by Variance of Gradients (VoG), on Ray.

The math (``moments``, ``engine``, ``reduce``, ``score``) imports nothing from Ray.
"""

from .moments import ClassMoments, PixelMoments, class_normalize, vog_from_gradient_maps
from .engine import GradientEngine, resolve_windows
from .models import build_model, register
from .score import VogOptions, score

__version__ = "0.1.0"

__all__ = [
    "ClassMoments", "PixelMoments", "class_normalize", "vog_from_gradient_maps",
    "GradientEngine", "resolve_windows", "build_model", "register", "score", "VogOptions",
]
