"""Train a model and save a checkpoint every epoch (an example for users; used by the demo).

    python jobs/train.py --npz data/train.npz --model lenet --epochs 40 --out s3://bucket/run1/ckpt \
        [--mean 0.1307 --std 0.3081] [--stop-at-error 0.005] [--endpoint-url http://127.0.0.1:9000]

The npz holds ``x`` (uint8 or float images, [N, H, W] or [N, C, H, W]) and ``y``. Checkpoints
are plain state_dicts named ``epoch_<n>.pt`` under ``--out`` (any fsspec URL).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from vog_ray.storage import StorageOptions, resolve  # noqa: E402
from vog_ray.train import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", required=True, help="URL of an .npz with x and y")
    p.add_argument("--model", default="lenet", help='model name or JSON spec, e.g. \'{"name": "mlp", "in_features": 784}\'')
    p.add_argument("--out", required=True, help="where to write epoch_<n>.pt (any fsspec URL)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean", type=float, nargs="*", default=None)
    p.add_argument("--std", type=float, nargs="*", default=None)
    p.add_argument("--stop-at-error", type=float, default=None, help="stop when the training error reaches this")
    p.add_argument("--endpoint-url", default=None)
    a = p.parse_args(argv)
    storage = StorageOptions(endpoint_url=a.endpoint_url)
    fs, path = resolve(a.npz, storage)
    with fs.open(path, "rb") as f:
        d = np.load(f, allow_pickle=False)
        x, y = d["x"], d["y"]
    x = x.astype(np.float32)
    if x.max() > 1.5:
        x = x / 255.0
    if x.ndim == 3:
        x = x[:, None]
    if a.mean:
        m = np.asarray(a.mean, np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(a.std or [1.0], np.float32).reshape(1, -1, 1, 1)
        x = (x - m) / s
    model = json.loads(a.model) if a.model.strip().startswith("{") else a.model

    def show(epoch: int, err: float, secs: float) -> None:
        print(f"epoch {epoch:3d}  training error {err:.4f}  ({secs:.1f} s)", flush=True)

    res = train(x, y, model=model, out_url=a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                seed=a.seed, storage=storage, stop_at_error=a.stop_at_error, progress=show)
    print(f"saved {len(res.checkpoints)} checkpoints under {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
