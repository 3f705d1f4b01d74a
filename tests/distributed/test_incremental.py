"""Incremental (scheduled) audits on a real local Ray, with data, checkpoints and outputs on a
real S3 API on loopback (moto's server).

The data are scikit-learn's 8×8 digits (a few hundred train + test images, PNG in Parquet), the
checkpoints come from a real short training (``vog_ray.train.train``, ``small_cnn``). Checkpoints
are "published" one at a time by copying them into a live prefix, like a training run does.

* three incremental runs (one new checkpoint each) == one full ``run_audit`` over the three
* a 4th run with nothing new: ``None`` / ``up to date`` on the CLI, exit 0, NOTHING written
* refused configs: ``label: predicted`` and a sliding window (``last:2``)
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

# the module's Ray runs ~5 audits; on a shared 2-core machine that is many minutes
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3600)]

MODEL = {"name": "small_cnn", "size": 8, "width": 8, "num_classes": 10}  # conftest DIGITS_MODEL

N_TRAIN, N_TEST, EPOCHS = 240, 80, 3
DIGITS = {"n_train": N_TRAIN, "n_test": N_TEST, "epochs": EPOCHS}  # read by the digits_s3 fixture
WINDOWS = {"all": "all", "early": "first:1"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3(s3_server_module):
    """The S3 server (started first) and a local Ray whose workers see its credentials."""
    import ray

    if ray.is_initialized():  # another module's Ray: its workers lack this module's S3 env
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": s3_server_module.env},
             # on a loaded machine a worker may need > 60 s to start; the default timeout then
             # kills and restarts workers over and over
             _system_config={"worker_register_timeout_seconds": 600})
    yield s3_server_module
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(s3, digits_s3) -> dict[str, Any]:
    """Digits splits + 3 real checkpoints (conftest ``digits_s3``) and other weights of the same
    architecture (another seed), for the "a folded checkpoint changed" test."""
    import torch

    from vog_ray.train import train

    assert digits_s3["model"] == MODEL
    torch.set_num_threads(1)
    other = train(digits_s3["x_train"], digits_s3["y_train"], model=MODEL, out_url=s3.url("other"), epochs=1,
                  batch_size=32, lr=3e-3, storage=s3.storage, seed=1)
    return {**digits_s3, "other": other.checkpoints[0]}


def config_dict(s3, out: str, live: str, **vog: Any) -> dict[str, Any]:
    return {
        "name": "incremental-test",
        "data": {"splits": {"train": {"format": "parquet", "url": s3.url("data/train")},
                            "test": {"format": "parquet", "url": s3.url("data/test")}}},
        "model": MODEL,
        "checkpoints": s3.url(f"{live}/epoch_*.pt"),
        "vog": {"windows": dict(WINDOWS), "label": "true", **vog},
        "compute": {"device": "cpu", "batch_size": 128, "actors": {"min": 1, "max": 1}},
        "storage": {"endpoint_url": s3.endpoint},
        "output": {"url": s3.url(out)},
        "report": {"enabled": False},
    }


def make_cfg(s3, out: str, live: str, **vog: Any):
    from vog_ray.config import validate

    return validate(config_dict(s3, out, live, **vog))


def publish_checkpoint(s3, src_key: str, live: str, epoch: int) -> None:
    """What a training run does: one more ``epoch_<n>.pt`` appears under the live prefix."""
    s3.client().copy_object(Bucket=s3.bucket, Key=f"{live}/epoch_{epoch}.pt",
                            CopySource={"Bucket": s3.bucket, "Key": src_key})


def key_of(s3, url: str) -> str:
    return url.split(f"s3://{s3.bucket}/", 1)[1]


def snapshot(s3) -> list[tuple[str, str, int, str]]:
    """Every object of the bucket with its ETag, size and modification time."""
    out = []
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        out.extend((o["Key"], o["ETag"], o["Size"], str(o["LastModified"])) for o in page.get("Contents", []))
    return sorted(out)


def scores(s3, out: str):
    from vog_ray.runs import open_run

    t = open_run(s3.url(out), s3.storage).scores()
    return t.sort_by([("split", "ascending"), ("id", "ascending")])


@pytest.fixture(scope="module")
def three_runs(s3, digits) -> dict[str, Any]:
    """Three incremental runs, one new checkpoint each, and one full audit over the three."""
    from vog_ray.distributed.incremental import read_state, run_incremental
    from vog_ray.distributed.audit import run_audit

    live, out = "run3/ckpt", "run3/inc"
    results, states = [], []
    for epoch, url in enumerate(digits["checkpoints"], start=1):
        publish_checkpoint(s3, key_of(s3, url), live, epoch)
        res = run_incremental(make_cfg(s3, out, live))
        assert res is not None, f"run {epoch}: a new checkpoint was there"
        results.append(res)
        states.append(read_state(s3.url(f"{out}/_incremental"), s3.storage))
    full = run_audit(make_cfg(s3, "run3/full", live))
    return {"live": live, "out": out, "results": results, "states": states, "full": full}


# --------------------------------------------------------------------------- equality with a full audit
def test_three_incremental_runs_equal_one_full_audit(s3, three_runs):
    results, states = three_runs["results"], three_runs["states"]
    for g, (res, st) in enumerate(zip(results, states), start=1):
        m = res.manifest
        assert m["mode"] == "incremental" and m["generation"] == g == st["generation"]
        assert m["num_checkpoints"] == g and len(st["checkpoints"]) == g
        assert [c.rsplit("/", 1)[1] for c in m["new_checkpoints"]] == [f"epoch_{g}.pt"]  # only the new one
        assert m["throughput"]["checkpoints_scored"] == 1
    # the previous generation's moments are gone; only the current one is kept
    gens = {k.split("/")[3] for k, *_ in snapshot(s3) if k.startswith(f"{three_runs['out']}/_incremental/gen-")}
    assert gens == {states[-1]["moments_url"].rstrip("/").split("/")[-2]}
    # the manifest says what the state takes: the bytes of its zstd Parquet files, float32 moments
    state = results[-1].manifest["state"]
    objs = [(k, size) for k, _, size, _ in snapshot(s3)
            if k.startswith(key_of(s3, states[-1]["moments_url"]) + "/") and k.endswith(".parquet")]
    assert objs and state["bytes"] == sum(size for _, size in objs)
    assert state["bytes_per_example"] == round(state["bytes"] / (N_TRAIN + N_TEST), 1)
    assert (state["dtype"], state["compression"]) == ("float32", "zstd")
    import pyarrow.parquet as pq

    fs, path = resolve_url(s3, states[-1]["moments_url"])
    with fs.open(fs.find(path)[0], "rb") as fh:
        md = pq.ParquetFile(fh).metadata
    assert {md.row_group(0).column(j).compression for j in range(md.num_columns)} == {"ZSTD"}

    inc, full = scores(s3, three_runs["out"]), scores(s3, "run3/full")
    assert inc.num_rows == full.num_rows == N_TRAIN + N_TEST
    assert inc["id"].to_pylist() == full["id"].to_pylist()
    assert inc["split"].to_pylist() == full["split"].to_pylist()
    a, b = inc["vog_all_logit"].to_numpy(), full["vog_all_logit"].to_numpy()
    assert np.all(b > 0)
    rel = np.max(np.abs(a - b) / np.abs(b))
    assert rel < 1e-6, f"vog_all_logit: max relative difference {rel:.3g}"
    # early = first:1 holds ONE checkpoint: the population std over one value is exactly 0 —
    # in the full audit and in the incremental state that kept it while epochs 2 and 3 arrived
    np.testing.assert_array_equal(inc["vog_early_logit"].to_numpy(), np.zeros(inc.num_rows))
    np.testing.assert_array_equal(full["vog_early_logit"].to_numpy(), np.zeros(full.num_rows))
    for col in ("z_all_logit", "score"):
        np.testing.assert_allclose(inc[col].to_numpy(), full[col].to_numpy(), rtol=1e-6, atol=1e-6)
    for col in ("rank", "class_rank", "decile", "pred", "target_label", "label"):
        assert inc[col].to_pylist() == full[col].to_pylist(), col
    sigs = [c for c in full.column_names if c.startswith("sig_")]
    assert sigs and sorted(sigs) == sorted(c for c in inc.column_names if c.startswith("sig_"))
    for c in sigs:
        a = np.stack(inc[c].to_numpy(zero_copy_only=False))
        b = np.stack(full[c].to_numpy(zero_copy_only=False))
        assert a.shape == b.shape == (N_TRAIN + N_TEST, EPOCHS), c
        if np.issubdtype(b.dtype, np.integer):
            np.testing.assert_array_equal(a, b, err_msg=c)
        else:  # the same forward pass of the same checkpoint: equal up to float32 rounding
            np.testing.assert_allclose(a, b, rtol=4 * np.finfo(np.float32).eps,
                                       atol=4 * np.finfo(np.float32).eps * max(1.0, float(np.abs(b).max())), err_msg=c)


def resolve_url(s3, url: str):
    from vog_ray.storage import resolve

    return resolve(url, s3.storage)


def test_float16_state_ranks_like_the_full_audit(s3, digits, three_runs):
    """``vog.state_dtype: float16`` (2 checkpoints folded, then the 3rd): the moments are stored,
    read back, merged and stored again in float16 — raw VoG within 2e-3 of the full audit's, ranks
    in the same order up to swaps of near-ties, and the state smaller than the float32 one."""
    from scipy.stats import spearmanr

    from vog_ray.distributed.incremental import run_incremental

    live, out = "run16/ckpt", "run16/inc"
    for epoch, url in enumerate(digits["checkpoints"], start=1):
        publish_checkpoint(s3, key_of(s3, url), live, epoch)
        if epoch >= 2:
            res = run_incremental(make_cfg(s3, out, live, state_dtype="float16"))
    assert res.manifest["generation"] == 2 and res.manifest["state"]["dtype"] == "float16"
    assert res.manifest["state"]["bytes"] < three_runs["results"][-1].manifest["state"]["bytes"]
    inc, full = scores(s3, out), scores(s3, "run3/full")
    assert inc["id"].to_pylist() == full["id"].to_pylist()
    a, b = inc["vog_all_logit"].to_numpy(), full["vog_all_logit"].to_numpy()
    assert np.max(np.abs(a - b) / b) < 2e-3
    assert spearmanr(inc["z_all_logit"].to_numpy(), full["z_all_logit"].to_numpy()).statistic > 0.9999


# --------------------------------------------------------------------------- nothing new
def test_fourth_run_without_new_checkpoint_writes_nothing(s3, three_runs):
    from vog_ray.distributed.incremental import read_state, run_incremental
    from vog_ray.runs import list_runs

    before = snapshot(s3)
    assert run_incremental(make_cfg(s3, three_runs["out"], three_runs["live"])) is None
    assert snapshot(s3) == before
    assert read_state(s3.url(f"{three_runs['out']}/_incremental"), s3.storage)["generation"] == 3
    assert len(list_runs(s3.url(three_runs["out"]), s3.storage)) == 3


def test_cli_up_to_date_exits_0_and_writes_nothing(s3, three_runs, tmp_path, capsys):
    from vog_ray.cli import main

    cfg = tmp_path / "scheduled.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(s3, three_runs["out"], three_runs["live"])))
    before = snapshot(s3)
    assert main(["audit", "--incremental", str(cfg)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert snapshot(s3) == before


def test_scheduled_audit_job_entrypoint_up_to_date(s3, three_runs, tmp_path):
    """``python jobs/scheduled_audit.py CONFIG`` (what the CronJob / RayCronJob run): exit 0, "up to
    date", nothing written; without a config: usage, exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "scheduled.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(s3, three_runs["out"], three_runs["live"])))
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
@pytest.mark.parametrize("vog, message", [
    ({"label": "predicted"}, "incremental audits require vog.label: true"),
    ({"windows": {"all": "all", "late": "last:2"}}, "late = 'last:2' moves with the newest checkpoint"),
    ({"windows": {"tail": "-2:"}}, "tail = '-2:' moves with the newest checkpoint"),
])
def test_refused_configs(s3, digits, tmp_path, capsys, vog, message):
    from vog_ray.cli import main
    from vog_ray.distributed.incremental import IncrementalError, run_incremental

    publish_checkpoint(s3, key_of(s3, digits["checkpoints"][0]), "refused/ckpt", 1)
    before = snapshot(s3)
    with pytest.raises(IncrementalError, match=message.replace("(", r"\(")):
        run_incremental(make_cfg(s3, "refused/out", "refused/ckpt", **vog))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config_dict(s3, "refused/out", "refused/ckpt", **vog)))
    assert main(["audit", "--incremental", str(cfg)]) == 1
    assert message in capsys.readouterr().err
    assert snapshot(s3) == before  # refused before anything is written


