"""The scorer actor takes ``compute.stack_checkpoints`` from the config to the engine: an audit
with ``on`` runs every batch on the stacked (vmapped) path — the actors' trace says so — and gives
the numbers of an audit with ``off`` (one checkpoint after the other) within 1e-6."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.rayenv import start_test_ray

# own_ray: its workers get VOG_RAY_TRACE_DIR (runs after the modules on the shared Ray)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_ray]

N_ROWS = 160


def _trace_lines(trace_dir) -> list[dict]:
    lines = [json.loads(line) for p in sorted(trace_dir.glob("scorer-*.jsonl")) for line in p.read_text().splitlines()]
    for p in trace_dir.glob("scorer-*.jsonl"):
        p.unlink()
    return lines


def test_stack_checkpoints_reaches_the_engine_and_changes_no_number(tiny_digits, tmp_path):
    import ray

    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit
    from vog_ray.runs import open_run
    from vog_ray.testing.writers import write_parquet_split

    trace = tmp_path / "trace"
    trace.mkdir()
    write_parquet_split(str(tmp_path / "data"), tiny_digits.imgs[:N_ROWS], tiny_digits.labels[:N_ROWS],
                        rows_per_file=80)
    start_test_ray({"VOG_RAY_TRACE_DIR": str(trace)})
    try:
        tables, traces = {}, {}
        for mode in ("off", "on"):
            cfg = validate(tiny_digits.config({"train": {"format": "parquet", "url": str(tmp_path / "data")}},
                                              str(tmp_path / f"out-{mode}"),
                                              vog={"windows": {"all": "all", "late": "last:2"},
                                                   "targets": ["logit", "softmax"]},
                                              compute={"device": "cpu", "batch_size": 40, "stack_checkpoints": mode,
                                                       "actors": {"min": 1, "max": 1}, "cpus_per_actor": 0.5}))
            res = run_audit(cfg)
            tables[mode] = open_run(res.run_url).scores().sort_by("id")
            traces[mode] = _trace_lines(trace)
    finally:
        ray.shutdown()
    assert traces["off"] and {t["stacked"] for t in traces["off"]} == {False}
    assert traces["on"] and {t["stacked"] for t in traces["on"]} == {True}
    assert sum(t["rows"] for t in traces["on"]) == N_ROWS
    off, on = tables["off"], tables["on"]
    assert off["id"].equals(on["id"]) and off.num_rows == N_ROWS
    worst = 0.0
    for c in off.column_names:
        a, b = off[c].to_numpy(zero_copy_only=False), on[c].to_numpy(zero_copy_only=False)
        if c.startswith("vog_"):   # raw VoG > 0: relative
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=0, err_msg=c)
            worst = max(worst, float(np.max(np.abs(b - a) / a)))
        elif c.startswith("z_") or c == "score":
            # z crosses 0: within 1e-5 of the largest |z| — z = (VoG - m) / s turns a relative error
            # e of raw VoG into an absolute one of e·VoG/s (VoG/s ~ 3–10 here; measured up to 1.2e-6
            # of the largest |z| for the softmax target)
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max(), err_msg=c)
    assert off["pred"].equals(on["pred"]) and off["target_label"].equals(on["target_label"])
    print(f"stack_checkpoints on vs off: max relative difference of raw VoG {worst:.2e}")
