"""Faults during an audit are survived, and nothing is lost (issue "Reliability and security").

Real parts: a local 2-CPU Ray of this module's own (its workers SIGKILLed, and with an env of their
own; plus the CLI's own Ray in the driver-kill test), the session's S3 API on 127.0.0.1 (moto's
server) behind :mod:`tests.faultproxy`, real images (sklearn's 8×8 digits, Parquet/PNG) and a tiny
CNN with K = 3 checkpoints.

1. + 2. determinism, and a scorer actor killed mid-run: the same config run twice (fresh each
   time; the second time its ScorerActor process is SIGKILLed while it scores, so Ray restarts it
   and retries its batches) gives byte-identical tables;
3. the driver (``vog-ray audit``) killed mid-run → no Ray process of it survives the kill of its
   process group; the same command again resumes: the finished blocks are NOT rescored
   (``manifest["resume"]`` counts the rows scored by each invocation; the first invocation's
   files are untouched) and the tables equal the undisturbed run's;
4. S3 answers ``503 SlowDown`` to many requests (driver, read tasks, actors, writes) → retried,
   the audit completes; its tables equal the baseline's up to float rounding (it runs with larger
   batches, to keep the number of S3 requests down);
5. the output store refuses writes under ``runs/`` at publish time → the command fails with a
   clear message, and no partial run is visible (``list_runs``/``LATEST`` unchanged,
   ``open_run`` raises ``RunNotFound``).

Every undisturbed/disturbed pair is compared on the score table sorted by (split, rank, id), the
class table and the rejected table; ``rows in = scored + rejected`` is checked on every run.
The counts of injected faults are printed at the end (``pytest -s``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.digits import MODEL
from tests.rayenv import processes_with_env, start_test_ray

# own_ray: this module kills the processes of its Ray and gives its workers VOG_TEST_FORWARD_LOG;
# it does not share the session's Ray (and runs after the modules that do)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_ray]

N_ROWS = 320           # audited digits (the model trained on the first 600)
ROWS_PER_FILE = 80     # 4 input files …
ROW_GROUP = 8          # … of 10 row groups: 40 read blocks of 8 rows = 40 scorer batches
N_BLOCKS = N_ROWS // ROW_GROUP
COMPUTE = {"device": "cpu", "batch_size": 8, "decode_batch_size": 8, "read_blocks": 40}
# through the fault proxy: 4 blocks of 80 rows (every raw file is read ~6 times by the reduce; on S3
# each read is a few requests, and every 25th request is faulted and backed off)
S3_COMPUTE = {"device": "cpu", "batch_size": 80, "decode_batch_size": 80, "read_blocks": 4}
SLOW_MODEL = {**MODEL, "name": "tests.faultproxy:slow_small_cnn", "delay": 0.02}
REPO = Path(__file__).resolve().parents[2]
REPORT: dict[str, Any] = {}


@dataclass
class FX:
    tiny: Any
    root: Path
    s3: Any
    proxy: Any
    worker_env: dict[str, str]
    local_split: str
    s3_split: str
    s3_ckpts: str
    cache: dict[str, Any] = field(default_factory=dict)

    def config(self, out_url: str, *, s3: bool = False, model: dict | None = None) -> dict:
        split = {"format": "parquet", "url": self.s3_split if s3 else self.local_split}
        extra: dict[str, Any] = {"compute": dict(S3_COMPUTE if s3 else COMPUTE)}
        if s3:
            extra["storage"] = {"endpoint_url": self.proxy.url, "region": "us-east-1"}
        cfg = self.tiny.config({"train": split}, out_url, checkpoints=self.s3_ckpts if s3 else None, **extra)
        if model:
            cfg["model"] = model
        return cfg


@pytest.fixture(scope="module")
def fx(tiny_digits, s3_server_module, tmp_path_factory):
    import ray

    from tests.faultproxy import FaultProxy
    from vog_ray.testing.writers import write_parquet_split

    root = tmp_path_factory.mktemp("faults")
    s3 = s3_server_module
    with FaultProxy(s3.endpoint) as proxy:
        env = start_test_ray({**s3.env, "VOG_TEST_FORWARD_LOG": str(root / "forwards.log")})
        imgs, labels = tiny_digits.imgs[:N_ROWS], tiny_digits.labels[:N_ROWS]
        write_parquet_split(str(root / "data"), imgs, labels, rows_per_file=ROWS_PER_FILE, row_group_size=ROW_GROUP)
        write_parquet_split(s3.url("data"), imgs, labels, storage=s3.storage, rows_per_file=ROWS_PER_FILE,
                            row_group_size=ROW_GROUP)
        ckpts = tiny_digits.upload_checkpoints(s3.url("ckpts"), s3.storage)
        try:
            yield FX(tiny_digits, root, s3, proxy, env, str(root / "data"), s3.url("data"), ckpts)
        finally:
            ray.shutdown()
            if REPORT:
                print("\nfault injection:", json.dumps(REPORT, indent=1, default=str))


# ----------------------------------------------------------------------------------------------
# helpers


def _audit(cfg_dict: dict):
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit

    return run_audit(validate(cfg_dict), report=False)


def _tables(run_url: str, storage=None) -> dict[str, pa.Table]:
    from vog_ray.runs import open_run

    run = open_run(run_url, storage)
    out = {"scores": run.scores().sort_by([("split", "ascending"), ("rank", "ascending"), ("id", "ascending")]),
           "classes": run.classes().sort_by([("split", "ascending"), ("class", "ascending")]),
           "rejected": run.rejected()}
    if out["rejected"].num_rows:
        out["rejected"] = out["rejected"].sort_by([("split", "ascending"), ("id", "ascending")])
    return {k: v.combine_chunks().replace_schema_metadata(None) for k, v in out.items()}


def _canonical_bytes(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="none", use_dictionary=False, write_statistics=False)
    return buf.getvalue()


def _diff(a: pa.Table, b: pa.Table) -> str:
    if a.schema != b.schema:
        return f"schemas differ:\n{a.schema}\n---\n{b.schema}"
    if a.num_rows != b.num_rows:
        return f"{a.num_rows} rows != {b.num_rows} rows"
    bad = []
    for c in a.column_names:
        if not a[c].equals(b[c]):
            try:
                x = np.asarray(a[c].to_pylist(), dtype=float)
                y = np.asarray(b[c].to_pylist(), dtype=float)
                bad.append(f"{c} (max |diff| {np.nanmax(np.abs(x - y)):.3g})")
            except (TypeError, ValueError):
                bad.append(c)
    return "columns differ: " + ", ".join(bad)


def assert_same_tables(got: dict[str, pa.Table], want: dict[str, pa.Table], *, bytes_too: bool = False) -> None:
    for name in ("scores", "classes", "rejected"):
        assert got[name].equals(want[name]), f"{name}: {_diff(got[name], want[name])}"
        if bytes_too:
            assert _canonical_bytes(got[name]) == _canonical_bytes(want[name]), name


def assert_close_tables(got: dict[str, pa.Table], want: dict[str, pa.Table], rtol: float = 1e-6) -> None:
    """Equal up to float rounding (another batch size changes the last bits of VoG): the same rows,
    rejected rows and classes; every float within ``rtol``; ranks may differ only among near-ties."""
    for name in ("scores", "classes", "rejected"):
        g, w = got[name], want[name]
        assert g.schema == w.schema and g.num_rows == w.num_rows, name
        if name == "scores":
            g, w = g.sort_by([("split", "ascending"), ("id", "ascending")]), w.sort_by([("split", "ascending"), ("id", "ascending")])
        for c in g.column_names:
            if pa.types.is_floating(g.schema.field(c).type):
                np.testing.assert_allclose(np.asarray(g[c].to_pylist(), float), np.asarray(w[c].to_pylist(), float),
                                           rtol=rtol, atol=1e-12, err_msg=f"{name}.{c}")
            elif c not in ("rank", "class_rank", "percentile", "decile") and not c.startswith("sig_"):
                assert g[c].equals(w[c]), f"{name}.{c}"
    # ranks: the scores in rank order agree, so any rank difference is a swap of near-equal scores
    np.testing.assert_allclose(np.asarray(got["scores"]["score"].to_pylist(), float),
                               np.asarray(want["scores"]["score"].to_pylist(), float), rtol=rtol, atol=1e-12)


def assert_nothing_lost(manifest: dict[str, Any], tables: dict[str, pa.Table]) -> None:
    r = manifest["rows"]
    assert r["in"] == N_ROWS == r["scored"] + r["rejected"], r
    assert tables["scores"].num_rows == r["scored"] and tables["rejected"].num_rows == r["rejected"]
    assert len(set(tables["scores"]["id"].to_pylist())) == r["scored"]


def baseline(fx: FX) -> dict[str, pa.Table]:
    """The undisturbed audit (local files), run once per module."""
    if "baseline" not in fx.cache:
        res = _audit(fx.config(str(fx.root / "base"), model=SLOW_MODEL))
        fx.cache["baseline"] = _tables(res.run_url)
        assert_nothing_lost(res.manifest, fx.cache["baseline"])
        assert res.manifest["resume"] == {"rows_scored_now": N_ROWS, "rows_from_earlier": 0, "files_removed": 0}
    return fx.cache["baseline"]


def _raw_dir(out: Path) -> Path | None:
    hits = list(out.glob("_work/*/raw"))
    return hits[0] if hits else None


def _readable_parquet(d: Path | None) -> list[Path]:
    out = []
    for p in sorted(d.glob("*.parquet")) if d else []:
        try:
            pq.ParquetFile(p).metadata
            out.append(p)
        except Exception:  # noqa: BLE001 - being written
            pass
    return out


def _scorer_pids(marker: str) -> list[int]:
    """Pids of this module's Ray workers that run a ScorerActor (matched by process title)."""
    out = []
    for pid in processes_with_env("VOG_TEST_RAY_MARKER", marker):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ScorerActor" in cmd:
            out.append(pid)
    return out


