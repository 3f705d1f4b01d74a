"""Model registry: architectures by name, torchvision classifiers, and named factories.

A model spec is a string or a dict::

    "lenet"                                  # built-in
    {"name": "mlp", "in_features": 2, "hidden": [16, 16], "num_classes": 2}
    "torchvision:resnet50"                   # any torchvision classifier (weights=None)
    {"name": "mypkg.models:make_net", "width": 64}   # an explicitly named factory

Nothing from a config is executed except a factory the spec names explicitly
(``package.module:callable``); its module is imported only then, and only once
:func:`.factories.check_factory` trusts it (never the standard library, ``builtins`` or the
libraries vog-ray runs on; ``VOG_RAY_ALLOWED_FACTORIES`` narrows it to named packages).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import nn

from .factories import check_factory

__all__ = ["build_model", "register", "MODELS", "ModelSpec", "normalize_spec"]

ModelSpec = "str | dict[str, Any]"

_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU, "none": nn.Identity,
}


class MLP(nn.Module):
    """Fully connected classifier. Inputs of any shape are flattened."""

    def __init__(self, in_features: int, num_classes: int, hidden: list[int] | tuple[int, ...] = (64,),
                 activation: str | None = "relu"):
        super().__init__()
        act = _ACTS[(activation or "none").lower()]
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), act()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-5 style CNN for 28×28 inputs (MNIST)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32×32 inputs: 3×3 stem, stride 1, no max-pool (He et al., CIFAR variant)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers = []
        cin = width
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
            cout = width * mult
            layers.append(nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


class SmallCNN(nn.Module):
    """Two-conv CNN for small images (e.g. 8×8 or 16×16 digits)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, size: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * width * (size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "resnet18_cifar": ResNet18Cifar,
    "small_cnn": SmallCNN,
}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model factory to the registry under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = fn
        return fn

    return deco


def normalize_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"model spec {spec!r} has no 'name'")
        name = spec.pop("name")
        kwargs = spec.pop("kwargs", {}) or {}
        kwargs.update(spec)
        return str(name), kwargs
    raise TypeError(f"model spec must be a string or a mapping, not {type(spec).__name__}")


def build_model(spec: Any) -> nn.Module:
    """Build an (untrained) model from a spec. See the module docstring for the forms."""
    name, kwargs = normalize_spec(spec)
    if name in MODELS:
        return MODELS[name](**kwargs)
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        try:
            fn = torchvision.models.get_model_builder(arch)
        except ValueError as e:
            raise ValueError(f"unknown torchvision model {arch!r}") from e
        kwargs.setdefault("weights", None)
        return fn(**kwargs)
    if ":" in name:
        mod_name, attr = check_factory(name)  # before anything is imported
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"model factory module {mod_name!r} cannot be imported: {e}") from e
        fn = getattr(mod, attr, None)
        if fn is None or not callable(fn):
            raise ValueError(f"model factory {name!r}: {mod_name} has no callable {attr!r}")
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not nn.Module")
        return model
    raise ValueError(
        f"unknown model {name!r}: use one of {sorted(MODELS)}, 'torchvision:<arch>', "
        "or an explicit factory 'package.module:callable'")
