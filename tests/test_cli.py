"""``vog-ray`` as a user runs it: the venv's console script in a subprocess (it starts its own
local Ray), on local Parquet data, local checkpoints and a local output directory; error exits
(2 = bad config, 1 = a runtime error such as a missing checkpoint); ``vog-ray validate``; and the
example configs in ``configs/``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from vog_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
MODEL = {"name": "small_cnn", "size": 8, "width": 8, "num_classes": 10}
N_TRAIN, N_TEST, K = 120, 80, 4


def _vog_ray() -> list[str]:
    exe = Path(sys.executable).parent / "vog-ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vog_ray.cli"]


def _run(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the CLI starts its own Ray
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return subprocess.run([*_vog_ray(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Local digits Parquet (train/test), K checkpoints of a briefly trained model, a config."""
    from sklearn.datasets import load_digits

    from vog_ray.testing.writers import write_parquet_split
    from vog_ray.train import train

    root = tmp_path_factory.mktemp("cli")
    d = load_digits()
    imgs = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
    y = d.target.astype(np.int64)
    write_parquet_split(str(root / "data" / "train"), imgs[:N_TRAIN], y[:N_TRAIN], rows_per_file=60)
    write_parquet_split(str(root / "data" / "test"), imgs[1500:1500 + N_TEST], y[1500:1500 + N_TEST])
    x = imgs[:400, None].astype(np.float32) / np.float32(255)
    res = train(x, y[:400], model=MODEL, out_url=str(root / "ckpt"), epochs=K, batch_size=64, lr=3e-3)
    cfg = {
        "name": "cli-digits",
        "data": {"splits": {"train": {"format": "parquet", "url": str(root / "data" / "train")},
                            "test": {"format": "parquet", "url": str(root / "data" / "test")}}},
        "model": MODEL,
        "checkpoints": str(root / "ckpt" / "epoch_*.pt"),
        "vog": {"windows": {"early": "first:3", "late": "last:3", "all": "all"}, "targets": ["logit", "softmax"]},
        "compute": {"device": "cpu", "batch_size": 32, "cpus_per_actor": 0.5},  # 2 CPUs: reads need 1
        "output": {"url": str(root / "out")},
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"root": root, "config": path, "cfg": cfg, "checkpoints": res.checkpoints}


def _write(project, name: str, cfg: dict) -> Path:
    p = project["root"] / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.mark.slow
