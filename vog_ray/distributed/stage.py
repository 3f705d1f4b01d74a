"""Stage 1 (score): read every split → decode/normalise (CPU tasks) → scorer actors (GPU or CPU,
an autoscaling pool) → the raw per-example table, written as Parquet under the audit's work
prefix ``<output>/_work/<key>/`` (:func:`work_key`), from which a crashed run resumes.

* **Fused** (default): one actor holds every checkpoint; only per-example scalars leave it.
* **Checkpoint-sharded** (``compute.checkpoint_groups: G``): G groups of actors each emit
  per-example partial pixel moments; :func:`merge_sharded` merges them by example id (Chan, in
  group order) into the fused raw table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..storage import resolve
from .cluster import check_cpus_left, cpu_layout_hint, scorer_gpus
from .merge import merge_by_example, moments_to_table
from .reduce import RAW_ROWS_PER_READ, filter_status, read_raw, rejected_of_group0
from .scorer import ScorerActor
from .sort import partitions_for

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AuditConfig
    from ..models.checkpoints import CheckpointInfo
    from .audit import Plan

__all__ = ["score_stage", "merge_sharded", "checkpoint_groups", "work_key"]

log = logging.getLogger("vog_ray")


def work_key(cfg: "AuditConfig", ckpts: list["CheckpointInfo"]) -> str:
    """Identity of an audit's stage-1 work: same config + same checkpoints ⇒ resumable."""
    d = cfg.to_dict()
    d.pop("output", None)
    d.pop("report", None)
    d["compute"] = {"checkpoint_groups": cfg.compute.checkpoint_groups}
    payload = json.dumps({"cfg": d, "ck": [c.sha256 for c in ckpts]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def checkpoint_groups(num_checkpoints: int, groups: int) -> list[list[int]]:
    """Split checkpoint indices into ``groups`` contiguous, near-equal groups."""
    groups = max(1, min(groups, num_checkpoints))
    bounds = np.linspace(0, num_checkpoints, groups + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(groups)]


def score_stage(plan: "Plan", groups: list[list[int]], emit: str, out_url: str, *, done: Any = None,
                mode: str = "overwrite", moment_dtype: str | None = None,
                write_args: dict[str, Any] | None = None) -> None:
    """Read → decode → scorer actors for each checkpoint group → Parquet at ``out_url``.

    ``done`` (resume, :mod:`.resume`): sorted ``split/id`` keys of rows already in ``out_url``;
    they are dropped right after the read and the new rows appended (``mode``). ``moment_dtype``
    (``emit="moments"``): how partial moments are stored (default: ``vog.accum_dtype``, which
    loses nothing); ``write_args``: Parquet writer options (codec, encodings; default: Ray Data's).
    """
    import ray
    import ray.data

    from ..data.dataset import dataset_from_config
    from ..data.decode import decode

    cfg = plan.cfg
    gpus = scorer_gpus(cfg)
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    check_cpus_left(cfg.compute, cluster_cpus, len(groups))
    if not gpus:
        hint = cpu_layout_hint(cfg.compute, cluster_cpus, len(groups))
        if hint:
            log.warning(hint)
    storage_kwargs = dataclasses.asdict(plan.storage)  # the actors open checkpoints as the driver does
    parts = []
    for gi, idx in enumerate(groups):
        ds = dataset_from_config(cfg, plan.storage)
        if done is not None:
            from .resume import skip_done

            ds = ds.map_batches(skip_done, fn_kwargs={"done": done}, batch_format="pyarrow", batch_size=None,
                                zero_copy_batch=True)
        ds = decode(ds, cfg)
        ap = cfg.compute.actors
        pool = ray.data.ActorPoolStrategy(min_size=ap.min, max_size=ap.max, max_tasks_in_flight_per_actor=ap.tasks_in_flight)
        remote_args: dict[str, Any] = {"num_cpus": cfg.compute.cpus_per_actor}
        if gpus:
            remote_args["num_gpus"] = gpus
        parts.append(ds.map_batches(
            ScorerActor, compute=pool, batch_size=cfg.compute.batch_size, batch_format="numpy",
            fn_constructor_kwargs=dict(model=cfg.model, checkpoints=plan.urls, indices=idx,
                                       num_checkpoints=plan.K, vog=plan.opts.as_kwargs(), device=cfg.compute.device,
                                       storage=storage_kwargs, emit=emit, group=gi,
                                       threads=cfg.compute.threads_per_actor,
                                       stacked=cfg.compute.stacked_option(),
                                       moment_dtype=moment_dtype or plan.opts.accum_dtype),
            **remote_args))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    fs, _ = resolve(out_url, plan.storage)
    ds.write_parquet(out_url, filesystem=fs, mode=mode, **(write_args or {}))


def merge_sharded(plan: "Plan", parts_url: str, raw_url: str, num_groups: int) -> None:
    """Merge per-group partial moments by example id into the fused raw table."""
    fs, _ = resolve(parts_url, plan.storage)
    n = sum(plan.rows_in.values()) * num_groups
    allp, _, _ = read_raw(parts_url, plan.storage, partitions_for(n, RAW_ROWS_PER_READ))
    ok = allp.map_batches(filter_status, fn_kwargs={"ok": True}, batch_format="pyarrow")
    bad = allp.map_batches(rejected_of_group0, batch_format="pyarrow")
    merged = merge_by_example(ok, plan.keys, num_groups, n)
    out = bad if merged is None else merged.map_batches(moments_to_table, fn_kwargs={"vog_keys": plan.keys},
                                                        batch_format="pyarrow").union(bad)
    out.write_parquet(raw_url, filesystem=fs, mode="overwrite")



def run_stage(plan: "Plan", groups: list[list[int]], work_url: str) -> tuple[dict[str, Any], bool]:
    """Stage 1 into ``<work_url>/raw`` unless a finished one is there (its ``_SUCCESS``), keeping
    the finished blocks of an interrupted run (fused mode; :mod:`.resume`). Returns the stage's
    record (wall time, rows, what resume kept) and whether it was reused whole."""
    import time

    from ..runs import SUCCESS
    from ..storage import join
    from .resume import PartialRaw, count_new_rows, scan_partial_raw

    sharded = len(groups) > 1
    raw_url = join(work_url, "raw")
    fs_raw, raw_path = resolve(raw_url, plan.storage)
    done_marker = raw_path + "/" + SUCCESS
    t_score = time.time()
    if fs_raw.exists(done_marker):
        with fs_raw.open(done_marker, "r") as f:
            stage1 = json.load(f)
        stage1["resume"] = {"rows_scored_now": 0, "rows_from_earlier": stage1.get("rows"), "files_removed": 0}
        return stage1, True
    partial = scan_partial_raw(fs_raw, raw_path) if not sharded else PartialRaw()
    if not partial.files and fs_raw.exists(raw_path):
        fs_raw.rm(raw_path, recursive=True)
    if sharded:
        parts_url = join(work_url, "parts")
        score_stage(plan, groups, "moments", parts_url)
        merge_sharded(plan, parts_url, raw_url, len(groups))
        fs_raw.rm(resolve(parts_url, plan.storage)[1], recursive=True)
    elif partial.rows < sum(plan.rows_in.values()):
        if partial.files:
            log.info("resuming stage 1: %d rows in %d files from an earlier run are kept (%d half-written "
                     "files removed)", partial.rows, len(partial.files), len(partial.removed))
        score_stage(plan, groups, "vog", raw_url, done=partial.done,
                    mode="append" if partial.files else "overwrite")
    now = count_new_rows(fs_raw, raw_path, partial.files)
    stage1 = {"wall_time_s": time.time() - t_score, "rows": partial.rows + now,
              "resume": {"rows_scored_now": now, "rows_from_earlier": partial.rows,
                         "files_removed": len(partial.removed)}}
    with fs_raw.open(done_marker, "w") as f:
        json.dump(stage1, f)
    return stage1, False
