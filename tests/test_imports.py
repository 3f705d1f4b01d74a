"""Import hygiene: what does not compute gradients does not import torch.

* in a fresh interpreter: ``import vog_ray.config`` / ``vog_ray.runs`` / the reduce's modules, and
  ``vog-ray validate CONFIG`` / ``vog-ray runs URL`` run to the end, leave ``torch`` out of
  ``sys.modules``;
* the reduce on Ray (``distributed.audit.reduce_and_publish``: read, id check, exact class sums,
  normalise, sample sort, ranks, the published tables) and the per-example merge of partial
  moments (``distributed.merge.merge_by_example``) run in Ray workers none of which imports torch.
  A fresh local Ray whose every worker runs a setup hook (``runtime_env``) that records the worker
  and any import of torch in it, with the stack that asked for it; a worker that imports torch on
  purpose at the end shows that the hook sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _fresh(code: str, cwd: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd or REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["vog_ray", "vog_ray.config", "vog_ray.runs", "vog_ray.storage",
                                    "vog_ray.distributed.reduce", "vog_ray.distributed.sort",
                                    "vog_ray.distributed.merge", "vog_ray.core.ranking", "vog_ray.core.classes"])
def test_module_imports_without_torch(module):
    got = _fresh(f"import json, sys, {module}; print(json.dumps({{'torch': 'torch' in sys.modules}}))")
    assert got == {"torch": False}


def test_validate_and_runs_commands_without_torch(tmp_path):
    from vog_ray.runs import publish, write_json

    cfg = tmp_path / "audit.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"splits": {"train": {"format": "parquet", "url": str(tmp_path / "data")}}},
        "model": "lenet", "checkpoints": str(tmp_path / "ckpt" / "*.pt"), "output": {"url": str(tmp_path / "out")}}))
    write_json(str(tmp_path / "out" / "runs" / "r1" / "manifest.json"), {"run_id": "r1"})
    publish(str(tmp_path / "out" / "runs" / "r1"), str(tmp_path / "out"), "r1")
    code = """
import contextlib, io, json, sys
from vog_ray.cli import main
out = {}
for name, argv in (("validate", ["validate", %r]), ("runs", ["runs", %r])):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out[name] = main(argv)
    out[name + "_out"] = buf.getvalue()
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
""" % (str(cfg), str(tmp_path / "out"))
    got = _fresh(code)
    assert got["validate"] == 0 and json.loads(got["validate_out"])["model"] == "lenet"
    assert got["runs"] == 0 and got["runs_out"].split() == ["r1"]
    assert got["torch"] is False


# ------------------------------------------------------------------ the reduce's Ray workers
def _raw_table(path: Path, rows: int, files: int) -> dict[str, int]:
    """A raw per-example table (two splits, four classes) as stage 1 writes it; rows per split."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    split = np.where(rng.random(rows) < 0.7, "train", "test")
    label = rng.integers(0, 4, rows)
    t = pa.table({"id": [f"ex{i:05d}" for i in range(rows)], "split": split, "label": label,
                  "target_label": label, "pred": label, "correct": np.ones(rows, bool),
                  "status": ["ok"] * (rows - 3) + ["bad_shape"] * 3,
                  "vog_all_logit": rng.gamma(2.0, 1.0, rows), "vog_all_softmax": rng.gamma(2.0, 1.0, rows)})
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        pq.write_table(t.take(pa.array(part)), path / f"part-{i}.parquet")
    return {s: int((split == s).sum()) for s in ("train", "test")}


def _moment_rows(examples: int, groups: int) -> pa.Table:
    """Partial moment rows (one per example and checkpoint group), as checkpoint-sharded scoring emits."""
    from vog_ray.core.options import SIGNALS
    from vog_ray.distributed.merge import fixed_size_list

    rng = np.random.default_rng(1)
    n, pixels = examples * groups, 6
    cols = {"id": [f"ex{i // groups:04d}" for i in range(n)], "split": ["train"] * n,
            "label": np.zeros(n, np.int64), "status": ["ok"] * n, "group": np.tile(np.arange(groups), examples),
            "target_label": np.zeros(n, np.int64), "pred": np.zeros(n, np.int64),
            "mn_all_logit": np.full(n, 2, np.int64),
            "mmean_all_logit": fixed_size_list(rng.normal(size=(n, pixels))),
            "mm2_all_logit": fixed_size_list(rng.random((n, pixels)))}
    for s in SIGNALS:
        cols[f"sig_{s}"] = fixed_size_list(rng.normal(size=(n, 2)))
    return pa.table(cols)


