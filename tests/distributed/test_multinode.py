"""A real 2-node Ray cluster on this machine, an audit submitted as a Ray job, S3 on loopback —
and the same audit again, losing its second node while that node holds a scorer actor.

Two ``ray start`` processes (head + worker), each with 2 logical CPUs, 1 fake GPU (Ray schedules
it; torch sees no CUDA, so the scorer falls back to the CPU), a custom resource naming the node,
its own short ``--temp-dir`` and its own ports (so it cannot collide with another Ray on the
machine). ``--node-ip-address 127.0.0.1`` is passed, but Ray 2.60's ``ray start`` rewrites a
loopback address to the host's routable IP (``services.resolve_ip_for_localhost``) and its gRPC
servers listen on all interfaces; the dashboard is bound to 127.0.0.1. Token auth is disabled in
every process this test starts (``RAY_AUTH_MODE=disabled``; a ``~/.ray/auth_token`` on the machine
would otherwise switch ``ray start`` to token mode).

The audit (``jobs/audit.py``) is the shared digits audit of ``tests/modes.py`` (its data and
checkpoints on the session's S3 endpoint), submitted with ``ray job submit --working-dir <repo>``;
the S3 credentials reach the job's driver and workers through ``--runtime-env-json`` only (the
raylets are started without them). Two scorer actors with one GPU each must land one per node.
The job is one more execution mode: its tables must equal the single-process reference that
test_modes.py holds every mode to (scores, class tables, signals).

Then node b dies mid-audit: a second job (CPU actors, one per node, a slow forward so blocks are
in flight for seconds) runs until node b's actor has scored, and every process of node b is
SIGKILLed. Ray restarts the lost actor on node a, retries its blocks and rebuilds lost objects;
the job must succeed with every row scored, and its tables are held to the same reference.

Teardown kills only the processes of this cluster: those whose command line names its unique
temp dir, and their descendants (workers, the job driver). ``ray stop`` is never used: it
would kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.digits import MODEL, K
from tests.modes import ROWS, Scores, assert_modes_agree

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
EXCLUDES = [".venv", ".git", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis", "demo-output",
            "*.egg-info", "build"]


# --------------------------------------------------------------------------- processes
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process we can read."""
    out: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


def cluster_pids(marker: str) -> set[int]:
    """Processes whose command line contains ``marker`` (our unique temp dir) and all their
    descendants (Ray workers rename themselves ``ray::…``; the job driver is a worker's child)."""
    table = _proc_table()
    pids = {p for p, (_, cmd) in table.items() if marker in cmd and p != os.getpid()}
    grew = True
    while grew:
        kids = {p for p, (pp, _) in table.items() if pp in pids and p not in pids and p != os.getpid()}
        grew = bool(kids)
        pids |= kids
    return pids


