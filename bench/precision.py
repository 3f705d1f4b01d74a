#!/usr/bin/env python
"""Fidelity of the engine's reduced-precision modes against fp32, per window and target.

For each dataset the same examples are scored with ``vog_ray.score`` in fp32 and in each other mode
(same checkpoints, same batches, z-scores per split and class), and per ``<window>_<target>`` the
script reports the largest |Δz|, the Spearman correlation of z and the top-decile overlap (the share
of fp32's highest-z tenth that the mode also puts in its highest tenth); a window is *safe* for a
mode when Spearman ≥ 0.99 (``vog_ray.core.precision.SAFE_SPEARMAN``). Two datasets:

* ``demo``: the ``make demo`` data and checkpoints (real MNIST, 20% shuffled training labels, the
  15 MNIST-C corruptions, LeNet trained until it memorised, one checkpoint per epoch; windows
  early = first 3, late = last 3, all; predicted labels as the demo audits them); the worst value
  over its three splits (train, test, ood) is reported. ``--demo DIR`` is the demo's ``store``
  folder; without one, a smaller demo is prepared in a temporary folder (``vog_ray.demo.prepare``);
* ``resnet18_cifar``: ResNet-18 (CIFAR variant, width 64) trained briefly (``--resnet-epochs``
  epochs, a checkpoint each) on real MNIST digits padded to 32×32×3 with 20% shuffled labels,
  scored on its training images with true labels; windows early / late / all.

On the CPU, ``bf16`` runs under CPU autocast and ``tf32`` is fp32 exactly (TF32 exists only on
CUDA tensor cores), so only bf16 is measured here; ``bench/gpu.py`` runs the same measurement on a
GPU for tf32 and bf16. Each mode's wall time is printed beside fp32's (a side figure, not a
verdict). The last line is one JSON object.

    .venv/bin/python bench/precision.py --demo demo-output/store          # ~10 min on 2 CPU cores
    .venv/bin/python bench/precision.py --quick                            # ~1 min: small sizes
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

WINDOWS = {"early": "first:3", "late": "last:3", "all": "all"}
TARGETS = ["logit", "softmax"]


def natural(paths: list[str]) -> list[str]:
    from vog_ray.storage import natural_key

    return sorted(paths, key=natural_key)


def z_scores(x: np.ndarray, y: np.ndarray | None, *, model: Any, checkpoints: list[str], precision: str,
             device: str, label_mode: str, batch_size: int) -> tuple[dict[str, np.ndarray], float]:
    """``z_<window>_<target>`` per example (in input order) and the wall time of the scoring."""
    import vog_ray

    t = time.perf_counter()
    tab = vog_ray.score(x, y, model=model, checkpoints=checkpoints, windows=WINDOWS, targets=TARGETS,
                        label_mode=label_mode, batch_size=batch_size, device=device, precision=precision)
    dt = time.perf_counter() - t
    order = np.argsort(np.asarray(tab.column("id").to_pylist(), dtype=np.int64))
    return {c[2:]: tab.column(c).to_numpy(zero_copy_only=False)[order] for c in tab.column_names
            if c.startswith("z_")}, dt


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    from vog_ray.core.precision import SAFE_SPEARMAN, fidelity

    out = {}
    for k in ref:
        f = fidelity(ref[k], got[k])
        out[k] = {**f, "safe": f["spearman"] is not None and f["spearman"] >= SAFE_SPEARMAN}
    return out


def worst(per_split: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per key, the worst value of each figure over the splits."""
    out = {}
    for k in per_split[0]:
        fs = [p[k] for p in per_split]
        out[k] = {"n": sum(f["n"] for f in fs), "max_abs_dz": max(f["max_abs_dz"] for f in fs),
                  "spearman": min(f["spearman"] for f in fs),
                  "top_decile_overlap": min(f["top_decile_overlap"] for f in fs),
                  "safe": all(f["safe"] for f in fs)}
    return out


