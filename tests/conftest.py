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
