"""A tiny model factory for the registry test (``"tests.helpers_factory:make"``)."""

from torch import nn


def make(in_features: int = 4, width: int = 8, num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, num_classes))


def not_a_model(**kwargs):
    return {"kwargs": kwargs}