def _torch_watch(report_dir: str):
    """The workers' setup hook: mark the worker, and record every import of torch in it (with the
    stack that asked), without stopping it."""

    def hook():
        import os
        import sys
        import traceback

        pid = os.getpid()
        with open(f"{report_dir}/worker-{pid}", "w") as f:
            f.write("torch already imported" if "torch" in sys.modules else "")

        class TorchWatch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    with open(f"{report_dir}/torch-{pid}", "a") as f:
                        f.write("".join(traceback.format_stack()))
                return None

        sys.meta_path.insert(0, TorchWatch())

    return hook


@pytest.mark.slow
@pytest.mark.integration
def test_reduce_tasks_run_in_workers_that_never_import_torch(tmp_path, monkeypatch):
    import ray
    import ray.data

    from vog_ray.config import validate
    from vog_ray.distributed import reduce as reduce_mod
    from vog_ray.distributed import validate as validate_mod
    from vog_ray.distributed.audit import Plan, reduce_and_publish
    from vog_ray.distributed.merge import merge_by_example

    real_ray_map = validate_mod.ray_map
    report = tmp_path / "workers"
    report.mkdir()
    if ray.is_initialized():  # another module's Ray: its workers may have run a scorer
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _torch_watch(str(report))})
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        rows_in = _raw_table(tmp_path / "raw", rows=600, files=4)
        cfg = validate({"data": {"splits": {"train": {"format": "npz", "url": "x", "id_column": "id"},
                                            "test": {"format": "npz", "url": "y"}}},
                        "model": "lenet", "checkpoints": "unused", "output": {"url": str(tmp_path / "out")},
                        "vog": {"windows": {"all": "all"}, "targets": ["logit", "softmax"]},
                        "report": {"enabled": False}})
        plan = Plan(cfg, cfg.storage.options(), cfg.vog.options(), ["a", "b", "c"], [], {"all": [0, 1, 2]},
                    ["all_logit", "all_softmax"], "all_logit", str(tmp_path / "out"), rows_in)
        # several read tasks and sort partitions on 600 rows: every step of the sort runs as tasks
        monkeypatch.setattr(reduce_mod, "partitions_for", lambda n, per=0: 3)
        # the publishing gate as Ray tasks (a run this small is otherwise checked in the driver):
        # its tasks also run in these workers; the synthetic raw table has no source to read
        # again, so it checks the tables only
        monkeypatch.setattr(validate_mod, "LOCAL_ROWS", 0)
        calls = []
        monkeypatch.setattr(validate_mod, "ray_map", lambda fn, args: calls.append(len(args))
                            or real_ray_map(fn, args))
        res = reduce_and_publish(plan, str(tmp_path / "raw"), run_id="r", t0=0.0, score_wall=1.0, extra={},
                                 report=False, verify_source=False)
        assert res.manifest["rows"] == {"in": 600, "scored": 597, "rejected": 3}
        assert calls and sum(calls) >= 2, calls                  # the gate's summaries ran as tasks
        scores = pq.read_table(str(tmp_path / "out" / "runs" / "r" / "scores")).to_pandas()
        for split, ranks in scores.groupby("split")["rank"]:
            assert sorted(ranks) == list(range(1, res.manifest["splits"][split]["rows_scored"] + 1))
        merged = merge_by_example(ray.data.from_arrow(_moment_rows(examples=40, groups=2)), ["all_logit"], 2, 80)
        assert merged.count() == 40

        workers = sorted(p.name for p in report.glob("worker-*"))
        torch_imports = {p.name: p.read_text()[-3000:] for p in report.glob("torch-*")}
        assert len(workers) >= 2, workers          # the tasks ran in workers that ran the hook
        assert not [w for w in workers if (report / w).read_text()], workers
        assert torch_imports == {}, torch_imports

        @ray.remote
        def imports_torch() -> int:
            import torch  # noqa: F401

            return os.getpid()

        pid = ray.get(imports_torch.remote())       # the hook sees an import of torch when there is one
        assert "imports_torch" in (report / f"torch-{pid}").read_text()
    finally:
        ray.shutdown()