# ----------------------------------------------------------------------------------------------
# 1. + 2. the same config twice — the second time with its scorer actor killed mid-run


def test_same_config_twice_is_byte_identical_even_with_the_scorer_actor_killed(fx):
    """The baseline config is audited a second time, fresh (its output moved away first, so stage 1
    runs again), and while that run scores, its ScorerActor's process is SIGKILLed. Ray Data
    restarts the actor (``max_restarts=-1``) and retries its batches; the score, class and rejected
    tables are byte-identical to the first run's (sorted by split, rank, id; a canonical Parquet
    re-serialisation compared byte for byte)."""
    want = baseline(fx)
    out = fx.root / "base"
    os.rename(out, fx.root / "base-first")
    marker = fx.worker_env["VOG_TEST_RAY_MARKER"]
    forwards = Path(fx.worker_env["VOG_TEST_FORWARD_LOG"])  # one line (the pid) per forward call
    forwards.write_text("")
    total = 3 * N_BLOCKS  # K forward calls per batch
    seen: dict[str, Any] = {"killed": None, "at": None, "error": None}
    stop = threading.Event()

    def killer() -> None:
        try:
            while not stop.is_set() and seen["killed"] is None:
                calls = forwards.read_text().split()
                scorers = set(_scorer_pids(marker))
                if len(calls) >= total // 4 and int(calls[-1]) in scorers:  # a quarter scored
                    os.kill(int(calls[-1]), signal.SIGKILL)
                    seen["killed"], seen["at"] = int(calls[-1]), len(calls)
                time.sleep(0.02)
        except Exception as e:  # noqa: BLE001
            seen["error"] = e

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res = _audit(fx.config(str(out), model=SLOW_MODEL))
    finally:
        stop.set()
        t.join(10)
    assert seen["error"] is None, seen["error"]
    assert seen["killed"] is not None, "the scorer actor was not killed mid-run"
    calls = [int(x) for x in forwards.read_text().split()]
    after = calls[seen["at"]:]
    assert seen["at"] < total, "killed after scoring had finished"
    # scoring went on after the kill, in another (restarted) actor process
    assert after and seen["killed"] not in set(after[-total // 4:]), (seen, len(after))
    restarted = {p for p in after if p != seen["killed"]}
    assert not res.manifest["resumed_from_work"]
    got = _tables(res.run_url)
    assert_nothing_lost(res.manifest, got)
    assert_same_tables(got, want, bytes_too=True)
    # the score table is sorted by split, rank; ties broken by id
    assert got["scores"]["rank"].to_pylist() == list(range(1, N_ROWS + 1))
    REPORT["scorer_actor_kills"] = {"killed": 1, "forward_calls_before_kill": seen["at"],
                                    "forward_calls_after_kill": len(after), "restarted_actor_processes": len(restarted),
                                    "rows_lost": 0, "tables": "byte-identical to the undisturbed run"}


# ----------------------------------------------------------------------------------------------
# 3. the driver killed mid-run; the same command resumes


def test_driver_killed_mid_run_resumes_without_rescoring(fx):
    want = baseline(fx)
    out = fx.root / "kill-driver"
    cfg_path = fx.root / "kill-driver.yaml"
    cfg = fx.config(str(out), model=SLOW_MODEL)
    cfg["output"]["keep_work"] = True  # the killed run's raw files are compared after the resumed run published
    cfg_path.write_text(yaml.safe_dump(cfg))
    marker = f"driver-kill-{os.getpid()}-{time.time_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"VOG_TEST_RAY_MARKER": marker, "VOG_RAY_TORCH_THREADS": "1", "RAY_AUTH_MODE": "disabled",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    cmd = [sys.executable, "-m", "vog_ray.cli", "audit", str(cfg_path), "--no-report"]
    log1 = open(fx.root / "kill-driver-1.log", "wb")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    files: list[Path] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            files = _readable_parquet(_raw_dir(out))
            if len(files) >= 4:
                break
            time.sleep(0.05)
        assert p.poll() is None, f"the audit ended before it was killed:\n{(fx.root / 'kill-driver-1.log').read_text()[-3000:]}"
        assert files, "stage 1 wrote nothing in time"
        os.killpg(p.pid, signal.SIGKILL)  # the driver and everything in its process group
        p.wait(30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        log1.close()
    # no Ray process of the killed driver may survive (Ray's processes die with their driver)
    deadline = time.time() + 30
    stray = processes_with_env("VOG_TEST_RAY_MARKER", marker)
    while stray and time.time() < deadline:
        time.sleep(0.5)
        stray = processes_with_env("VOG_TEST_RAY_MARKER", marker)
    leftovers = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in stray if Path(f"/proc/{pid}").exists()}
    for pid in stray:  # clean up what we started before failing, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not stray, f"Ray processes survived the driver's kill: {leftovers}"

    raw = _raw_dir(out)
    assert raw is not None and not (raw / "_SUCCESS").exists()
    kept = {f.name: f.stat().st_mtime_ns for f in _readable_parquet(raw)}
    rows_kept = sum(pq.ParquetFile(raw / f).metadata.num_rows for f in kept)
    assert 0 < rows_kept < N_ROWS, rows_kept

    # the same command again: resumes
    r2 = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-4000:]
    deadline = time.time() + 30  # the resumed driver exited normally: its Ray is shut down with it
    while processes_with_env("VOG_TEST_RAY_MARKER", marker) and time.time() < deadline:
        time.sleep(0.5)
    stray = processes_with_env("VOG_TEST_RAY_MARKER", marker)
    for pid in stray:
        os.kill(pid, signal.SIGKILL)
    assert not stray, "Ray processes of the resumed driver outlived it"
    from vog_ray.runs import list_runs, open_run

    runs = list_runs(str(out))
    assert len(runs) == 1
    run = open_run(str(out))
    resume = run.manifest["resume"]
    # the counter: rows scored by this invocation + rows kept from the killed one = all rows
    assert resume["rows_from_earlier"] == rows_kept, resume
    assert resume["rows_scored_now"] == N_ROWS - rows_kept, resume
    # the killed run's files were kept as they were (not rewritten)
    after = {f.name: f.stat().st_mtime_ns for f in _readable_parquet(raw)}
    assert all(after.get(name) == mtime for name, mtime in kept.items())
    got = _tables(run.url)
    assert_nothing_lost(run.manifest, got)
    assert_same_tables(got, want)
    REPORT["driver_kill"] = {"killed_after_files": len(files), "rows_from_earlier": rows_kept,
                             "rows_scored_on_resume": resume["rows_scored_now"],
                             "half_written_files_removed": resume["files_removed"], "rows_lost": 0,
                             "stray_ray_processes": 0}


# ----------------------------------------------------------------------------------------------
# 4. S3 throttles; 5. the output store refuses the publish


def test_s3_slowdown_is_retried(fx):
    from tests.faultproxy import fail_every

    want = baseline(fx)
    fx.proxy.rule = fail_every(15, first=6)  # the first 6 requests, then every 15th: 503 SlowDown
    fx.proxy.armed = True
    before = fx.proxy.injected
    try:
        res = _audit(fx.config(fx.s3.url("out"), s3=True))
    finally:
        fx.proxy.rule = None
    injected = fx.proxy.injected - before
    assert injected >= 10, injected
    got = _tables(res.run_url, fx.s3.storage)
    assert_nothing_lost(res.manifest, got)
    assert_close_tables(got, want)  # another batch size than the baseline: equal to rounding
    fx.cache["s3_run"] = res.run_id
    REPORT["s3_slowdown"] = {"requests": fx.proxy.requests, "faults_injected": injected,
                             "faulted_requests_sample": fx.proxy.stats.injected_paths[:5], "rows_lost": 0}


def test_output_refused_at_publish_fails_clearly_and_publishes_nothing(fx, tmp_path, capsys):
    from tests.faultproxy import refuse_writes
    from vog_ray.cli import main
    from vog_ray.runs import RunNotFound, list_runs, open_run

    out = fx.s3.url("out")
    runs_before = list_runs(out, fx.s3.storage)
    latest_before = fx.s3.client().get_object(Bucket=fx.s3.bucket, Key="out/LATEST")["Body"].read() \
        if runs_before else None
    cfg_path = tmp_path / "audit.yaml"
    cfg_path.write_text(yaml.safe_dump(fx.config(out, s3=True)))
    fx.proxy.rule = refuse_writes("/runs/")
    fx.proxy.armed = True
    before = fx.proxy.injected
    try:
        rc = main(["audit", str(cfg_path), "--no-report"])
    finally:
        fx.proxy.rule = None
    err = capsys.readouterr().err
    assert rc == 1
    assert "could not publish run" in err and "nothing was published" in err and "Access Denied" in err, err
    assert fx.proxy.injected > before
    # nothing visible: the runs listed and LATEST are as before, the new run cannot be opened
    assert list_runs(out, fx.s3.storage) == runs_before
    if latest_before is not None:
        assert fx.s3.client().get_object(Bucket=fx.s3.bucket, Key="out/LATEST")["Body"].read() == latest_before
    failed = err.split("could not publish run ", 1)[1].split(" ", 1)[0]
    with pytest.raises(RunNotFound):
        open_run(fx.s3.url(f"out/runs/{failed}"), fx.s3.storage)
    assert not fx.s3.list(f"out/runs/{failed}/_SUCCESS")
    REPORT["publish_refused"] = {"writes_refused": fx.proxy.injected - before, "runs_visible_after": len(runs_before),
                                 "message": err.strip().splitlines()[-1][:300]}