# --------------------------------------------------------------------------- two runs at once
def test_two_concurrent_runs_one_publishes(s3, digits):
    from vog_ray.distributed.incremental import LockHeld, read_state, run_incremental
    from vog_ray.runs import list_runs

    live, out = "race/ckpt", "race/inc"
    publish_checkpoint(s3, key_of(s3, digits["checkpoints"][0]), live, 1)
    barrier = threading.Barrier(2)
    outcome: dict[int, Any] = {}

    def go(i: int) -> None:
        cfg = make_cfg(s3, out, live)
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
    assert state["generation"] == 1 and len(state["checkpoints"]) == 1
    assert list_runs(s3.url(out), s3.storage) == [published[0].run_id]
    assert [k for k, *_ in snapshot(s3) if k.endswith("/_incremental/lock")] == []  # released
    assert run_incremental(make_cfg(s3, out, live)) is None  # and a rerun is up to date


# --------------------------------------------------------------------------- changed checkpoints
def test_changed_folded_checkpoint_is_an_error(s3, digits, three_runs):
    from vog_ray.distributed.incremental import IncrementalError, run_incremental

    live, out = three_runs["live"], three_runs["out"]
    original = s3.client().get_object(Bucket=s3.bucket, Key=f"{live}/epoch_1.pt")["Body"].read()
    try:
        publish_checkpoint(s3, key_of(s3, digits["other"]), live, 1)  # epoch_1 overwritten
        before = snapshot(s3)
        # same number of checkpoints (the "up to date" path) ...
        with pytest.raises(IncrementalError, match=r"checkpoint 0 changed since it was folded in: was .*epoch_1\.pt"):
            run_incremental(make_cfg(s3, out, live))
        # ... and with a new one pending (the path under the lock)
        publish_checkpoint(s3, key_of(s3, digits["checkpoints"][2]), live, 4)
        with pytest.raises(IncrementalError, match=r"checkpoint 0 changed .*epoch_1\.pt"):
            run_incremental(make_cfg(s3, out, live))
        after = [o for o in snapshot(s3) if not o[0].endswith("epoch_4.pt")]
        assert after == before  # nothing written, the lock released
    finally:
        s3.client().put_object(Bucket=s3.bucket, Key=f"{live}/epoch_1.pt", Body=original)
        s3.client().delete_object(Bucket=s3.bucket, Key=f"{live}/epoch_4.pt")


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
