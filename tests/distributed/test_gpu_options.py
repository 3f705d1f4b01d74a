"""The GPU fast path's config and audit plumbing, on the CPU: ``compute.precision`` / ``compile`` /
``channels_last`` / ``batches_per_call`` and ``transform.decode_on`` in the config; the work key
(another precision never resumes fp32 work; fp32 keeps the key it had); the audit's precision
record from the actors' first-batch checks (warnings for the windows measured unsafe); and one
bf16 audit on local Ray whose actors write that check and whose manifest carries it."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest

from vog_ray.config import ConfigError, validate
from vog_ray.distributed.stage import precision_record, work_key

BASE = {"data": {"splits": {"s": {"format": "parquet", "url": "/nowhere"}}}, "model": "lenet",
        "checkpoints": "/nowhere/*.pt", "output": {"url": "/nowhere/out"}}


def cfg(**compute):
    return validate({**BASE, "compute": compute})


def test_config_keys_and_their_errors():
    c = cfg().compute
    assert (c.precision, c.compile, c.channels_last, c.batches_per_call) == ("fp32", False, "auto", None)
    assert c.engine_options() == {"stacked": False, "precision": "fp32", "compile": False, "channels_last": None}
    assert c.calls_of(1.0) == 4 and c.calls_of(0.0) == 1 and cfg(batches_per_call=2).compute.calls_of(1.0) == 2
    assert cfg(channels_last=False).compute.engine_options()["channels_last"] is False  # YAML off
    assert cfg(precision="bf16", compile=True).compute.engine_options()["compile"] is True
    with pytest.raises(ConfigError, match="compute.precision"):
        cfg(precision="fp16")
    with pytest.raises(ConfigError, match="compile"):
        cfg(compile=True, stack_checkpoints="on")
    bad = {**BASE, "data": {**BASE["data"], "transform": {"decode_on": "tpu"}}}
    with pytest.raises(ConfigError, match="data.transform.decode_on"):
        validate(bad)


class _Info:
    def __init__(self, sha):
        self.sha256 = sha


def test_work_key_separates_precisions_and_keeps_fp32s():
    """tf32/bf16 work never resumes into fp32 work (or each other's); an fp32 key is the key the
    audit used before precisions existed, and execution options that change no number keep it."""
    infos = [_Info("a" * 64), _Info("b" * 64)]
    inputs = {"train": {"sha256": "c" * 64}}
    fp32 = cfg()
    d = fp32.to_dict()
    d.pop("output"), d.pop("report"), d.pop("flags", None)
    d["vog"].pop("normalize_against", None)
    d["compute"] = {"checkpoint_groups": 1}
    old = hashlib.sha256(json.dumps({"cfg": d, "ck": [i.sha256 for i in infos], "inputs": {"train": "c" * 64}},
                                    sort_keys=True).encode()).hexdigest()[:16]
    assert work_key(fp32, infos, inputs) == old  # an fp32 audit still resumes the work of before
    keys = {work_key(cfg(precision=p), infos, inputs) for p in ("fp32", "tf32", "bf16")}
    assert len(keys) == 3
    assert work_key(cfg(compile=True, batches_per_call=2), infos, inputs) == old  # same numbers: same work


def write_check(root, name, keys, device="cuda:0", rows=128, seconds=0.5):
    (root / name).write_text(json.dumps({"precision": "bf16", "device": device, "group": 0, "rows": rows,
                                         "seconds": seconds, "keys": keys}))


def test_precision_record_takes_the_worst_actor_and_warns_per_unsafe_key(tmp_path, caplog):
    f = lambda rho, n=128: {"n": n, "max_abs_dz": 0.1, "spearman": rho, "top_decile_overlap": 0.9}  # noqa: E731
    write_check(tmp_path, "actor-1-0.json", {"early_logit": f(0.999), "late_logit": f(0.995)})
    write_check(tmp_path, "actor-2-0.json", {"early_logit": f(0.998), "late_logit": f(0.97)})
    with caplog.at_level(logging.WARNING, logger="vog_ray"):
        rec = precision_record(cfg(precision="bf16"), str(tmp_path), None)
    assert rec["mode"] == "bf16" and rec["devices"] == ["cuda"] and rec["checked_rows"] == 256
    assert "CUDA autocast" in rec["effect"]["cuda"]
    assert rec["check"]["early_logit"]["spearman"] == 0.998 and rec["check"]["late_logit"]["spearman"] == 0.97
    assert rec["unsafe"] == ["late_logit"] and rec["check_seconds"] == 1.0
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "late_logit" in warned[0] and "0.9700" in warned[0] and "fp32" in warned[0]
    assert precision_record(cfg(), str(tmp_path), None) == {"mode": "fp32"}
    # tf32 on CPU actors: said to have had no effect
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    write_check(cpu, "actor-3-0.json", {"all_logit": f(1.0)}, device="cpu")
    rec = precision_record(cfg(precision="tf32"), str(cpu), None)
    assert rec["unsafe"] == [] and "no effect" in rec["effect"]["cpu"]


@pytest.mark.slow
@pytest.mark.integration
def test_bf16_audit_checks_its_first_batches_against_fp32(tiny_digits, shared_ray, tmp_path):
    """A bf16 audit on local Ray (CPU autocast): every actor writes its first-batch check and the
    manifest carries the worst Spearman per window; the scores stay close to an fp32 audit's."""
    import pyarrow.parquet as pq

    from vog_ray.distributed.audit import run_audit
    from vog_ray.testing.writers import write_parquet_split

    write_parquet_split(str(tmp_path / "data"), tiny_digits.imgs[600:760], tiny_digits.labels[600:760],
                        rows_per_file=80)
    splits = {"test": {"format": "parquet", "url": str(tmp_path / "data")}}
    vog = {"windows": {"early": "first:2", "all": "all"}, "targets": ["logit", "softmax"]}
    runs = {}
    for p in ("fp32", "bf16"):
        c = tiny_digits.config(splits, str(tmp_path / f"out_{p}"), vog=vog,
                               compute={"batch_size": 40, "precision": p, "actors": {"min": 1, "max": 1},
                                        "cpus_per_actor": 1})
        runs[p] = run_audit(validate(c), report=False)
    m = runs["bf16"].manifest
    rec = m["precision"]
    assert rec["mode"] == "bf16" and rec["devices"] == ["cpu"]
    assert set(rec["check"]) == {f"{w}_{t}" for w in ("early", "all") for t in ("logit", "softmax")}
    assert rec["checked_rows"] == 40 and rec["check_seconds"] > 0
    assert all(-1 <= f["spearman"] <= 1 and f["n"] == 40 for f in rec["check"].values())
    assert rec["unsafe"] == [k for k, f in rec["check"].items() if f["spearman"] < rec["threshold_spearman"]]
    assert runs["fp32"].manifest["precision"] == {"mode": "fp32"}
    z = {p: pq.read_table(r.run_url + "/scores").sort_by("id").column("z_all_logit").to_numpy() for p, r in runs.items()}
    rho = np.corrcoef(np.argsort(np.argsort(z["fp32"])), np.argsort(np.argsort(z["bf16"])))[0, 1]
    assert 0.8 < rho < 1.0  # close to fp32's ranking, and not the same computation
