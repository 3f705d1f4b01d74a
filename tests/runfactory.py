"""Build small, real published runs for the report tests (no Ray, no network).

``digits_run`` trains a tiny MLP on scikit-learn's 8×8 digits (with a share of shuffled training
labels flagged ``is_noisy``), audits it with :func:`vog_ray.score` and publishes the run in the
layout of :mod:`vog_ray.runs`. ``write_run`` publishes any hand-made score table, for tests
whose expected numbers are computed by hand. ``fake_readers`` stands in for
``vog_ray.data.fetch`` (tests insert it into ``sys.modules``) by reading the npz files written here.
"""

from __future__ import annotations

import os
import types
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from vog_ray.config import validate
from vog_ray.core.classes import class_lookup, merge_class_moments, partial_class_moments
from vog_ray.core.ranking import normalize, rank_table
from vog_ray.runs import publish, write_json, write_table

SCRIPT_CLASS = "<script>alert(1)</script>"  # a class name that must stay text in every report
SIGNAL_NAMES = ("loss", "label_logit", "label_prob", "margin", "pred", "correct", "max_prob",
                "max_logit", "energy", "el2n", "entropy")


def digits_data(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits as uint8 ``[N, 8, 8]`` images (0..255) with a fixed train/test split."""
    from tests.digits import digit_images

    img, y = digit_images()
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:1300], perm[1300:]
    return {"x_train": img[tr], "y_train": y[tr], "x_test": img[te], "y_test": y[te]}


def to_input(img: np.ndarray) -> np.ndarray:
    return (img.astype(np.float32) / 255.0)[:, None, :, :]


MODEL = {"name": "mlp", "in_features": 64, "hidden": [64], "num_classes": 10}


def train_checkpoints(ckpt_dir: str, x: np.ndarray, y: np.ndarray, *, epochs: int = 60,
                      num_checkpoints: int = 6, seed: int = 0) -> list[str]:
    """Full-batch Adam on the MLP; ``num_checkpoints`` state_dicts saved evenly over training."""
    from vog_ray.models import build_model

    os.makedirs(ckpt_dir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (and noise on shared CPUs)
    try:
        return _train(ckpt_dir, x, y, epochs, num_checkpoints, seed)
    finally:
        torch.set_num_threads(threads)


def _train(ckpt_dir, x, y, epochs, num_checkpoints, seed):
    from vog_ray.models import build_model

    torch.manual_seed(seed)
    model = build_model(MODEL)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt = torch.from_numpy(to_input(x))
    yt = torch.from_numpy(y)
    save_at = set(np.linspace(epochs // num_checkpoints, epochs, num_checkpoints).astype(int).tolist())
    paths = []
    for ep in range(1, epochs + 1):
        for a in range(0, len(yt), 256):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[a:a + 256]), yt[a:a + 256])
            loss.backward()
            opt.step()
        if ep in save_at:
            p = os.path.join(ckpt_dir, f"ckpt_{len(paths)}.pt")
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, p)
            paths.append(p)
    return paths


def _write_npz(path: str, images: np.ndarray, labels: np.ndarray | None, ids: Sequence[str]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {"image": images, "id": np.asarray(ids, dtype=str)}
    if labels is not None:
        arrays["label"] = labels
    np.savez(path, **arrays)
    return path


def finish_table(table: pa.Table, keys: Sequence[str], primary: str, normalization: str = "zscore",
                 normalize_against: str | None = None):
    """Class moments → z → ranks for a table holding raw ``vog_<key>`` columns (as score() does)."""
    classes = merge_class_moments([partial_class_moments(table, keys)], keys)
    table = normalize(table, class_lookup(classes, keys), keys, normalization, primary, normalize_against)
    return rank_table(table), classes


def write_run(root: str, table: pa.Table, classes: pa.Table, *, config: dict[str, Any],
              windows: dict[str, list[int]], targets: Sequence[str], primary: str,
              label_mode: str = "true", normalization: str = "zscore",
              num_checkpoints: int | None = None, checkpoints: list[dict] | None = None,
              run_id: str = "run1", published: bool = True, storage=None,
              normalize_against: str | None = None) -> str:
    """Publish a run under ``<root>/runs/<run_id>`` and return its URL."""
    keys = [f"{w}_{t}" for w in windows for t in targets]
    # the report section as given: the report's own checks are tested on settings that an audit's
    # config would refuse up front (a run written by hand, or by an older version)
    cfg = validate({**config, "report": {}}).to_dict()
    cfg["report"] = {**cfg["report"], **(config.get("report") or {})}
    run_url = root.rstrip("/") + "/runs/" + run_id
    splits = {}
    for s in sorted(set(table.column("split").to_pylist())):
        n = sum(1 for v in table.column("split").to_pylist() if v == s)
        splits[s] = {"rows_in": n, "rows_scored": n, "rows_rejected": 0}
    K = num_checkpoints or max(i for w in windows.values() for i in w) + 1
    manifest = {
        "run_id": run_id, "config": cfg, "windows": windows, "targets": list(targets), "keys": keys,
        "primary": primary, "label_mode": label_mode, "normalization": normalization,
        "normalize_against": normalize_against, "rows_without_reference": _unreferenced(classes, normalize_against),
        "num_checkpoints": K,
        "checkpoints": checkpoints or [{"url": f"ckpt_{i}.pt", "size": 0, "sha256": "0" * 64}
                                       for i in range(K)],
        "rows": {"in": table.num_rows, "scored": table.num_rows, "rejected": 0},
        "splits": splits, "wall_time_s": 1.0, "created": "2026-01-01T00:00:00Z",
        "throughput": {"examples_per_s": float(table.num_rows), "example_checkpoints_per_s": float(table.num_rows * K),
                       "checkpoints_scored": K},
    }
    # two score files, to exercise multi-file reads
    half = table.num_rows // 2
    write_table(run_url + "/scores/part-00000.parquet", table.slice(0, half), storage)
    write_table(run_url + "/scores/part-00001.parquet", table.slice(half), storage)
    write_table(run_url + "/classes.parquet", classes, storage)
    write_table(run_url + "/rejected.parquet",
                pa.table({"id": pa.array([], pa.string()), "split": pa.array([], pa.string()),
                          "reason": pa.array([], pa.string())}), storage)
    write_json(run_url + "/manifest.json", manifest, storage)
    if published:
        publish(run_url, root, run_id, storage)
    return run_url


def _unreferenced(classes: pa.Table, reference: str | None) -> dict:
    from vog_ray.core.ranking import unreferenced

    return {s: {str(c): n for c, n in per.items()} for s, per in unreferenced(classes, reference).items()}


def _base_config(root: str, splits: dict[str, dict], windows, targets, label_mode,
                 report: dict | None, class_names) -> dict:
    cfg = {
        "name": "digits-test",
        "data": {"splits": splits},
        "model": MODEL,
        "checkpoints": os.path.join(root, "ckpts", "ckpt_*.pt"),
        "vog": {"targets": list(targets), "label": label_mode, "windows": windows},
        "output": {"url": root},
        "report": report or {},
    }
    if class_names is not None:
        cfg["data"]["class_names"] = list(class_names)
    return cfg


def digits_run(root: str, *, noise: float = 0.2, label_mode: str = "true",
               targets: Sequence[str] = ("logit", "softmax"), epochs: int = 60,
               num_checkpoints: int = 6, ood: bool = False, report: dict | None = None,
               class_names: Sequence[str] | None = None, run_id: str = "run1",
               seed: int = 0, ckpt_seed: int = 0, published: bool = True) -> str:
    """Train, audit and publish a digits run; returns the run URL.

    Splits: ``train`` (``is_noisy`` carried: shuffled labels) and ``test``; with ``ood=True``
    also ``ood_noise`` (uniform noise images, unlabelled) and ``ood_invert`` (inverted test
    images, unlabelled), for a ``label_mode="predicted"`` OoD audit.
    """
    from vog_ray import score

    d = digits_data(seed)
    rng = np.random.default_rng(seed + 1)
    y_train = d["y_train"].copy()
    noisy = rng.random(len(y_train)) < noise
    y_train[noisy] = (y_train[noisy] + rng.integers(1, 10, noisy.sum())) % 10
    ckpts = train_checkpoints(os.path.join(root, "ckpts"), d["x_train"], y_train, epochs=epochs,
                              num_checkpoints=num_checkpoints, seed=ckpt_seed)
    windows_spec = {"early": "first:3", "late": "last:3"}
    windows = {"early": [0, 1, 2], "late": list(range(num_checkpoints - 3, num_checkpoints))}
    split_data: dict[str, tuple[np.ndarray, np.ndarray | None, dict]] = {
        "train": (d["x_train"], y_train, {"is_noisy": noisy}),
        "test": (d["x_test"], d["y_test"], {}),
    }
    if ood:
        n = len(d["y_test"])
        split_data["ood_noise"] = (rng.integers(0, 256, (n, 8, 8)).astype(np.uint8), None, {})
        split_data["ood_invert"] = ((255 - d["x_test"]).astype(np.uint8), None, {})
    tables, classes, specs = [], [], {}
    for name, (x, y, extra) in split_data.items():
        ids = [f"{name}-{i:04d}" for i in range(len(x))]
        url = _write_npz(os.path.join(root, "data", f"{name}.npz"), x, y, ids)
        specs[name] = {"format": "npz", "url": url, "id_column": "id",
                       "label_column": "label" if y is not None else None,
                       "keep_columns": sorted(extra)}
        t, c = score(to_input(x), y, model=MODEL, checkpoints=ckpts, windows=windows_spec,
                     targets=list(targets), label_mode=label_mode, ids=ids, split=name,
                     extra=extra or None, device="cpu", return_classes=True)
        tables.append(t.drop_columns(["status"]))
        classes.append(c)
    table = pa.concat_tables(tables, promote_options="default")
    keys = [f"{w}_{t}" for w in windows for t in targets]
    primary = f"late_{targets[0]}"
    cfg = _base_config(root, specs, windows_spec, targets, label_mode, report, class_names)
    return write_run(root, table, pa.concat_tables(classes), config=cfg, windows=windows,
                     targets=targets, primary=primary, label_mode=label_mode,
                     num_checkpoints=num_checkpoints, run_id=run_id, published=published,
                     checkpoints=[{"url": p, "size": os.path.getsize(p), "sha256": _sha256(p)}
                                  for p in ckpts])


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def synthetic_table(split_rows: dict[str, dict[str, Any]], K: int = 3,
                    keys: Sequence[str] = ("late_logit",)) -> pa.Table:
    """A score table (before normalisation) from hand-given columns.

    ``split_rows[split]`` holds ``label`` (list), ``vog_<key>`` lists, optionally ``pred``,
    ``sig_<name>`` as ``[n, K]`` arrays and extra carried columns. Missing signals are zeros.
    """
    parts = []
    for split, cols in split_rows.items():
        label = np.asarray(cols["label"], np.int64)
        n = len(label)
        pred = np.asarray(cols.get("pred", np.where(label >= 0, label, 0)), np.int64)
        target = np.asarray(cols.get("target_label", np.where(label >= 0, label, pred)), np.int64)
        out: dict[str, Any] = {
            "id": pa.array(cols.get("id", [f"{split}-{i:04d}" for i in range(n)]), pa.string()),
            "split": pa.array([split] * n, pa.string()),
            "label": pa.array(label, pa.int64()),
            "target_label": pa.array(target, pa.int64()),
            "pred": pa.array(pred, pa.int64()),
            "correct": pa.array(np.where(label >= 0, pred == label, False), mask=label < 0),
        }
        for k in keys:
            out[f"vog_{k}"] = pa.array(np.asarray(cols[f"vog_{k}"], np.float64))
        for s in SIGNAL_NAMES:
            v = np.asarray(cols.get(f"sig_{s}", np.zeros((n, K))))
            typ = pa.int64() if s == "pred" else pa.int8() if s == "correct" else pa.float32()
            flat = pa.array(v.reshape(-1).astype(typ.to_pandas_dtype()), typ)
            out[f"sig_{s}"] = pa.FixedSizeListArray.from_arrays(flat, K)
        for name, v in cols.items():
            if name not in out and not name.startswith(("vog_", "sig_")) and name not in (
                    "label", "pred", "target_label", "id"):
                out[name] = pa.array(v)
        parts.append(pa.table(out))
    return pa.concat_tables(parts, promote_options="default")


def synthetic_run(root: str, split_rows: dict[str, dict[str, Any]], *, K: int = 3,
                  windows: dict[str, list[int]] | None = None, targets: Sequence[str] = ("logit",),
                  label_mode: str = "true", report: dict | None = None,
                  class_names: Sequence[str] | None = None, run_id: str = "run1",
                  published: bool = True, storage=None,
                  split_specs: dict[str, dict] | None = None, normalize_against: str | None = None) -> str:
    """Publish a run from hand-given columns (see :func:`synthetic_table`); z and ranks are
    computed as the pipeline does. ``split_specs`` adds keys to ``data.splits.<name>``."""
    windows = windows or {"late": list(range(max(0, K - 3), K))}
    keys = [f"{w}_{t}" for w in windows for t in targets]
    primary = keys[0]
    table, classes = finish_table(synthetic_table(split_rows, K, keys), keys, primary,
                                  normalize_against=normalize_against)
    specs = {s: {"format": "npz", "url": f"{root}/data/{s}.npz", **(split_specs or {}).get(s, {})}
             for s in split_rows}
    cfg = _base_config(root, specs, {w: list(v) for w, v in windows.items()}, targets, label_mode,
                       report, class_names)
    if normalize_against:
        cfg["vog"]["normalize_against"] = normalize_against
    return write_run(root, table, classes, config=cfg, windows=windows, targets=targets,
                     primary=primary, label_mode=label_mode, num_checkpoints=K, run_id=run_id,
                     published=published, storage=storage, normalize_against=normalize_against)


def fake_readers() -> types.ModuleType:
    """A stand-in for ``vog_ray.data.fetch`` that serves tiles from the npz files written here."""
    mod = types.ModuleType("vog_ray.data.fetch")
    calls: list[tuple[str, list[str]]] = []

    def fetch_images(spec, ids, storage=None):
        url = spec.url if isinstance(spec.url, str) else spec.url[0]
        calls.append((url, list(ids)))
        with np.load(url) as z:
            pos = {str(i): k for k, i in enumerate(z["id"])}
            imgs = z["image"]
            return {i: imgs[pos[i]] for i in ids if i in pos}

    mod.fetch_images = fetch_images
    mod.calls = calls
    return mod
