"""Incremental (scheduled) audits on the shared local Ray, with data, checkpoints and outputs on
the session's S3 API on loopback (moto's server).

The runs are the incremental mode of the shared digits audit (``tests/modes.py``): checkpoints
are "published" by copying them into a live prefix, like a training run does — the first 3, an
incremental run, the 4th, a second run. That the result equals every other execution mode
(single process, fused, checkpoint-sharded) is ``test_modes.py``'s; here:

* each generation folds in only its new checkpoints and keeps only its own moments
* a 3rd run with nothing new: ``None`` / ``up to date`` on the CLI, exit 0, NOTHING written
* one checkpoint is too few for a window (VoG over one checkpoint is 0): the run waits (exit 0,
  nothing written)
* refused configs: ``label: predicted``, a sliding window (``last:2``), a window that no number of
  checkpoints fills (``first:1``)
* a folded checkpoint that changed → an error naming it
* two runs at once: exactly one publishes, the other gets ``LockHeld`` (or finds nothing new)
* ``StateLock`` alone, on S3 (conditional put, ``If-None-Match: *``) and on a local directory
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import numpy as np
import pytest
import yaml

from tests.modes import INCREMENTAL_STEPS, ROWS, Scores, col, publish_checkpoint

# the module's Ray runs several audits; on a shared 2-core machine that is many minutes
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

RACE_WINDOWS = {"all": "all", "early": "first:2"}  # the race needs two checkpoints, not the shared windows' 3


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def s3(digits_audit):
    """The shared audit's bucket (data under ``digits/``, checkpoints under ``ckpt/``)."""
    return digits_audit.s3


@pytest.fixture(scope="module")
def inc(digits_audit):
    """The shared audit's incremental runs (``tests.modes.Incremental``)."""
    return digits_audit.incremental()


def make_cfg(digits_audit, out: str, live: str, **vog: Any):
    from vog_ray.config import validate

    return validate(config_dict(digits_audit, out, live, **vog))


def config_dict(digits_audit, out: str, live: str, **vog: Any) -> dict[str, Any]:
    return digits_audit.config("incremental-test", out=out, checkpoints=digits_audit.s3.url(f"{live}/epoch_*.pt"),
                               vog=vog)


def key_of(s3, url: str) -> str:
    return url.split(f"s3://{s3.bucket}/", 1)[1]


def snapshot(s3) -> list[tuple[str, str, int, str]]:
    """Every object of the bucket with its ETag, size and modification time."""
    out = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        out.extend((o["Key"], o["ETag"], o["Size"], str(o["LastModified"])) for o in page.get("Contents", []))
    return sorted(out)


# --------------------------------------------------------------------------- the generations
def test_each_generation_folds_in_only_its_new_checkpoints(s3, digits_audit, inc):
    for g, (res, st) in enumerate(zip(inc.results, inc.states), start=1):
        start, stop = INCREMENTAL_STEPS[g - 1]
        m = res.manifest
        assert m["mode"] == "incremental" and m["generation"] == g == st["generation"]
        assert m["num_checkpoints"] == stop and len(st["checkpoints"]) == stop
        assert [c.rsplit("/", 1)[1] for c in m["new_checkpoints"]] == [f"epoch_{i + 1}.pt" for i in range(start, stop)]
        assert m["throughput"]["checkpoints_scored"] == stop - start  # only the new ones
        assert (f"incremental: {stop - start} new checkpoint(s) folded in, {stop} in all (generation {g})"
                in res.summary())
    # the previous generation's moments are gone; only the current one is kept
    gens = {k.split("/")[3] for k, *_ in snapshot(s3) if k.startswith(f"{inc.out}/_incremental/gen-")}
    assert gens == {inc.states[-1]["moments_url"].rstrip("/").split("/")[-2]}
    # generation 1's late window ("1:" of 3 checkpoints) holds two: a real spread, which
    # generation 2 extends by the 4th
    first = Scores.of_run(inc.results[0].run_url, digits_audit.storage)
    last = Scores.of_run(inc.results[-1].run_url, digits_audit.storage)
    for split, t in first.tables.items():
        for k in ("late_logit", "all_logit"):
            assert np.all(col(t, f"vog_{k}") > 0)
            assert not np.allclose(col(t, f"vog_{k}"), col(last.tables[split], f"vog_{k}"))
        np.testing.assert_array_equal(col(t, "vog_early_logit"), col(last.tables[split], "vog_early_logit"))
    # the manifest says what the state takes: the bytes of its zstd Parquet files, float32 moments
    state = inc.results[-1].manifest["state"]
    objs = [(k, size) for k, _, size, _ in snapshot(s3)
            if k.startswith(key_of(s3, inc.states[-1]["moments_url"]) + "/") and k.endswith(".parquet")]
    assert objs and state["bytes"] == sum(size for _, size in objs)
    assert state["bytes_per_example"] == round(state["bytes"] / sum(len(r) for r in ROWS.values()), 1)
    assert (state["dtype"], state["compression"]) == ("float32", "zstd")
    import pyarrow.parquet as pq

    fs, path = resolve_url(s3, inc.states[-1]["moments_url"])
    with fs.open(fs.find(path)[0], "rb") as fh:
        md = pq.ParquetFile(fh).metadata
    assert {md.row_group(0).column(j).compression for j in range(md.num_columns)} == {"ZSTD"}


