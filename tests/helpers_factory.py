"""Tiny model factories for tests: ``"tests.helpers_factory:make"`` (the registry test) and
``"tests.helpers_factory:sqrt_pixel"`` (VoG that is not a number for some examples)."""

from torch import nn


def make(in_features: int = 4, width: int = 8, num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, num_classes))


def not_a_model(**kwargs):
    return {"kwargs": kwargs}


class _SqrtPixel(nn.Module):
    """A linear classifier plus ``sqrt(|pixel|)`` of one input pixel: where that pixel is 0 its
    gradient is 0 × inf = NaN, so VoG is not a number for those examples (finite for the others)."""

    def __init__(self, in_features: int, num_classes: int, pixel: int):
        super().__init__()
        self.lin = nn.Linear(in_features, num_classes)
        self.pixel = pixel

    def forward(self, x):
        import torch

        x = x.flatten(1)
        return self.lin(x) + torch.sqrt(x[:, self.pixel:self.pixel + 1].abs())


def sqrt_pixel(in_features: int = 64, num_classes: int = 10, pixel: int = 25) -> nn.Module:
    return _SqrtPixel(in_features, num_classes, pixel)
