"""The README's commands, run as written (a README edit that breaks a command breaks a test).

Each test extracts a ``bash`` block of README.md and runs its lines, in a fresh checkout as a new
user has it after ``make demo`` — the repository's files, ``.venv`` (the venv running these
tests) and ``demo-output/audit.yaml`` (here a small config over sklearn's 8×8 digits with
absolute paths, as the demo writes it, instead of the demo's 8,000 MNIST rows) — and a shell in
which no venv is activated: ``PATH`` without the venv, its own ``HOME`` (Ray's token goes to
``$HOME/.ray``) and its own Ray temp dir (``RAY_TMPDIR``: no other Ray on this machine is found
or disturbed). What the block leaves to the environment, the test sets: ``RAY_PORT`` and
``DASHBOARD_PORT`` (free ports), ``RUN_A``/``RUN_B`` (the two runs' URLs).

* "Auditing your own data": validate --check-io, two audits on a local Ray, runs, verify,
  report, compare;
* "A local multi-node cluster": two ``ray start`` nodes with token authentication, the audit
  submitted as a Ray job (it must succeed with scorer actors on both nodes scoring rows), then the
  same config through ``--address``, ``RAY_ADDRESS`` and no address; every run equal. The
  block's ``ray stop`` (which ends every Ray of the user on the machine) is replaced by a kill of
  this test's own processes, found by a marker in their environment.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.rayenv import processes_with_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
N_ROWS, ROWS_PER_FILE = 96, 12          # 8 files: 8 read blocks for 2 actors
COPIED = ["vog_ray", "jobs", "configs", "tests", "cluster", "pyproject.toml", "README.md", "Makefile",
          "constraints.txt", ".gitignore"]
MARKER = "VOG_TEST_README_MARKER"


def readme_block(heading: str) -> list[str]:
    """The non-empty lines of the first ``bash`` block after ``heading`` in README.md."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    m = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert m, f"no bash block after {heading!r}"
    return [ln for ln in m.group(1).splitlines() if ln.strip()]


def _free_port(lo: int, hi: int) -> int:
    """A free TCP port in [lo, hi) (this machine's share of ports for these tests)."""
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}..{hi}")


def make_checkout(root: Path, tiny_digits) -> Path:
    """The repository's files, ``.venv``, and a small ``demo-output/audit.yaml`` with its data."""
    from vog_ray.testing.writers import write_parquet_split

    root.mkdir(parents=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, root / name)
    (root / ".venv").symlink_to(VENV)
    store = root / "demo-output" / "store"
    write_parquet_split(str(store / "data" / "train"), tiny_digits.imgs[:N_ROWS], tiny_digits.labels[:N_ROWS],
                        rows_per_file=ROWS_PER_FILE)
    (store / "checkpoints").mkdir(parents=True)
    for p in sorted(glob.glob(tiny_digits.ckpt_glob)):
        shutil.copy2(p, store / "checkpoints" / Path(p).name)
    cfg = {
        "name": "readme-test",
        "data": {"splits": {"train": {"format": "parquet", "url": str(store / "data" / "train")}}},
        # the tiny CNN's weights, with a forward that sleeps: both actors get blocks
        "model": {**tiny_digits.MODEL, "name": "tests.faultproxy:slow_small_cnn", "delay": 0.05},
        "checkpoints": str(store / "checkpoints" / "epoch_*.pt"),
        "vog": {"windows": {"early": "first:2", "all": "all"}},
        "compute": {"device": "cpu", "batch_size": 16, "decode_batch_size": 16, "read_blocks": 8,
                    "cpus_per_actor": 0.5, "threads_per_actor": 1,
                    "actors": {"min": 2, "max": 2, "tasks_in_flight": 1, "wait_for_min_s": 600}},
        "output": {"url": str(store / "audits" / "mnist")},
        "report": {"enabled": False, "bootstrap": 50},
    }
    (root / "demo-output" / "audit.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def user_shell(tmp: Path, marker: str) -> dict[str, str]:
    """A new user's shell: no venv on PATH, no Ray or AWS settings, its own HOME and Ray temp dir."""
    venv_bin = (VENV / "bin").resolve()
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if p and Path(p).resolve() != venv_bin]
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="vrm", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "VIRTUAL_ENV", "VOG_RAY_")) and k != "PYTHONHOME"}
    env.update(PATH=os.pathsep.join(path), HOME=str(home), RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0",
               # the venv's vog_ray may be installed from another checkout: import the one under test
               PYTHONPATH=str(REPO),
               # a worker that needs > 60 s to start on a loaded machine is otherwise killed and restarted
               RAY_worker_register_timeout_seconds="600", **{MARKER: marker})
    return env