def test_last_generation_equals_the_full_audit_beyond_the_mode_tolerance(digits_audit, inc):
    """Stricter than test_modes.py's rules for any two modes: against the fused audit of the same
    4 checkpoints, z within 1e-6 absolute, the very same ranks, and per-checkpoint signals equal
    up to float32 rounding (the same forward passes of the same checkpoints)."""
    last, full = digits_audit.mode("incremental"), digits_audit.mode("fused")
    eps = 4 * np.finfo(np.float32).eps
    for split, b in full.tables.items():
        a = last.tables[split]
        for c in ("z_all_logit", "score"):
            np.testing.assert_allclose(col(a, c), col(b, c), rtol=1e-6, atol=1e-6, err_msg=c)
        for c in ("rank", "class_rank", "decile"):
            assert a[c].to_pylist() == b[c].to_pylist(), (split, c)
        for c in (c for c in b.column_names if c.startswith("sig_")):
            x, y = np.asarray(a[c].to_pylist()), np.asarray(b[c].to_pylist())
            if np.issubdtype(y.dtype, np.integer):
                np.testing.assert_array_equal(x, y, err_msg=c)
            else:
                np.testing.assert_allclose(x, y, rtol=eps, atol=eps * max(1.0, float(np.abs(y).max())), err_msg=c)


def resolve_url(s3, url: str):
    from vog_ray.storage import resolve

    return resolve(url, s3.storage)


def test_float16_state_ranks_like_the_full_audit(s3, digits_audit, inc):
    """``vog.state_dtype: float16`` (3 checkpoints folded, then the 4th): the moments are stored,
    read back, merged and stored again in float16 — raw VoG within 2e-3 of the full audit's, ranks
    in the same order up to swaps of near-ties, and the state smaller than the float32 one."""
    from scipy.stats import spearmanr

    from vog_ray.distributed.incremental import run_incremental

    live, out = "run16/ckpt", "run16/inc"
    for start, stop in INCREMENTAL_STEPS:
        for i in range(start, stop):
            publish_checkpoint(s3, digits_audit.ckpt_keys[i], live, i + 1)
        res = run_incremental(make_cfg(digits_audit, out, live, state_dtype="float16"))
    assert res.manifest["generation"] == len(INCREMENTAL_STEPS) and res.manifest["state"]["dtype"] == "float16"
    assert res.manifest["state"]["bytes"] < inc.results[-1].manifest["state"]["bytes"]
    got, full = Scores.of_run(res.run_url, digits_audit.storage), digits_audit.mode("fused")
    for split, b in full.tables.items():
        a = got.tables[split]
        assert a["id"].to_pylist() == b["id"].to_pylist()
        x, y = col(a, "vog_all_logit"), col(b, "vog_all_logit")
        assert np.max(np.abs(x - y) / y) < 2e-3
        assert spearmanr(col(a, "z_all_logit"), col(b, "z_all_logit")).statistic > 0.9999


# --------------------------------------------------------------------------- nothing new
def test_a_run_without_new_checkpoint_writes_nothing(s3, inc):
    from vog_ray.config import validate
    from vog_ray.distributed.incremental import read_state, run_incremental
    from vog_ray.runs import list_runs

    before = snapshot(s3)
    assert run_incremental(validate(inc.config)) is None
    assert snapshot(s3) == before
    assert read_state(s3.url(f"{inc.out}/_incremental"), s3.storage)["generation"] == len(INCREMENTAL_STEPS)
    assert len(list_runs(s3.url(inc.out), s3.storage)) == len(INCREMENTAL_STEPS)


