"""A small, honest training loop that saves a checkpoint every epoch to any fsspec URL.

Used by ``jobs/train.py`` (an example for users), by the demo and by the tests. VoG needs the
checkpoints of a training run; this writes them as plain ``state_dict`` files named
``epoch_<n>.pt`` (natural order), so any audit config can glob them.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .models import build_model
from .storage import StorageOptions, join, resolve

__all__ = ["train", "TrainResult", "save_state_dict"]

log = logging.getLogger("vog_ray.train")


@dataclass
class TrainResult:
    checkpoints: list[str]
    train_error: list[float]
    seconds: float


def save_state_dict(model: nn.Module, url: str, storage: StorageOptions | None = None) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    fs, path = resolve(url, storage)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())


def train(x: np.ndarray, y: np.ndarray, *, model: Any, out_url: str, epochs: int, batch_size: int = 128,
          lr: float = 1e-3, weight_decay: float = 0.0, optimizer: str = "adam", seed: int = 0,
          storage: StorageOptions | None = None, stop_at_error: float | None = None,
          min_epochs: int = 0, progress: Callable[[int, float, float], None] | None = None,
          save_initial: bool = False) -> TrainResult:
    """Train ``model`` on ``(x, y)`` and save ``epoch_<n>.pt`` after every epoch.

    ``stop_at_error``: stop once the training error (eval mode, whole set) is at or below it,
    after ``min_epochs``. ``batch_size <= 0`` means full batch.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = build_model(model) if not isinstance(model, nn.Module) else model
    xt = torch.as_tensor(np.asarray(x, np.float32))
    yt = torch.as_tensor(np.asarray(y, np.int64))
    n = len(xt)
    bs = n if batch_size <= 0 else batch_size
    opt = (torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
           if optimizer == "sgd" else torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay))
    loss_fn = nn.CrossEntropyLoss()
    urls, errors = [], []
    t0 = time.time()
    if save_initial:
        u = join(out_url, "epoch_0.pt")
        save_state_dict(net, u, storage)
        urls.append(u)
    for epoch in range(1, epochs + 1):
        net.train()
        perm = torch.randperm(n, generator=g)
        for a in range(0, n, bs):
            idx = perm[a:a + bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(xt[a:a + 1024]).argmax(1) for a in range(0, n, 1024)])
        err = float((pred != yt).float().mean())
        errors.append(err)
        u = join(out_url, f"epoch_{epoch}.pt")
        save_state_dict(net, u, storage)
        urls.append(u)
        if progress:
            progress(epoch, err, time.time() - t0)
        else:
            log.info("epoch %d: training error %.4f (%.1f s)", epoch, err, time.time() - t0)
        if stop_at_error is not None and epoch >= min_epochs and err <= stop_at_error:
            break
    return TrainResult(urls, errors, time.time() - t0)