def kill_cluster(marker: str, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL, the processes of this cluster only (never ``ray stop``)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = cluster_pids(marker)
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and cluster_pids(marker):
            time.sleep(0.5)
        if not cluster_pids(marker):
            return
    left = cluster_pids(marker)
    assert not left, f"processes of the test cluster survived SIGKILL: {sorted(left)}"


def _free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ray_env() -> dict[str, str]:
    """The env of everything this test starts: the venv first on PATH, auth off, and no S3
    credentials (they must come through the job's runtime env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               # a worker that needs > 60 s to start on a loaded machine is killed and restarted
               # by default: workers then thrash instead of starting
               RAY_worker_register_timeout_seconds="600")
    return env


def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@contextlib.contextmanager
def two_node_cluster():
    """Head (node_a) + worker (node_b); yields ``{"dashboard", "gcs", "root", "nodes"}``
    (``nodes``: node id -> "node_a"/"node_b"); always torn down, killing only its own processes."""
    root = tempfile.mkdtemp(prefix=f"vmn{uuid.uuid4().hex[:6]}", dir="/tmp")  # short: socket paths
    marker = root
    gcs, dash, client, *ports = _free_ports(3 + 2 * 7)
    node_ports = [ports[:7], ports[7:]]

    def port_args(p: list[int]) -> list[str]:
        return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5])]

    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "1",
              "--disable-usage-stats", "--object-store-memory", str(200 * 1024 ** 2)]
    dashboard = f"http://127.0.0.1:{dash}"
    saved_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process talks to the cluster too (state API)
    try:
        run([RAY, "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash),
             "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
             "--ray-client-server-port", str(client), "--resources", json.dumps({"node_a": 1}),
             "--temp-dir", os.path.join(root, "a"), *common, *port_args(node_ports[0])])
        run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--resources", json.dumps({"node_b": 1}),
             "--temp-dir", os.path.join(root, "b"), *common, *port_args(node_ports[1])])
        nodes = wait_for_nodes(dashboard, 2)
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{gcs}", "root": root, "nodes": nodes}
    finally:
        try:
            kill_cluster(marker)
        finally:
            shutil.rmtree(root, ignore_errors=True)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def wait_for_nodes(dashboard: str, n: int, timeout: float = 120) -> dict[str, str]:
    """node id -> 'node_a' / 'node_b' once ``n`` nodes are alive."""
    from ray.util.state import list_nodes

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            alive = [x for x in list_nodes(address=dashboard, detail=True) if x.state == "ALIVE"]
            if len(alive) >= n:
                return {x.node_id: next(r for r in x.resources_total if r.startswith("node_")) for x in alive}
        except Exception as e:  # noqa: BLE001 - the dashboard may not be up yet
            last = e
        time.sleep(2)
    raise AssertionError(f"{n} nodes not alive after {timeout} s (last error: {last!r})")


# --------------------------------------------------------------------------- the test
def audit_config(digits_audit, out: str = "mn/job") -> dict[str, Any]:
    return digits_audit.config(
        "multinode-test", out=out,
        # the same network and weights, with a forward that sleeps: a batch takes long enough that
        # the second actor gets the next block while the first is busy (tests/ travels with the job)
        model={**MODEL, "name": "tests.faultproxy:slow_small_cnn", "delay": 0.05},
        # two scorer actors with one (fake) GPU each: one per node; several small blocks; scoring
        # waits until both actors are up, and each holds one block at a time
        compute={"device": "auto", "batch_size": 16,
                 "actors": {"min": 2, "max": 2, "tasks_in_flight": 1, "wait_for_min_s": 600},
                 "gpus_per_actor": 1, "cpus_per_actor": 1, "read_blocks": 8, "decode_batch_size": 16})


AGENT_WAIT_S = 300  # a fresh head node's job agent registers late on a loaded machine


def submit(cluster: dict, sub_id: str, cfg_path: Path, env_vars: dict[str, str]) -> None:
    """``ray job submit --no-wait`` of ``jobs/audit.py``; submitted again while the head node's job
    agent has not registered yet (Ray answers "No available agent to submit job, please try again
    later"), any other failure at once."""
    runtime_env = {"env_vars": {**env_vars, "RAY_AUTH_MODE": "disabled"}, "excludes": EXCLUDES}
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--submission-id", sub_id, "--no-wait",
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "jobs/audit.py", str(cfg_path)]
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            run(cmd, timeout=300)
            return
        except AssertionError as e:
            if "No available agent to submit job" not in str(e) or time.time() > deadline:
                raise
        time.sleep(3)


def wait_job(cluster: dict, sub_id: str, timeout: float = 3000) -> tuple[Any, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster["dashboard"])
    deadline = time.time() + timeout
    while (status := client.get_job_status(sub_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
    return status, client.get_job_logs(sub_id)


LOST_DELAY_S = 0.3   # a forward of the node-loss audit sleeps this long: blocks are in flight for seconds


def lose_node_b_mid_audit(cluster: dict, digits_audit, tmp_path: Path) -> dict[str, Any]:
    """An audit whose two scorer actors run one per node; once node b's actor has scored, every
    process of node b (raylet, object store, workers) is SIGKILLed. Returns what was seen."""
    from ray.job_submission import JobStatus
    from ray.util.state import list_actors

    forwards = tmp_path / "forwards.log"   # one line (the pid) per forward call of the scorer
    forwards.touch()
    cfg = audit_config(digits_audit, "mn/lost")
    cfg["model"]["delay"] = LOST_DELAY_S
    # CPU actors at half a CPU each: after the loss, node a (2 CPUs) holds both and still has a
    # CPU for the read/decode tasks
    cfg["compute"] = {**cfg["compute"], "device": "cpu", "cpus_per_actor": 0.5}
    cfg["compute"].pop("gpus_per_actor")
    cfg_path = tmp_path / "lost.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    sub_id = f"vog-lost-{uuid.uuid4().hex[:8]}"
    submit(cluster, sub_id, cfg_path, {**digits_audit.s3.env, "VOG_TEST_FORWARD_LOG": str(forwards)})
    b_marker = os.path.join(cluster["root"], "b")
    deadline = time.time() + 1800
    while time.time() < deadline:
        b_pids = cluster_pids(b_marker)
        on_b = [p for p in map(int, forwards.read_text().split()) if p in b_pids]
        if len(on_b) >= 2:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("node b's scorer actor never scored")
    actors = [a for a in list_actors(address=cluster["dashboard"], detail=True, limit=10_000)
              if "ScorerActor" in (a.class_name or "") and a.state == "ALIVE"]
    placed = sorted(str(cluster["nodes"].get(a.node_id)) for a in actors)
    n_before = len(forwards.read_text().split())
    for pid in cluster_pids(b_marker):          # the node dies: no drain, no goodbye
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    t_kill = time.time()
    status, logs = wait_job(cluster, sub_id)
    assert status == JobStatus.SUCCEEDED, f"job {sub_id}: {status}\n{logs[-6000:]}"
    n = sum(len(r) for r in ROWS.values())
    assert f"rows: {n} in = {n} scored + 0 rejected" in logs, logs[-3000:]
    after = forwards.read_text().split()[n_before:]
    return {"actors_at_kill": placed, "forwards_before_kill": n_before, "forwards_after_kill": len(after),
            "finished_after_kill_s": round(time.time() - t_kill, 1)}


@pytest.mark.timeout(3600)  # minutes on an idle 2-core machine; much longer when it is shared
def test_audit_job_on_two_node_cluster(digits_audit, tmp_path):
    """(1) An audit job whose two GPU actors run one per node == the single-process reference. (2)
    The same audit with node b SIGKILLed while its scorer actor holds blocks: it finishes on node
    a, no row lost, and its tables are held to the same reference."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_tasks

    s3 = digits_audit.s3
    rows = sum(len(r) for r in ROWS.values())
    cfg_path = tmp_path / "audit.yaml"
    cfg_path.write_text(yaml.safe_dump(audit_config(digits_audit)))
    sub_id = f"vog-mn-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    with two_node_cluster() as cluster:
        print(f"cluster up after {time.time() - t0:.0f} s: {cluster['nodes']}")
        submit(cluster, sub_id, cfg_path, s3.env)
        client = JobSubmissionClient(cluster["dashboard"])
        deadline = time.time() + 3000
        while (status := client.get_job_status(sub_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED) and time.time() < deadline:
            time.sleep(2)
        logs = client.get_job_logs(sub_id)
        assert status == JobStatus.SUCCEEDED, f"job {sub_id}: {status}\n{logs[-6000:]}"
        assert f"rows: {rows} in = {rows} scored + 0 rejected" in logs, logs[-3000:]
        print(f"job {sub_id} succeeded after {time.time() - t0:.0f} s")

        # the scorer actors: one per node (one fake GPU each), and both of them scored blocks
        actors = [a for a in list_actors(address=cluster["dashboard"], detail=True, limit=10_000)
                  if "ScorerActor" in (a.class_name or "")]
        on = sorted(str(cluster["nodes"].get(a.node_id)) for a in actors)
        assert on == ["node_a", "node_b"], [(a.class_name, a.node_id, a.state) for a in actors]
        scorer_ids = {a.actor_id for a in actors}
        tasks = [t for t in list_tasks(address=cluster["dashboard"], detail=True, limit=10_000)
                 if t.actor_id in scorer_ids and t.state == "FINISHED"]
        batches = [t for t in tasks if t.type == "ACTOR_TASK" and "submit" in t.name]
        per_node = {n: sum(cluster["nodes"].get(t.node_id) == n for t in batches) for n in ("node_a", "node_b")}
        print("scorer batch tasks per node:", per_node)
        assert all(per_node.values()), ("both scorer actors must score blocks", per_node)

        lost = lose_node_b_mid_audit(cluster, digits_audit, tmp_path)
        print(f"node b lost mid-audit: {lost}")
        assert lost["actors_at_kill"] == ["node_a", "node_b"], lost
        assert lost["forwards_after_kill"] > 0, ("node a must have scored after the loss", lost)

    # the job is one more execution mode: the same numbers as the single-process reference
    job = Scores.of_run(s3.url("mn/job"), digits_audit.storage)
    assert_modes_agree(digits_audit.reference(), job, "two-node job vs single")
    m = job.manifest
    assert m["rows"] == {"in": rows, "scored": rows, "rejected": 0} and m["num_checkpoints"] == K
    lost_run = Scores.of_run(s3.url("mn/lost"), digits_audit.storage)
    assert_modes_agree(digits_audit.reference(), lost_run, "two-node job that lost node b vs single")
    assert lost_run.manifest["rows"] == m["rows"]
