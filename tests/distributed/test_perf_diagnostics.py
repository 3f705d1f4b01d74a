"""Performance diagnostics: the scorer actor's per-batch trace (``VOG_RAY_TRACE_DIR``) and the
steady-state rate ``bench/pipeline.py`` derives from it (the actor class called directly, no Ray;
the estimator on hand-made timelines whose answer is known); the CPU-layout hint."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from vog_ray.models import build_model
from vog_ray.distributed.scorer import ScorerActor

BENCH = Path(__file__).resolve().parents[2] / "bench" / "pipeline.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_pipeline", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def batch(n: int, seed: int) -> pa.Table:
    """A decoded batch as the scorer receives it (Arrow, ``x`` a tensor column)."""
    from ray.data.extensions import ArrowTensorArray

    rng = np.random.default_rng(seed)
    return pa.table({"id": [f"x{i}" for i in range(n)], "split": ["train"] * n,
                     "label": pa.array(rng.integers(0, 10, n), pa.int64()), "status": ["ok"] * n,
                     "x": ArrowTensorArray.from_numpy(rng.normal(size=(n, 1, 28, 28)).astype(np.float32))})


def test_scorer_actor_writes_one_trace_line_per_batch(tmp_path, monkeypatch, save_checkpoints):
    torch.manual_seed(0)
    glob = save_checkpoints([build_model("lenet").state_dict() for _ in range(3)])
    urls = sorted(str(p) for p in Path(glob).parent.glob("ckpt_*.pt"))
    kw = dict(model="lenet", checkpoints=urls, indices=[0, 1, 2], num_checkpoints=3,
              vog={"windows": {"all": "all"}, "targets": ["logit"]}, device="cpu", storage={}, threads=1)
    plain = ScorerActor(**kw)
    monkeypatch.setenv("VOG_RAY_TRACE_DIR", str(tmp_path))
    traced = ScorerActor(**kw)
    t_before = time.time()
    for n, seed in [(7, 0), (20, 1), (1, 2)]:
        b = batch(n, seed)
        assert traced(b).equals(plain(b))  # tracing changes nothing in the output
    files = list(tmp_path.glob("scorer-*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(s) for s in files[0].read_text().splitlines()]
    assert [e["rows"] for e in lines] == [7, 20, 1]
    for e in lines:
        assert t_before <= e["start"] < e["end"] <= time.time()
        assert 0 < e["engine_s"] <= e["end"] - e["start"]
        assert e["group"] == 0


def test_steady_state_window_is_where_every_actor_is_in_flight():
    ss = bench_module().steady_state
    # actor a: five 1-s batches of 100 rows ending at 1..5; b starts late and runs dry early:
    # batches of 50 rows ending at 1.5, 2.5, 3.5. Window (1.5, 3.5]: a's batches ending at 2, 3 and
    # b's at 2.5, 3.5 -> 300 rows in 2 s, × k = 4 checkpoints.
    ev = [{"actor": "a", "start": t - 1, "end": t, "rows": 100, "engine_s": 0.9} for t in (1, 2, 3, 4, 5)]
    ev += [{"actor": "b", "start": t - 1, "end": t, "rows": 50, "engine_s": 0.5} for t in (1.5, 2.5, 3.5)]
    r = ss(ev, k=4)
    assert r["rate"] == pytest.approx(300 * 4 / 2.0)
    assert (r["window_s"], r["window_rows"], r["actors"]) == (2.0, 300, 2)
    assert r["busy"] == pytest.approx(1.0)
    assert r["engine_share"] == pytest.approx((5 * 0.9 + 3 * 0.5) / 8)
    # one actor idle half of the time between its batches: busy 75 % over two actors
    ev2 = [{"actor": "a", "start": t - 1, "end": t, "rows": 10, "engine_s": 1} for t in (1, 2, 3)]
    ev2 += [{"actor": "b", "start": t - 0.5, "end": t, "rows": 10, "engine_s": 0.5} for t in (1, 2, 3)]
    r2 = ss(ev2, k=1)
    assert r2["rate"] == pytest.approx(40 / 2.0) and r2["busy"] == pytest.approx(0.75)


@pytest.mark.parametrize("cpus,groups", [(2, 1), (3, 1), (16, 1), (16, 2), (64, 3)])
def test_cpu_layout_hint_suggests_a_pool_the_audit_accepts(cpus, groups):
    import re

    from vog_ray.config import ComputeSpec
    from vog_ray.distributed.cluster import check_cpus_left, cpu_layout_hint

    hint = cpu_layout_hint(ComputeSpec(checkpoint_groups=groups), cpus, groups)  # defaults: 1 actor × 1 thread
    m = re.search(r"min: (\d+), max: (\d+)\}, compute.cpus_per_actor: ([\d.]+), compute.threads_per_actor: 1", hint)
    assert m, hint
    n, cpa = int(m.group(1)), float(m.group(3))
    assert n * groups <= cpus and n * groups >= cpus - groups + 1  # one actor per core (as groups divide)
    suggested = ComputeSpec(actors={"min": n, "max": n}, cpus_per_actor=cpa, threads_per_actor=1,
                            checkpoint_groups=groups)
    check_cpus_left(suggested, cpus, groups)  # not refused
    assert cpu_layout_hint(suggested, cpus, groups) is None


def test_cpu_layout_hint_is_silent_when_the_cores_are_used():
    from vog_ray.config import ComputeSpec
    from vog_ray.distributed.cluster import cpu_layout_hint

    assert cpu_layout_hint(ComputeSpec(), 1) is None
    assert cpu_layout_hint(ComputeSpec(actors={"min": 1, "max": 4}, cpus_per_actor=1), 4) is None
    assert cpu_layout_hint(ComputeSpec(threads_per_actor=8), 8) is None
    assert cpu_layout_hint(ComputeSpec(gpu_wait_s=60), 8) is None  # autoscaling: no decision from today's CPUs
    assert "2 CPUs" in cpu_layout_hint(ComputeSpec(), 2)