def kill_marked(marker: str, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL, every process whose environment carries this test's marker."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with_env(MARKER, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while processes_with_env(MARKER, marker) and time.time() < deadline:
            time.sleep(0.5)
        if not processes_with_env(MARKER, marker):
            return
    assert not processes_with_env(MARKER, marker), "processes of the README test survived SIGKILL"


def run_url(output: str) -> str:
    m = re.findall(r"^run: (\S+)$", output, re.M)
    assert len(m) == 1, output[-3000:]
    return m[0]


def scores(url: str) -> dict[str, tuple]:
    from vog_ray.runs import open_run

    t = open_run(url).scores(columns=["id", "rank", "vog_all_logit", "z_early_logit"]).to_pylist()
    return {r["id"]: (r["rank"], r["vog_all_logit"], r["z_early_logit"]) for r in t}


def assert_same_scores(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == N_ROWS
    assert [a[i][0] for i in sorted(a)] == [b[i][0] for i in sorted(b)]
    np.testing.assert_allclose([a[i][1:] for i in sorted(a)], [b[i][1:] for i in sorted(b)], rtol=1e-6, atol=1e-9)


@pytest.mark.timeout(1800)
def test_auditing_your_own_data_block(tiny_digits, tmp_path):
    lines = readme_block("## Auditing your own data")
    assert lines[0].startswith("cp demo-output/audit.yaml my.yaml")
    root = make_checkout(tmp_path / "checkout", tiny_digits)
    marker = uuid.uuid4().hex
    env = user_shell(tmp_path, marker)
    out: list[str] = []
    runs: list[str] = []
    try:
        for line in lines:
            if "RUN_A" in line:
                line = line.replace("RUN_A", runs[0]).replace("RUN_B", runs[1])
            t0 = time.time()
            p = subprocess.run(["bash", "-c", line], cwd=root, env=env, capture_output=True, text=True, timeout=900)
            out.append(p.stdout)
            print(f"{time.time() - t0:6.1f} s  {line}")
            assert p.returncode == 0, f"{line}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
            if line.startswith(".venv/bin/vog-ray audit "):
                runs.append(run_url(p.stdout))
    finally:
        kill_marked(marker)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    _, validate, _, _, runs_out, verify_out, report_out, compare_out = out
    assert "ok: every invariant holds" in verify_out                                    # the latest run
    assert "checkpoints: 3 (in this order)" in validate and f"{N_ROWS} rows" in validate
    assert f"output.url: {root}/demo-output/store/audits/mnist is writable" in validate
    from vog_ray.runs import open_run

    assert runs_out.split() == sorted(Path(r).name for r in runs)
    second = open_run(runs[1]).manifest["config"]
    assert second["compute"]["batch_size"] == 512 and second["report"]["enabled"] is False   # the --set
    assert "report written" in report_out and Path(runs[1], "report.html").is_file()     # the latest run
    comparison = json.loads((root / "compare.json").read_text())
    spearman = re.findall(r'"spearman": ([0-9.]+)', json.dumps(comparison))
    assert spearman and all(float(s) == pytest.approx(1.0) for s in spearman), compare_out
    assert_same_scores(scores(runs[0]), scores(runs[1]))


@pytest.mark.timeout(3600)  # minutes on an idle 2-core machine; much longer when it is shared
def test_local_multi_node_cluster_block(tiny_digits, tmp_path):
    lines = readme_block("### A local multi-node cluster")
    assert lines[-1].startswith(".venv/bin/ray stop")
    root = make_checkout(tmp_path / "checkout", tiny_digits)
    marker = uuid.uuid4().hex
    env = user_shell(tmp_path, marker)
    env.update(RAY_PORT=str(_free_port(6500, 6600)), DASHBOARD_PORT=str(_free_port(8300, 8400)))
    script = ["set -euo pipefail"]
    for i, line in enumerate(lines):
        script.append(f"echo '@@@ {i}'")
        # ray stop ends every Ray of this user on the machine: the test kills only its own
        script.append(": ray stop is left to the test" if line.startswith(".venv/bin/ray stop") else line)
    log = tmp_path / "block.log"
    t0 = time.time()
    try:
        with open(log, "w") as f:
            p = subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=env, stdout=f,
                               stderr=subprocess.STDOUT, text=True, timeout=3300)
        text = log.read_text()
        print(f"README cluster block: {time.time() - t0:.0f} s")
        assert p.returncode == 0, text[-8000:]
    finally:
        kill_marked(marker)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    parts = {int(m.group(1)): m.start() for m in re.finditer(r"^@@@ (\d+)$", text, re.M)}
    section = {i: text[parts[i]:parts.get(i + 1, len(text))] for i in parts}
    job = next(i for i, ln in enumerate(lines) if "ray job submit" in ln)
    assert re.search(r"Job '\S+' succeeded", section[job]), section[job][-5000:]

    from vog_ray.runs import open_run

    urls = {i: run_url(section[i]) for i, ln in enumerate(lines) if "vog-ray audit" in ln or i == job}
    m = open_run(urls[job]).manifest
    busy = [s for s in m["scorers"] if s["rows"] > 0]
    assert len({s["node_id"] for s in busy}) == 2, m["scorers"]         # both nodes scored rows
    assert sum(s["rows"] for s in m["scorers"]) == N_ROWS and m["devices"] == {"cpu": N_ROWS}
    assert m["rows"] == {"in": N_ROWS, "scored": N_ROWS, "rejected": 0}
    for i, url in urls.items():
        line = lines[i]
        named = "using the Ray cluster that `ray start` runs on this machine" in section[i]
        assert named == ("--address" not in line and "RAY_ADDRESS" not in line and i != job), (line, section[i][-3000:])
        assert not open_run(url).manifest["warnings"]
        assert_same_scores(scores(urls[job]), scores(url))
    assert len(set(urls.values())) == 4
    assert not processes_with_env(MARKER, marker)


def test_the_config_reference_block_is_a_valid_config():
    """The README's annotated config (every key, under "## The config") validates as written: an
    example whose settings contradict each other (a flag rule for a split it does not have) is a
    README edit that breaks a user's copy."""
    from vog_ray.config import validate

    text = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text[text.index("\n## The config\n"):], re.S).group(1)
    cfg = validate(yaml.safe_load(block), "README.md")
    assert set(cfg.data.splits) >= {"train", "test", "ood"} and cfg.compute.stack_checkpoints == "off"
