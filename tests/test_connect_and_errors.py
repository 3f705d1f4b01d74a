"""Errors as the README promises, before any Ray work (the CLI in a subprocess, as a user runs it):

* Ray Client (``ray://``) and dashboard (``http://``) addresses are refused up front, exit 2, with
  the supported forms named — given as ``--address`` or ``RAY_ADDRESS``;
* the rules of incremental audits are config errors: exit 2 naming the file and the key;
* runtime errors name the config key: a checkpoint glob that matches nothing (``checkpoints``), a
  split that does not exist (``data.splits.<name>``);
* ``vog-ray validate --check-io`` lists the checkpoints (in order) and the input files, checks the
  output is writable — and imports no Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env_extra: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "vog_ray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def project(tiny_digits, tmp_path_factory):
    from vog_ray.testing.writers import write_parquet_split

    root = tmp_path_factory.mktemp("errors")
    write_parquet_split(str(root / "data"), tiny_digits.imgs[:30], tiny_digits.labels[:30], rows_per_file=10)
    cfg = tiny_digits.config({"train": {"format": "parquet", "url": str(root / "data")}}, str(root / "out"),
                             vog={"windows": {"all": "all", "early": "first:2"}})

    def write(name: str, **changes) -> Path:
        d = json.loads(json.dumps(cfg))
        for key, value in changes.items():
            section, _, sub = key.partition("__")
            if sub:
                d[section][sub] = value
            else:
                d[section] = value
        p = root / name
        p.write_text(yaml.safe_dump(d))
        return p

    return {"root": root, "write": write, "config": write("ok.yaml")}


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
@pytest.mark.parametrize("address, says", [("ray://127.0.0.1:10001", "Ray Client (ray://) cannot run an audit"),
                                           ("http://127.0.0.1:8265", "is a dashboard address")])
def test_unsupported_addresses_are_refused_up_front(project, how, address, says):
    args = ["audit", str(project["config"])] + (["--address", address] if how == "--address" else [])
    p = _cli(*args, env_extra={"RAY_ADDRESS": address} if how == "RAY_ADDRESS" else None)
    assert p.returncode == 2, p.stderr[-2000:]
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"error: {how} {address!r}") and says in line
    for form in ("no address", "HOST:PORT", "ray job submit"):
        assert form in line


@pytest.mark.parametrize("change, key", [({"vog__label": "predicted"}, "vog.label"),
                                         ({"vog__windows": {"late": "last:2"}}, "vog.windows")])
def test_incremental_rules_are_config_errors_naming_file_and_key(project, change, key):
    path = project["write"](f"inc-{key}.yaml", **change)
    p = _cli("audit", "--incremental", str(path))
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"error: invalid config {path} for an incremental audit:" in p.stderr
    assert f"\n  {key}: incremental audits" in p.stderr
    assert not (project["root"] / "out" / "_incremental").exists()


def test_runtime_errors_name_the_config_key(project):
    missing = str(project["root"] / "nowhere" / "epoch_*.pt")
    p = _cli("audit", str(project["write"]("nockpt.yaml", checkpoints=missing)))
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == f"error: checkpoints: no file matches {missing!r}"
    data = str(project["root"] / "nodata")
    p = _cli("audit", str(project["write"]("nodata.yaml", data={"splits": {"train": {"format": "parquet",
                                                                                       "url": data}}})))
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == f"error: data.splits.train.url: no such file: {data!r}"


def test_validate_check_io_lists_inputs_and_checks_the_output_without_ray(project, tiny_digits):
    import glob

    code = ("import sys\nfrom vog_ray.cli import main\nrc = main(sys.argv[1:])\n"
            "print('ray imported:', 'ray' in sys.modules)\nsys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def check_io(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, "validate", "--check-io", str(path)], env=env,
                              capture_output=True, text=True, timeout=120)

    p = check_io(project["config"])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    ckpts = sorted(glob.glob(tiny_digits.ckpt_glob))
    i = lines.index(f"checkpoints: {len(ckpts)} (in this order)")
    assert [ln.split()[0] for ln in lines[i + 1:i + 1 + len(ckpts)]] == ckpts
    data = project["root"] / "data"
    j = lines.index("data.splits.train: 3 file(s), "
                    f"{sum(f.stat().st_size for f in data.iterdir()) / 1e6:.1f} MB, 30 rows")
    assert lines[j + 1:j + 4] == [f"  {data}/part-0000{k}.parquet" for k in range(3)]
    assert lines[-2:] == [f"output.url: {project['root'] / 'out'} is writable", "ray imported: False"]
    assert not (project["root"] / "out" / "_work").exists()   # the probe leaves nothing behind
    # an output that cannot be written: a file where the output directory should be
    blocker = project["root"] / "blocked"
    blocker.write_text("a file, not a directory")
    p = check_io(project["write"]("blocked.yaml", output={"url": str(blocker / "out")}))
    assert p.returncode == 1 and f"error: output.url {str(blocker / 'out')!r} cannot be written" in p.stderr
    # a glob that matches nothing, named by its key
    p = check_io(project["write"]("noglob.yaml", checkpoints=str(project["root"] / "none-*.pt")))
    assert p.returncode == 1 and "error: checkpoints: no file matches" in p.stderr
    assert p.stdout.splitlines()[-1] == "ray imported: False"


def test_where_an_audit_connects(monkeypatch, tmp_path, caplog):
    """The connection forms of the README's table, down to the ``ray.init`` call each makes (the
    README test runs them against a real two-node cluster)."""
    import logging

    import ray

    from vog_ray.distributed import cluster

    # the cluster `ray start` runs here is found where Ray's own ray.init() looks: its temp dir
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert cluster.running_local_cluster() is None
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379")
    assert cluster.running_local_cluster() == "10.1.2.3:6379"

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="vog_ray"):
        cluster.ensure_ray(None)                    # no address, a cluster here: joined, no resource numbers
    assert calls[-1]["address"] is None and "num_cpus" not in calls[-1]
    assert "using the Ray cluster that `ray start` runs on this machine (10.1.2.3:6379)" in caplog.text
    cluster.ensure_ray("local")                     # always a fresh local Ray
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] >= 2
    cluster.ensure_ray("10.9.9.9:6379")             # --address HOST:PORT
    assert calls[-1]["address"] == "10.9.9.9:6379" and "num_cpus" not in calls[-1]
    monkeypatch.setenv("RAY_ADDRESS", "10.8.8.8:6379")
    cluster.ensure_ray(None)                        # RAY_ADDRESS
    assert calls[-1]["address"] == "10.8.8.8:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    cluster.ensure_ray(None)                        # nothing running here: a local Ray
    assert calls[-1]["address"] is None and calls[-1]["num_cpus"] >= 2
