"""Which model factories a config may name (``package.module:callable``): the trust check run
before a factory's module is imported. Imports no torch, so the config can run it at load time.

A config that names a factory runs that code; checkpoints and data never run code. Refused
always: the standard library and ``builtins`` (``subprocess:call``, ``os:system``,
``builtins:eval``) and the libraries vog-ray itself runs on, whose functions unpickle, fetch or
execute code (``torch:load``, ``torch.hub:load``, ``numpy:load``). An operator restricts factories
further with ``VOG_RAY_ALLOWED_FACTORIES=pkg_a,pkg_b`` (set but empty: no factory at all).
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["ALLOWED_FACTORIES_ENV", "RUNTIME_PACKAGES", "FactoryRefused", "check_factory", "is_factory_name"]

ALLOWED_FACTORIES_ENV = "VOG_RAY_ALLOWED_FACTORIES"

# vog-ray's own dependencies (pyproject.toml) and what they pull in: none of them defines the
# user's model, and each holds a loader that unpickles, downloads or runs code when called with
# the right arguments (torch.hub.load, torch.load told to unpickle, numpy.load with pickles allowed…)
RUNTIME_PACKAGES = frozenset({
    "vog_ray", "torch", "torchvision", "ray", "numpy", "scipy", "pyarrow", "fsspec", "s3fs", "gcsfs",
    "pydantic", "pydantic_core", "yaml", "sklearn", "skimage", "matplotlib", "PIL", "safetensors",
    "mlxtend", "pandas", "joblib", "cloudpickle", "dill", "botocore", "boto3", "aiobotocore", "requests",
    "urllib3", "aiohttp", "click", "setuptools", "pkg_resources", "pip", "importlib_metadata",
    "__main__",
})

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ATTR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class FactoryRefused(ValueError):
    """A config names a model factory that this process does not trust."""


def is_factory_name(name: str) -> bool:
    """Whether a model name is a factory (``module:callable``) rather than a built-in or
    ``torchvision:<arch>``."""
    return ":" in name and not name.startswith("torchvision:")


def _allowed_packages() -> list[str] | None:
    raw = os.environ.get(ALLOWED_FACTORIES_ENV)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def check_factory(name: str) -> tuple[str, str]:
    """``(module, attribute)`` of a factory name this process may import and call; raises
    :class:`FactoryRefused` (naming the rule) before anything is imported."""
    mod, _, attr = name.partition(":")
    if not _MODULE.fullmatch(mod) or not _ATTR.fullmatch(attr):
        raise FactoryRefused(f"model factory {name!r} must look like 'package.module:callable'")
    top = mod.split(".", 1)[0]
    if top in sys.stdlib_module_names or top == "builtins":
        raise FactoryRefused(f"model factory {name!r} is refused: {top!r} is part of the Python standard "
                             "library; a factory must come from your own package")
    if top in RUNTIME_PACKAGES:
        raise FactoryRefused(f"model factory {name!r} is refused: {top!r} is a library vog-ray runs on, not a "
                             "model package (use a built-in name or 'torchvision:<arch>', or your own factory)")
    allowed = _allowed_packages()
    if allowed is not None and not any(mod == p or mod.startswith(p + ".") for p in allowed):
        listed = ", ".join(allowed) if allowed else "none"
        raise FactoryRefused(f"model factory {name!r} is refused: {ALLOWED_FACTORIES_ENV} allows factories from "
                             f"these packages only: {listed}")
    return mod, attr
