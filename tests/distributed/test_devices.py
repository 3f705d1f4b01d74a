"""Honest device accounting on a Ray that advertises a GPU torch cannot use: a local Ray started with
one fake GPU (``num_gpus=1``; this machine has no CUDA, so torch in the actors sees none).

* ``device: auto`` — the pool reserves the "GPU", each actor scores on the CPU; the manifest lists
  per actor the device, the GPU Ray reserved and the rows it scored, and warns (log and manifest);
* ``device: cuda`` — the audit fails (exit 1) with a message naming ``compute.device`` and the
  actor's missing CUDA, and publishes nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

# own_ray: a Ray with a fake GPU (runs after the modules on the shared Ray)
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600), pytest.mark.own_ray]

REPO = Path(__file__).resolve().parents[2]
N = 48


@pytest.fixture(scope="module")
def fake_gpu_ray():
    import ray
    import ray.data

    assert not torch.cuda.is_available(), "this test needs a machine without CUDA (Ray's GPU is fake here)"
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"VOG_RAY_TORCH_THREADS": "1", "VOG_TEST_RAY_MARKER": uuid.uuid4().hex}
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def split(tiny_digits, tmp_path_factory):
    from vog_ray.testing.writers import write_parquet_split

    root = tmp_path_factory.mktemp("devices")
    write_parquet_split(str(root / "data"), tiny_digits.imgs[:N], tiny_digits.labels[:N], rows_per_file=16)
    return {"train": {"format": "parquet", "url": str(root / "data")}}, root


def test_auto_on_a_gpu_torch_cannot_use_scores_on_cpu_and_says_so(fake_gpu_ray, split, tiny_digits, caplog):
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit
    from vog_ray.runs import open_run

    splits, root = split
    cfg = tiny_digits.config(splits, str(root / "auto"), compute={
        "device": "auto", "gpus_per_actor": 1, "cpus_per_actor": 0.5, "actors": {"min": 1, "max": 1}})
    with caplog.at_level(logging.WARNING, logger="vog_ray"):
        res = run_audit(validate(cfg), report=False)
    m = open_run(res.run_url).manifest
    assert m["scorers"] == res.manifest["scorers"]
    (actor,) = m["scorers"]
    assert actor["device"] == "cpu" and actor["gpu_name"] is None
    assert actor["gpus_reserved"] == ["0"]           # Ray gave it the fake GPU …
    # … and it scored every row on the CPU, in calls of compute.batches_per_call engine batches (a
    # GPU actor's default)
    per_call = validate(cfg).compute.calls_of(1)
    assert actor["rows"] == N and actor["batches"] == -(-N // (16 * per_call))
    assert actor["torch"] == torch.__version__
    assert m["devices"] == {"cpu": N}
    (warning,) = m["warnings"]
    assert "1 of 1 scorer actor(s) reserved GPUs (compute.gpus_per_actor = 1) but scored on the CPU" in warning
    assert warning in caplog.text and f"warning: {warning}" in res.summary()


def test_cuda_without_cuda_in_the_actor_exits_1_naming_compute_device(fake_gpu_ray, split, tiny_digits):
    splits, root = split
    out = root / "cuda"
    cfg = tiny_digits.config(splits, str(out), compute={
        "device": "cuda", "gpus_per_actor": 1, "cpus_per_actor": 0.5, "actors": {"min": 1, "max": 1}})
    path = root / "cuda.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    p = subprocess.run([sys.executable, "-m", "vog_ray.cli", "audit", str(path), "--address", fake_gpu_ray],
                       env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-4000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: compute.device is 'cuda' but the scorer actor on node"), p.stderr[-4000:]
    assert "has no usable CUDA" in last and "Ray reserved GPU(s) ['0']" in last
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("error:")] == [last]  # one error line
    assert not (out / "runs").exists() and not (out / "LATEST").exists()
