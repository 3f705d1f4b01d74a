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
def project(tmp_path_factory, digits_checkpoints):
    """Local digits Parquet (train/test), the K shared checkpoints (conftest), a config."""
    from tests.digits import digit_images
    from vog_ray.testing.writers import write_parquet_split

    root = tmp_path_factory.mktemp("cli")
    imgs, y = digit_images()
    write_parquet_split(str(root / "data" / "train"), imgs[:N_TRAIN], y[:N_TRAIN], rows_per_file=60)
    write_parquet_split(str(root / "data" / "test"), imgs[1500:1500 + N_TEST], y[1500:1500 + N_TEST])
    assert digits_checkpoints.model == MODEL and len(digits_checkpoints.paths) == K
    cfg = {
        "name": "cli-digits",
        "data": {"splits": {"train": {"format": "parquet", "url": str(root / "data" / "train")},
                            "test": {"format": "parquet", "url": str(root / "data" / "test")}}},
        "model": MODEL,
        "checkpoints": digits_checkpoints.glob,
        "vog": {"windows": {"early": "first:3", "late": "last:3", "all": "all"}, "targets": ["logit", "softmax"]},
        "compute": {"device": "cpu", "batch_size": 32, "cpus_per_actor": 0.5},  # 2 CPUs: reads need 1
        "output": {"url": str(root / "out")},
    }
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"root": root, "config": path, "cfg": cfg, "checkpoints": list(digits_checkpoints.paths)}


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


@pytest.mark.slow
@pytest.mark.integration
def test_incremental_audit_respects_report_enabled_false(project):
    """``audit --incremental`` with ``report.enabled: false`` publishes the run and builds no report."""
    from vog_ray.runs import open_run

    out = project["root"] / "out-incremental"
    r = _run("audit", str(project["config"]), "--incremental", "--set", "report.enabled=false",
             "--set", "vog.windows={early: 'first:3', all: all}", "--set", f"output.url={out}",
             cwd=project["root"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = open_run(str(out))
    assert run.manifest["mode"] == "incremental" and (out / "_incremental" / "state.json").is_file()
    assert not any(Path(run.url).glob("report*")), sorted(p.name for p in Path(run.url).iterdir())
    assert "report:" not in r.stdout


def _parquet_split(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path / "part-0.parquet")
    return path / "part-0.parquet"


def test_reader_key_and_type_errors_exit_2_with_one_line_naming_file_and_column(project):
    """A split whose files lack the label or image column, or hold string labels: found while
    planning (before Ray starts), one error naming the config key, the file and the column, exit 2."""
    import pyarrow.parquet as pq

    good = pq.read_table(project["root"] / "data" / "test")
    images, labels = good["image"], good["label"]
    cases = {
        "no_label": ({"image": images}, "has no column 'label'"),
        "no_image": ({"pixels": images, "label": labels}, "has no column 'image'"),
        "string_labels": ({"image": images, "label": labels.cast("string")},
                          "labels must be integers"),
    }
    for name, (columns, expected) in cases.items():
        f = _parquet_split(project["root"] / "bad" / name, columns)
        cfg = json.loads(json.dumps(project["cfg"]))
        cfg["data"]["splits"]["test"]["url"] = str(f.parent)
        r = _run("audit", str(_write(project, f"{name}.yaml", cfg)), cwd=project["root"], timeout=300)
        assert r.returncode == 2, (name, r.stderr[-2000:])
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        # one error (an invalid-config error: its first line names the config file, the next the
        # key, the data file and the column)
        assert len(errors) == 1 and expected in r.stderr and str(f) in r.stderr, (name, r.stderr[-2000:])
        assert f"data.splits.test.{'image' if name == 'no_image' else 'label'}_column" in r.stderr, name
        assert "Traceback" not in r.stderr, name
        # refused while planning: no scoring started (no CPU-layout hint, no Ray Data execution)
        assert "cores stay idle" not in r.stderr and "Starting execution" not in r.stderr, name


def test_reader_error_raised_in_a_ray_task_is_one_line(monkeypatch, capsys):
    """The same errors raised inside a Ray read task reach the driver wrapped by Ray (with Ray
    Data's retry hints appended): still one ``error:`` line, exit 2; ``--debug`` adds the traceback."""
    from ray.exceptions import RayTaskError

    from vog_ray import cli
    from vog_ray.config import DataError

    msg = "part-3.parquet (/data/train/part-3.parquet): no column 'label'; columns are ['image']"
    for cause in (DataError(msg + "\nFailed to apply UDF transform after 1/1 attempts"),
                  DataError("part-3.parquet: label column 'label' must be integer, got string")):
        wrapped = RayTaskError("ReadParquet", "Traceback (most recent call last): ...", cause).as_instanceof_cause()

        def dispatch(args, e=wrapped):
            raise e

        monkeypatch.setattr(cli, "_dispatch", dispatch)
        assert cli.main(["validate", "x.yaml"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {str(cause.args[0]).splitlines()[0]}"], err
        assert cli.main(["--debug", "validate", "x.yaml"]) == 2
        assert "Traceback" in capsys.readouterr().err


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


def test_normalize_against_an_unknown_split_exits_2_naming_the_key(project):
    cfg = str(project["config"])
    r = _run("audit", cfg, "--set", "vog.normalize_against=ood", cwd=project["root"])
    assert r.returncode == 2, r.stderr
    assert "vog.normalize_against: 'ood' is not a split of data.splits (splits: ['test', 'train'])" in r.stderr
    assert cfg in r.stderr and "Traceback" not in r.stderr
    r = _run("validate", cfg, "--set", "vog.normalize_against=train", "--set", "vog.normalization=none",
             cwd=project["root"])
    assert r.returncode == 2 and "vog.normalize_against needs vog.normalization" in r.stderr, r.stderr
    r = _run("validate", cfg, "--set", "vog.normalize_against=train", cwd=project["root"])
    assert r.returncode == 0 and json.loads(r.stdout)["vog"]["normalize_against"] == "train", r.stderr


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
    assert err.startswith("error: checkpoints: no file matches") and "Traceback" not in err, err
    assert main(["--debug", "audit", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "\nerror: checkpoints: no file matches" in err, err