def test_cli_up_to_date_exits_0_and_writes_nothing(s3, inc, tmp_path, capsys):
    from vog_ray.cli import main

    cfg = tmp_path / "scheduled.yaml"
    cfg.write_text(yaml.safe_dump(inc.config))
    before = snapshot(s3)
    assert main(["audit", "--incremental", str(cfg)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert snapshot(s3) == before


def test_scheduled_audit_job_entrypoint_up_to_date(s3, inc, tmp_path):
    """``python jobs/scheduled_audit.py CONFIG`` (what the CronJob / RayCronJob run): exit 0, "up to
    date", nothing written; without a config: usage, exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "scheduled.yaml"
    cfg.write_text(yaml.safe_dump(inc.config))
    env = {**os.environ, **s3.env}
    env.pop("RAY_ADDRESS", None)
    before = snapshot(s3)
    p = subprocess.run([sys.executable, "jobs/scheduled_audit.py", str(cfg)], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "up to date" in p.stdout
    assert snapshot(s3) == before
    p = subprocess.run([sys.executable, "jobs/scheduled_audit.py"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and "usage" in p.stderr


# --------------------------------------------------------------------------- refused configs
def test_too_few_checkpoints_waits_and_a_window_of_one_is_refused(s3, digits_audit, tmp_path, capsys):
    """One checkpoint listed: the CLI says it waits, exits 0 and writes nothing; a window that no
    number of checkpoints fills (first:1) is a config error (exit 2) naming the key."""
    from vog_ray.cli import main

    publish_checkpoint(s3, digits_audit.ckpt_keys[0], "wait/ckpt", 1)
    before = snapshot(s3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(digits_audit, "wait/out", "wait/ckpt")))
    assert main(["audit", "--incremental", str(cfg)]) == 0
    assert "waiting: 1 checkpoint(s) so far" in capsys.readouterr().out
    cfg.write_text(yaml.safe_dump(config_dict(digits_audit, "wait/out", "wait/ckpt", windows={"one": "first:1"})))
    assert main(["audit", "--incremental", str(cfg)]) == 2
    assert "vog.windows: window 'one' = 'first:1' covers 1 checkpoint" in capsys.readouterr().err
    assert snapshot(s3) == before


@pytest.mark.parametrize("vog, message", [
    ({"label": "predicted"}, "incremental audits require vog.label: true"),
    ({"windows": {"all": "all", "late": "last:2"}}, "late = 'last:2' moves with the newest checkpoint"),
    ({"windows": {"tail": "-2:"}}, "tail = '-2:' moves with the newest checkpoint"),
])
def test_refused_configs(s3, digits_audit, tmp_path, capsys, vog, message):
    from vog_ray.cli import main
    from vog_ray.distributed.incremental import IncrementalError, run_incremental

    publish_checkpoint(s3, digits_audit.ckpt_keys[0], "refused/ckpt", 1)
    before = snapshot(s3)
    with pytest.raises(IncrementalError, match=message.replace("(", r"\(")):
        run_incremental(make_cfg(digits_audit, "refused/out", "refused/ckpt", **vog))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(digits_audit, "refused/out", "refused/ckpt", **vog)))
    assert main(["audit", "--incremental", str(cfg)]) == 2  # a config error: names the file and the key
    err = capsys.readouterr().err
    assert message in err and f"invalid config {cfg} for an incremental audit:" in err
    assert ("\n  vog.label: " if "label" in vog else "\n  vog.windows: ") in err
    assert snapshot(s3) == before  # refused before anything is written


# --------------------------------------------------------------------------- two runs at once
def test_two_concurrent_runs_one_publishes(s3, digits_audit, shared_ray):
    from vog_ray.distributed.incremental import LockHeld, read_state, run_incremental
    from vog_ray.runs import list_runs

    live, out = "race/ckpt", "race/inc"
    for epoch in (1, 2):  # two: a window needs at least two checkpoints
        publish_checkpoint(s3, digits_audit.ckpt_keys[epoch - 1], live, epoch)
    barrier = threading.Barrier(2)
    outcome: dict[int, Any] = {}

    def go(i: int) -> None:
        cfg = make_cfg(digits_audit, out, live, windows=RACE_WINDOWS)
        barrier.wait()
        try:
            outcome[i] = run_incremental(cfg)
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            outcome[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert len(outcome) == 2, outcome
    published = [r for r in outcome.values() if r is not None and not isinstance(r, BaseException)]
    others = [r for r in outcome.values() if r is None or isinstance(r, BaseException)]
    assert len(published) == 1, outcome
    other = others[0]
    assert other is None or isinstance(other, LockHeld), repr(other)
    if isinstance(other, LockHeld):
        assert f"pid {os.getpid()}" in str(other) and socket.gethostname() in str(other)

    state = read_state(s3.url(f"{out}/_incremental"), s3.storage)
    assert state["generation"] == 1 and len(state["checkpoints"]) == 2
    assert list_runs(s3.url(out), s3.storage) == [published[0].run_id]
    assert [k for k, *_ in snapshot(s3) if k.endswith("/_incremental/lock")] == []  # released
    assert run_incremental(make_cfg(digits_audit, out, live, windows=RACE_WINDOWS)) is None  # and a rerun is up to date


# --------------------------------------------------------------------------- changed checkpoints
def test_changed_folded_checkpoint_is_an_error(s3, digits_audit, inc):
    from vog_ray.config import validate
    from vog_ray.distributed.incremental import IncrementalError, run_incremental

    live, keys = inc.live, digits_audit.ckpt_keys
    new = f"epoch_{len(keys) + 1}.pt"
    original = s3.client().get_object(Bucket=s3.bucket, Key=f"{live}/epoch_1.pt")["Body"].read()
    try:
        publish_checkpoint(s3, keys[-1], live, 1)  # epoch_1 overwritten (by other weights)
        before = snapshot(s3)
        # same number of checkpoints (the "up to date" path) ...
        with pytest.raises(IncrementalError, match=r"checkpoint 0 changed since it was folded in: was .*epoch_1\.pt"):
            run_incremental(validate(inc.config))
        # ... and with a new one pending (the path under the lock)
        publish_checkpoint(s3, keys[2], live, len(keys) + 1)
        with pytest.raises(IncrementalError, match=r"checkpoint 0 changed .*epoch_1\.pt"):
            run_incremental(validate(inc.config))
        after = [o for o in snapshot(s3) if not o[0].endswith(new)]
        assert after == before  # nothing written, the lock released
    finally:
        s3.client().put_object(Bucket=s3.bucket, Key=f"{live}/epoch_1.pt", Body=original)
        s3.client().delete_object(Bucket=s3.bucket, Key=f"{live}/{new}")


# --------------------------------------------------------------------------- the lock alone
@pytest.fixture(params=["s3", "local"])
def lock_url(request, s3_server_module, tmp_path):
    if request.param == "s3":
        return s3_server_module.url(f"locks/{request.node.name}/_incremental"), s3_server_module.storage
    return str(tmp_path / "out" / "_incremental"), None


def test_state_lock_second_acquire_raises_lock_held(lock_url):
    from vog_ray.distributed.incremental import LockHeld, StateLock
    from vog_ray.storage import resolve

    url, storage = lock_url
    first = StateLock(url, storage)
    with first:
        with pytest.raises(LockHeld) as e:
            with StateLock(url, storage):
                pass
        msg = str(e.value)
        assert f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
        fs, path = resolve(url + "/lock", storage)
        assert fs.exists(path)  # the loser did not remove the holder's lock
    assert not fs.exists(path)
    with StateLock(url, storage):  # free again
        pass


def test_state_lock_race_has_one_winner(lock_url):
    """16 threads try to take the lock at the same moment: exactly one gets it."""
    from vog_ray.distributed.incremental import LockHeld, StateLock

    url, storage = lock_url
    for _ in range(3):
        barrier = threading.Barrier(16)
        won, lost, hold = [], [], threading.Event()

        def go(i: int) -> None:
            lock = StateLock(url, storage)
            barrier.wait()
            try:
                lock.__enter__()
            except LockHeld:
                lost.append(i)
                return
            won.append(i)
            hold.wait(60)
            lock.__exit__(None, None, None)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        while len(won) + len(lost) < 16 and any(t.is_alive() for t in threads):
            threading.Event().wait(0.05)
        hold.set()
        for t in threads:
            t.join(60)
        assert len(won) == 1 and len(lost) == 15, (won, lost)


def test_moto_honours_if_none_match(s3_server_module):
    """The S3 lock relies on conditional writes: a second ``If-None-Match: *`` put must fail."""
    from botocore.exceptions import ClientError

    c, b = s3_server_module.client(), s3_server_module.bucket
    c.put_object(Bucket=b, Key="inm/obj", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=b, Key="inm/obj", Body=b"2", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    assert c.get_object(Bucket=b, Key="inm/obj")["Body"].read() == b"1"


# --------------------------------------------------------------------------- example configs
@pytest.mark.parametrize("name", ["audit.yaml", "scheduled_audit.yaml"])
def test_example_configs_validate(name):
    from pathlib import Path

    from vog_ray.config import load_config
    from vog_ray.distributed.incremental import check_incremental_config

    path = Path(__file__).resolve().parents[2] / "configs" / name
    cfg = load_config(path)
    assert cfg.output.url and cfg.checkpoints
    if name == "scheduled_audit.yaml":
        check_incremental_config(cfg)  # label true, windows that do not slide
        assert cfg.vog.label == "true"
        assert cfg.vog.windows == {"all": "all", "early": "first:3"}
        assert cfg.storage.endpoint_url
