"""Shared, generic test fixtures for vog-ray (keep minimal; add fixtures as needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo beside shared/ (the design notes and reference data live there)
SHARED_DIR = REPO_ROOT.parent / "shared"
REFERENCE_DIR = SHARED_DIR / "reference"


@pytest.fixture
def reference_dir() -> Path:
    """``shared/reference`` beside the clone; a missing directory fails (never skips)."""
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference data directory missing: {REFERENCE_DIR} "
                    "(the repo must be cloned beside shared/)")
    return REFERENCE_DIR


@pytest.fixture
def save_checkpoints(tmp_path):
    """``save(state_dicts, name="ckpt", subdir="ckpts") -> glob`` writing ``<name>_<i>.pt``."""

    def save(state_dicts, name: str = "ckpt", subdir: str = "ckpts") -> str:
        d = tmp_path / subdir
        d.mkdir(parents=True, exist_ok=True)
        for i, sd in enumerate(state_dicts):
            torch.save({k: v.detach().clone() for k, v in sd.items()}, d / f"{name}_{i}.pt")
        return str(d / f"{name}_*.pt")

    return save


# ---- S3 on loopback (moto's server; see tests/s3.py) ----------------------------------------


@pytest.fixture
def s3_server():
    """A real S3 endpoint on 127.0.0.1 with a fresh bucket: ``.endpoint .bucket .storage .url(path)``."""
    from tests.s3 import s3_endpoint

    with s3_endpoint() as srv:
        yield srv


@pytest.fixture(scope="module")
def s3_server_module():
    """Like ``s3_server``, shared by the tests of one module (write test data once)."""
    from tests.s3 import s3_endpoint

    with s3_endpoint() as srv:
        yield srv


# ---- digits + checkpoints of a real training on the S3 endpoint (incremental / multi-node) ---

DIGITS_MODEL = {"name": "small_cnn", "size": 8, "width": 8, "num_classes": 10}


@pytest.fixture(scope="module")
def digits_s3(request, s3_server_module):
    """scikit-learn's 8×8 digits as PNG-in-Parquet splits ``data/train`` and ``data/test`` and the
    per-epoch checkpoints (``src/epoch_<n>.pt``) of a real short training of ``DIGITS_MODEL``,
    all on the module's S3 endpoint. A test module may set ``DIGITS = {"n_train": …,
    "n_test": …, "epochs": …}``. Returns ``{"checkpoints": [urls], "model", "n_train", "n_test",
    "x_train", "y_train"}``."""
    import numpy as np
    from sklearn.datasets import load_digits

    from vog_ray.testing.writers import write_parquet_split
    from vog_ray.train import train

    opts = {"n_train": 240, "n_test": 80, "epochs": 3, **getattr(request.module, "DIGITS", {})}
    s3 = s3_server_module
    d = load_digits()
    img = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:opts["n_train"]], perm[opts["n_train"]:opts["n_train"] + opts["n_test"]]
    write_parquet_split(s3.url("data/train"), img[tr], y[tr], storage=s3.storage)
    write_parquet_split(s3.url("data/test"), img[te], y[te], storage=s3.storage)
    x = (img[tr].astype(np.float32) / 255.0)[:, None]  # what decode makes of the PNGs (scale 1/255)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(x, y[tr], model=DIGITS_MODEL, out_url=s3.url("src"), epochs=opts["epochs"], batch_size=32,
                    lr=3e-3, storage=s3.storage, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert len(res.checkpoints) == opts["epochs"]
    return {"checkpoints": res.checkpoints, "model": dict(DIGITS_MODEL), "n_train": len(tr), "n_test": len(te),
            "x_train": x, "y_train": y[tr]}


# ---- tiny digits audits: fault injection, bad input, security (tests/test_faults.py …) -------


class TinyDigits:
    """sklearn's 8×8 digits (uint8, 0..255) and K = 3 checkpoints of a tiny ``small_cnn``
    trained on the first 600 of them (local files). ``config(...)`` builds an audit config dict."""

    MODEL = {"name": "small_cnn", "size": 8, "width": 4, "num_classes": 10}

    def __init__(self, root):
        import numpy as np
        from sklearn.datasets import load_digits

        from vog_ray.train import train

        d = load_digits()
        self.root = root
        self.imgs = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
        self.labels = d.target.astype(np.int64)
        self.ckpt_dir = str(root / "ckpts")
        x = self.imgs[:600, None].astype(np.float32) / np.float32(255)
        res = train(x, self.labels[:600], model=self.MODEL, out_url=self.ckpt_dir, epochs=3, batch_size=64,
                    lr=3e-3)
        assert len(res.checkpoints) == 3
        self.ckpt_glob = self.ckpt_dir + "/epoch_*.pt"

    def upload_checkpoints(self, url: str, storage) -> str:
        """Copy the checkpoints to ``url`` (e.g. S3); returns the glob there."""
        import glob
        import os

        from vog_ray.storage import join, resolve

        for p in sorted(glob.glob(self.ckpt_glob)):
            fs, path = resolve(join(url, os.path.basename(p)), storage)
            with fs.open(path, "wb") as f, open(p, "rb") as src:
                f.write(src.read())
        return join(url, "epoch_*.pt")

    def config(self, splits: dict, out_url: str, *, checkpoints: str | None = None, **sections) -> dict:
        """An audit config: tiny batches (many blocks), CPU, no report unless asked."""
        cfg = {
            "name": "tiny-digits",
            "data": {"splits": splits},
            "model": dict(self.MODEL),
            "checkpoints": checkpoints or self.ckpt_glob,
            "compute": {"device": "cpu", "batch_size": 16, "decode_batch_size": 16},
            "output": {"url": out_url},
            "report": {"enabled": False},
        }
        for k, v in sections.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        return cfg


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> TinyDigits:
    """Digits + 3 checkpoints of a tiny CNN, made once per session (a few seconds)."""
    return TinyDigits(tmp_path_factory.mktemp("tiny-digits"))


def start_test_ray(env_vars: dict | None = None) -> dict:
    """(Re)start a local 2-CPU Ray whose workers get ``env_vars`` (start S3 servers first).

    Returns the env vars given to the workers, with a unique ``VOG_TEST_RAY_MARKER`` among them:
    a process carrying it in its environment belongs to this test's Ray, and to nothing else."""
    import os
    import uuid

    import ray
    import ray.data

    if ray.is_initialized():  # another module's Ray: its workers lack our env
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {**(env_vars or {}), "VOG_RAY_TORCH_THREADS": "1", "VOG_TEST_RAY_MARKER": uuid.uuid4().hex}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.use_datasource_v2 = os.environ.get("VOG_TEST_DATASOURCE_V2", "0") == "1"  # V1: faster reads
    return env


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of the live processes whose environment holds ``name=value`` (Linux /proc)."""
    import os

    needle = f"{name}={value}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie: dead, waiting to be reaped
        except OSError:
            continue
        if needle in env:
            out.append(int(pid))
    return out


# ---- a small real run for the explorer (tests/explore; see tests/explorerun.py) ------------


@pytest.fixture(scope="session")
def explore_run(tiny_digits, tmp_path_factory):
    """A Ray audit of the tiny digits with hostile strings, flags and a rejected row."""
    from tests.explorerun import build

    return build(tiny_digits, tmp_path_factory.mktemp("explore-run"))