@pytest.mark.integration
def test_audit_prints_run_rows_throughput_and_top_ids(project):
    from vog_ray.runs import list_runs, open_run

    r = _run("audit", str(project["config"]), "--set", "compute.batch_size=64", "--no-report",
             cwd=project["root"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    m = re.search(r"^run: (\S+)$", out, re.M)
    assert m, out
    run_url = m.group(1)
    assert Path(run_url, "_SUCCESS").is_file()
    assert list_runs(str(project["root"] / "out")) == [Path(run_url).name]
    assert f"rows: {N_TRAIN + N_TEST} in = {N_TRAIN + N_TEST} scored + 0 rejected" in out
    tp = re.search(r"throughput: ([0-9.]+) examples/s", out)
    assert tp and float(tp.group(1)) > 0, out
    run = open_run(run_url)
    assert run.manifest["config"]["compute"]["batch_size"] == 64          # --set applied
    assert run.manifest["rows"]["scored"] == N_TRAIN + N_TEST
    scores = run.scores(columns=["id", "split", "rank"]).to_pylist()
    for split in ("train", "test"):
        line = re.search(rf"^highest VoG in {split}: (.+)$", out, re.M)
        assert line, out
        printed = [s.strip() for s in line.group(1).split(",")]
        expected = [row["id"] for row in sorted((row for row in scores if row["split"] == split),
                                                key=lambda row: row["rank"])[:10]]
        assert printed == expected and len(printed) == 10
    assert "report:" not in out                                             # --no-report
    # 1 single-threaded actor on the 2-CPU local Ray: the log says how to use both cores
    assert "cores stay idle" in r.stderr and "compute.actors: {min: 2, max: 2}" in r.stderr, r.stderr[-3000:]


def test_unknown_key_exits_2_naming_key_and_file(project):
    cfg = json.loads(json.dumps(project["cfg"]))
    cfg["compute"]["batchsize"] = 64
    bad = _write(project, "unknown_key.yaml", cfg)
    r = _run("audit", str(bad), cwd=project["root"])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "compute.batchsize" in r.stderr and "unknown key" in r.stderr
    assert str(bad) in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_key_in_override_and_wrong_type_exit_2(project):
    cfg = str(project["config"])
    r = _run("audit", cfg, "--set", "compute.batch_size=lots", cwd=project["root"])
    assert r.returncode == 2, r.stderr
    assert "compute.batch_size" in r.stderr and cfg in r.stderr
    assert "integer" in r.stderr
    r = _run("validate", cfg, "--set", "vog.window.late=last:3", cwd=project["root"])
    assert r.returncode == 2, r.stderr
    assert "vog.window" in r.stderr and "unknown key" in r.stderr and cfg in r.stderr


def test_missing_checkpoint_exits_1_naming_the_url(project):
    missing = str(project["root"] / "ckpt" / "epoch_99.pt")
    cfg = json.loads(json.dumps(project["cfg"]))
    cfg["checkpoints"] = [*project["checkpoints"][:3], missing]
    p = _write(project, "missing_ckpt.yaml", cfg)
    r = _run("audit", str(p), cwd=project["root"], timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr[-2000:])
    assert missing in r.stderr
    assert "Traceback" not in r.stderr
    glob = str(project["root"] / "nowhere" / "*.pt")
    r = _run("audit", str(project["config"]), "--set", f"checkpoints={glob}", cwd=project["root"], timeout=300)
    assert r.returncode == 1 and glob in r.stderr, r.stderr[-2000:]


def test_validate_prints_the_config_with_defaults(project):
    r = _run("validate", str(project["config"]), "--set", "compute.batch_size=7", "--set", "vog.label=predicted",
             cwd=project["root"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["compute"]["batch_size"] == 7 and d["vog"]["label"] == "predicted"
    assert d["vog"]["normalization"] == "zscore" and d["compute"]["checkpoint_groups"] == 1   # defaults
    assert d["report"]["enabled"] is True
    assert d["model"] == MODEL


# ---------------------------------------------------------------------------------------------
# configs/: the example audits


EXAMPLES = ["mnist_parquet.yaml", "cifar10_s3.yaml", "imagenet_folder.yaml"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_validates_and_every_key_is_commented(name):
    path = CONFIGS / name
    cfg = load_config(path)
    assert cfg.to_dict()["output"]["url"]
    for i, line in enumerate(path.read_text().splitlines(), 1):
        body = line.split("#", 1)[0]
        if re.match(r"^\s*(- )?[A-Za-z_][A-Za-z0-9_]*\s*:", body):
            assert "#" in line, f"{name}:{i}: key without a comment: {line.strip()}"


def test_example_configs_say_what_they_promise():
    mnist = load_config(CONFIGS / "mnist_parquet.yaml")
    assert {s.format for s in mnist.data.splits.values()} == {"parquet"}
    assert all("://" not in str(s.url) for s in mnist.data.splits.values())    # local
    assert mnist.model == "lenet"
    assert mnist.vog.windows == {"early": "first:3", "late": "last:3", "all": "all"}
    assert mnist.vog.targets == ["logit", "softmax"]

    cifar = load_config(CONFIGS / "cifar10_s3.yaml")
    assert {s.format for s in cifar.data.splits.values()} == {"cifar"}
    assert all(str(s.url).startswith("s3://") for s in cifar.data.splits.values())
    assert cifar.storage.endpoint_url and cifar.model == "resnet18_cifar"
    assert cifar.compute.device == "cuda" and cifar.compute.gpus_per_actor >= 1
    assert cifar.compute.checkpoint_groups > 1 and cifar.compute.actors.max > 1
    text = (CONFIGS / "cifar10_s3.yaml").read_text().lower()
    assert "aws_secret_access_key:" not in text and "secret:" not in text    # no credentials in configs

    imnet = load_config(CONFIGS / "imagenet_folder.yaml")
    assert [s.format for s in imnet.data.splits.values()] == ["image_folder"]
    assert imnet.model == "torchvision:resnet50"
    t = imnet.data.transform
    assert (t.resize, t.center_crop, t.channels) == (256, 224, 3)
    assert t.mean == [0.485, 0.456, 0.406] and t.std == [0.229, 0.224, 0.225]
    assert imnet.vog.label == "predicted"


def test_example_config_overrides_from_the_command_line():
    cfg = load_config(CONFIGS / "cifar10_s3.yaml", ["compute.checkpoint_groups=3", "vog.accum_dtype=float64"])
    assert cfg.compute.checkpoint_groups == 3 and cfg.vog.accum_dtype == "float64"


def test_errors_are_unwrapped_from_ray_and_keep_vog_rays_message():
    """``describe_error``: a Ray task's error is reported as the exception raised in the task; an
    error vog-ray raised from another (a checkpoint error from torch's) keeps vog-ray's message;
    config and checkpoint errors exit 2, the rest 1; KeyError's message is not quoted."""
    from ray.exceptions import RayTaskError

    from vog_ray.cli import describe_error
    from vog_ray.config import ConfigError
    from vog_ray.models.checkpoints import CheckpointError

    inner = TypeError("part-0.parquet: label column 'label' holds non-integer values")
    wrapped = RayTaskError("read", "Traceback (most recent call last):\n  ...", inner).as_instanceof_cause()
    assert describe_error(wrapped) == (1, "part-0.parquet: label column 'label' holds non-integer values")
    try:
        try:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        except RuntimeError as torch_error:
            raise CheckpointError("checkpoint 'c/epoch_2.pt' is truncated or corrupt") from torch_error
    except CheckpointError as e:
        assert describe_error(e) == (2, "checkpoint 'c/epoch_2.pt' is truncated or corrupt")
    assert describe_error(ConfigError("invalid config a.yaml:\n  vog.windows: x"))[0] == 2
    assert describe_error(KeyError("part-1.parquet: no column 'label'")) == (1, "part-1.parquet: no column 'label'")
    assert describe_error(AssertionError()) == (1, "AssertionError")


def test_debug_prints_the_traceback_with_the_error_line(tmp_path, capsys):
    from vog_ray.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"splits": {"t": {"format": "npz", "url": str(tmp_path / "no.npz")}}},
                                    "model": "lenet", "checkpoints": str(tmp_path / "none_*.pt"),
                                    "output": {"url": str(tmp_path / "out")}}))
    assert main(["audit", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no file matches") and "Traceback" not in err, err
    assert main(["--debug", "audit", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "\nerror: no file matches" in err, err