# ------------------------------------------------------------------ the demo's data
def demo_store(arg: str | None, quick: bool) -> Path:
    """The demo's ``store`` folder: the given one, or a small one prepared in a temporary folder."""
    if arg and Path(arg, "checkpoints").is_dir():
        return Path(arg)
    from vog_ray.demo import DemoSizes, prepare

    out = Path(tempfile.mkdtemp(prefix="vog-bench-precision-demo-"))
    sizes = (DemoSizes(n_train=600, n_test=200, n_ood_per_group=20, max_epochs=8, corruptions=["rotate", "fog"])
             if quick else DemoSizes(n_train=2000, n_test=500, n_ood_per_group=50, max_epochs=40))
    print(f"preparing a demo in {out} (no --demo store given)", flush=True)
    return Path(prepare(out, sizes)["store"])


def demo_splits(store: Path, limit: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import pyarrow.parquet as pq

    from vog_ray.config import TransformSpec
    from vog_ray.data.decode import decode_batch

    out = {}
    for split in ("train", "test", "ood"):
        t = pq.read_table(store / "data" / split)
        if limit:
            t = t.slice(0, limit)
        d = decode_batch({"image": t.column("image").to_numpy(zero_copy_only=False),
                          "label": t.column("label").to_numpy()}, TransformSpec(channels=1, mean=[0.1307], std=[0.3081]))
        assert (d["status"] == "ok").all()
        out[split] = (d["x"], d["label"])
    return out


def measure_demo(store: Path, modes: list[str], device: str, limit: int | None, batch_size: int) -> dict[str, Any]:
    ckpts = natural(glob.glob(str(store / "checkpoints" / "epoch_*.pt")))
    splits = demo_splits(store, limit)
    res: dict[str, Any] = {"checkpoints": len(ckpts), "examples": {s: len(v[1]) for s, v in splits.items()},
                           "model": "lenet", "label_mode": "predicted", "seconds": {}, "per_split": {}}
    z: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for mode in ["fp32", *modes]:
        z[mode], secs = {}, 0.0
        for s, (x, _) in splits.items():
            z[mode][s], dt = z_scores(x, None, model={"name": "lenet", "num_classes": 10}, checkpoints=ckpts,
                                      precision=mode, device=device, label_mode="predicted", batch_size=batch_size)
            secs += dt
        res["seconds"][mode] = round(secs, 2)
        print(f"  demo {mode}: {secs:.1f} s", flush=True)
    for mode in modes:
        per = {s: compare(z["fp32"][s], z[mode][s]) for s in splits}
        res["per_split"][mode] = per
        res[mode] = worst(list(per.values()))
    return res


# ------------------------------------------------------------------ resnet18_cifar, trained briefly
def mnist32(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n real MNIST digits as 3×32×32 (padded, normalised) with 20% of the labels shuffled."""
    from vog_ray.demo import MEAN, STD, load_mnist, shuffle_labels

    xtr, ytr, _, _ = load_mnist(seed, n_train=n, n_test=0)
    y, noisy = shuffle_labels(ytr, 0.2, seed)
    x = (np.pad(xtr, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255.0 - MEAN) / STD
    return np.repeat(x[:, None], 3, axis=1), y, noisy


def train_resnet(x: np.ndarray, y: np.ndarray, epochs: int, out: str, device: str, spec: dict) -> list[str]:
    from vog_ray.models import build_model
    from vog_ray.train import train

    model = build_model(spec).to(device)
    if device == "cuda":  # vog_ray.train moves nothing: train on the device with the tensors there
        return _train_on_device(model, x, y, epochs, out)
    res = train(x, y, model=model, out_url=out, epochs=epochs, batch_size=64, lr=1e-3, seed=0)
    print(f"  resnet18_cifar: {epochs} epochs on {len(y)} images, training error {res.train_error[-1]:.3f} "
          f"({res.seconds:.0f} s)", flush=True)
    return res.checkpoints


def _train_on_device(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, out: str) -> list[str]:
    """The same loop as ``vog_ray.train.train`` (Adam, batch 64, a checkpoint per epoch) on CUDA."""
    import torch

    from vog_ray.train import save_state_dict

    torch.manual_seed(0)
    xt, yt = torch.as_tensor(x, device="cuda"), torch.as_tensor(y, device="cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(0)
    urls = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(yt), generator=g).to("cuda")
        for a in range(0, len(yt), 64):
            idx = perm[a:a + 64]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        model.eval()
        u = os.path.join(out, f"epoch_{epoch}.pt")
        save_state_dict(model.cpu(), u)
        model.to("cuda")
        urls.append(u)
    return urls


def measure_resnet(n: int, epochs: int, modes: list[str], device: str, batch_size: int,
                   width: int = 64) -> dict[str, Any]:
    """``width``: the ResNet's base width (64: resnet18_cifar as it is; smaller for quick CPU runs)."""
    spec = {"name": "resnet18_cifar", "num_classes": 10, "width": width}
    x, y, noisy = mnist32(n)
    ck_dir = tempfile.mkdtemp(prefix="vog-bench-precision-resnet-")
    t = time.perf_counter()
    ckpts = train_resnet(x, y, epochs, ck_dir, device, spec)
    res: dict[str, Any] = {"checkpoints": len(ckpts), "examples": n, "model": "resnet18_cifar", "width": width,
                           "label_mode": "true", "train_s": round(time.perf_counter() - t, 1), "seconds": {}}
    z = {}
    for mode in ["fp32", *modes]:
        z[mode], dt = z_scores(x, y, model=spec, checkpoints=ckpts,
                               precision=mode, device=device, label_mode="true", batch_size=batch_size)
        res["seconds"][mode] = round(dt, 2)
        print(f"  resnet18_cifar {mode}: {dt:.1f} s", flush=True)
    for mode in modes:
        res[mode] = compare(z["fp32"], z[mode])
    return res


def table(results: dict[str, dict[str, Any]], modes: list[str]) -> str:
    lines = [f"{'dataset':<16} {'mode':<5} {'window_target':<15} {'max|dz|':>8} {'spearman':>9} {'top10%':>7}  safe",
             "-" * 72]
    for name, r in results.items():
        for mode in modes:
            for k, f in r.get(mode, {}).items():
                lines.append(f"{name:<16} {mode:<5} {k:<15} {f['max_abs_dz']:>8.3f} {f['spearman']:>9.4f} "
                             f"{f['top_decile_overlap']:>7.2f}  {'yes' if f['safe'] else 'NO'}")
    return "\n".join(lines)


def run(modes: list[str], device: str, *, demo: str | None, quick: bool, demo_limit: int | None,
        resnet_n: int, resnet_epochs: int, batch_size: int, which: tuple[str, ...] = ("demo", "resnet18_cifar"),
        resnet_width: int = 64) -> dict[str, Any]:
    """The measurement (also called by bench/gpu.py): ``{dataset: {mode: {key: fidelity}}, ...}``."""
    out: dict[str, Any] = {}
    if "demo" in which:
        out["demo"] = measure_demo(demo_store(demo, quick), modes, device, demo_limit, batch_size)
    if "resnet18_cifar" in which:
        out["resnet18_cifar"] = measure_resnet(resnet_n, resnet_epochs, modes, device, batch_size, resnet_width)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="demo-output/store", help="the demo's store folder (make demo)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default=None, help="comma-separated (default: bf16 on the CPU, tf32,bf16 on CUDA)")
    ap.add_argument("--quick", action="store_true", help="small sizes (~1 min)")
    ap.add_argument("--demo-limit", type=int, default=None, help="at most this many examples per demo split")
    ap.add_argument("--resnet-n", type=int, default=1000)
    ap.add_argument("--resnet-epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", choices=["demo", "resnet18_cifar"], default=None, help="measure one dataset only")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    modes = a.modes.split(",") if a.modes else (["bf16"] if a.device == "cpu" else ["tf32", "bf16"])
    if a.quick:
        a.demo_limit, a.resnet_n, a.resnet_epochs = a.demo_limit or 300, min(a.resnet_n, 96), min(a.resnet_epochs, 4)
    t0 = time.perf_counter()
    res = run(modes, a.device, demo=a.demo, quick=a.quick, demo_limit=a.demo_limit, resnet_n=a.resnet_n,
              resnet_epochs=a.resnet_epochs, batch_size=a.batch_size,
              which=(a.only,) if a.only else ("demo", "resnet18_cifar"))
    print(table(res, modes))
    out = {"device": a.device, "modes": modes, "quick": a.quick, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1), "results": res}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps(out, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
