"""Scikit-learn's 8×8 digits and the tiny CNN trained on them: the images, the K = 4 checkpoints
(trained once per session by the ``digits_checkpoints`` fixture) and the audit config dict that the
integration tests start from. Plain functions: ``tests/runfactory.py`` and the fixtures use them.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MODEL", "K", "TRAINED_ON", "digit_images", "to_input", "Checkpoints", "train_checkpoints",
           "upload_checkpoints", "audit_config", "TinyDigits"]

MODEL = {"name": "small_cnn", "size": 8, "width": 8, "num_classes": 10}
K = 4                # checkpoints: one per epoch
TRAINED_ON = 600     # the checkpoints are trained on the first 600 digits


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 ``[N, 8, 8]`` images on 0..255, and their int64 labels (a copy
    for each caller: 115 KB)."""
    imgs, labels = _digits()
    return imgs.copy(), labels.copy()


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def to_input(imgs: np.ndarray) -> np.ndarray:
    """What the decode stage makes of 8×8 gray PNGs with the default transform (× float32(1/255))."""
    return imgs[:, None].astype(np.float32) * np.float32(1 / 255)


@dataclass(frozen=True)
class Checkpoints:
    """K checkpoints (``epoch_1.pt`` … in ``dir``) of ``MODEL`` and the training error after each epoch."""

    dir: str
    paths: tuple[str, ...]
    train_error: tuple[float, ...]
    model: dict

    @property
    def glob(self) -> str:
        return os.path.join(self.dir, "epoch_*.pt")


def train_checkpoints(out_dir: str) -> Checkpoints:
    """Adam, batch 64, lr 3e-3, seed 0, K epochs on the first ``TRAINED_ON`` digits (a few seconds)."""
    import torch

    from vog_ray.train import train

    imgs, labels = digit_images()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (and noise on shared CPUs)
    try:
        res = train(to_input(imgs[:TRAINED_ON]), labels[:TRAINED_ON], model=MODEL, out_url=out_dir, epochs=K,
                    batch_size=64, lr=3e-3, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert len(res.checkpoints) == K
    return Checkpoints(out_dir, tuple(res.checkpoints), tuple(res.train_error), dict(MODEL))


def upload_checkpoints(paths: Any, url: str, storage) -> str:
    """Copy local checkpoint files to ``url`` (e.g. on S3), keeping their names; returns the glob there."""
    from vog_ray.storage import join, resolve

    for p in paths:
        fs, path = resolve(join(url, os.path.basename(p)), storage)
        with fs.open(path, "wb") as f, open(p, "rb") as src:
            f.write(src.read())
    return join(url, "epoch_*.pt")


def audit_config(*, splits: dict, out_url: str, checkpoints: Any, model: dict | None = None,
                 name: str = "digits-test", **sections: Any) -> dict:
    """An audit config dict: CPU, no report; each keyword section is merged into the base one of
    that name (``compute={"batch_size": 8}`` keeps ``device: cpu``) or added when there is none."""
    cfg: dict[str, Any] = {
        "name": name,
        "data": {"splits": splits},
        "model": dict(model or MODEL),
        "checkpoints": checkpoints,
        "compute": {"device": "cpu"},
        "output": {"url": out_url},
        "report": {"enabled": False},
    }
    for k, v in sections.items():
        if v is None:
            continue
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


class TinyDigits:
    """The digits and the first 3 of the shared checkpoints, copied into ``<root>/ckpts`` (a
    directory of its own: tests serve it over HTTP and copy from it). ``config(...)`` builds an
    audit config dict with tiny batches (many blocks)."""

    MODEL = MODEL
    NUM_CHECKPOINTS = 3

    def __init__(self, root, checkpoints: Checkpoints):
        self.root = root
        self.imgs, self.labels = digit_images()
        self.ckpt_dir = str(root / "ckpts")
        os.makedirs(self.ckpt_dir, exist_ok=True)
        for p in checkpoints.paths[:self.NUM_CHECKPOINTS]:
            shutil.copy(p, self.ckpt_dir)
        self.ckpt_glob = self.ckpt_dir + "/epoch_*.pt"

    def upload_checkpoints(self, url: str, storage) -> str:
        """Copy the checkpoints to ``url`` (e.g. S3); returns the glob there."""
        return upload_checkpoints(sorted(glob.glob(self.ckpt_glob)), url, storage)

    def config(self, splits: dict, out_url: str, *, checkpoints: str | None = None, **sections) -> dict:
        compute = {"batch_size": 16, "decode_batch_size": 16, **sections.pop("compute", {})}
        return audit_config(splits=splits, out_url=out_url, checkpoints=checkpoints or self.ckpt_glob,
                            name="tiny-digits", compute=compute, **sections)
