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
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..storage import resolve
from .cluster import check_cpus_left, cpu_layout_hint, scorer_gpus
from .devices import collect_ledger, device_report, start_ledger
from .lock import DirLock
from .merge import merge_by_example, moments_to_table
from .reduce import RAW_ROWS_PER_READ, filter_status, read_raw, rejected_of_group0
from .scorer import ScorerActor
from .sort import partitions_for

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AuditConfig
    from ..models.checkpoints import CheckpointInfo
    from .audit import Plan

__all__ = ["score_stage", "merge_sharded", "checkpoint_groups", "work_key", "run_stage", "WorkLock",
           "raw_write_args", "read_precision_checks", "precision_record", "PRECISION_CHECKS"]

PRECISION_CHECKS = "precision_check"  # the folder of the actors' precision checks under the work prefix

log = logging.getLogger("vog_ray")


def work_key(cfg: "AuditConfig", ckpts: list["CheckpointInfo"], inputs: dict[str, Any]) -> str:
    """Identity of an audit's stage-1 work: same config, same checkpoints (sha256) and same input
    files (per split the digest of every file's path, size and version: ``data.identity``) ⇒
    resumable. Rewriting a split in place changes the key, so its rows are scored afresh."""
    d = cfg.to_dict()
    d.pop("output", None)
    d.pop("report", None)
    d.pop("flags", None)   # flags are applied when the run is published: stage 1 does not change
    d["vog"].pop("normalize_against", None)  # the reduce's choice: stage 1 computes the same rows
    d["compute"] = {"checkpoint_groups": cfg.compute.checkpoint_groups}
    if cfg.compute.precision != "fp32":  # other arithmetic, other results: never resumed into fp32 work
        d["compute"]["precision"] = cfg.compute.precision
    payload = json.dumps({"cfg": d, "ck": [c.sha256 for c in ckpts],
                          "inputs": {s: v["sha256"] for s, v in inputs.items()}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# the raw table's columns whose values repeat: Parquet dictionary pages for them (and the carried
# columns) only — for ids and floats a dictionary is built, found useless and dropped for plain
# pages, which halves the write of a 512-row block (1.8 -> 0.8 ms) and saves no byte
RAW_DICTIONARY = ("split", "status", "label", "target_label", "pred", "correct")


def raw_write_args(carried: Any) -> dict[str, Any]:
    """How stage 1 writes the raw table's files (``carried``: the carried columns' names)."""
    return {"use_dictionary": [*RAW_DICTIONARY, *(carried or ())]}


def checkpoint_groups(num_checkpoints: int, groups: int) -> list[list[int]]:
    """Split checkpoint indices into ``groups`` contiguous, near-equal groups."""
    groups = max(1, min(groups, num_checkpoints))
    bounds = np.linspace(0, num_checkpoints, groups + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(groups)]


def score_stage(plan: "Plan", groups: list[list[int]], emit: str, out_url: str, *, done: Any = None,
                mode: str = "overwrite", check_url: str | None = None, moment_dtype: str | None = None,
                write_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read → decode → scorer actors for each checkpoint group → Parquet at ``out_url``. Returns
    what the actors ran on (:func:`.devices.device_report`: ``scorers``, ``devices``, ``warnings``).

    ``done`` (resume, :mod:`.resume`): sorted ``split/id`` keys of rows already in ``out_url``;
    they are dropped right after the read and the new rows appended (``mode``). ``check_url``: where
    the actors write their first-batch precision checks (tf32/bf16; :func:`read_precision_checks`).
    ``moment_dtype`` (``emit="moments"``): how partial moments are stored (default:
    ``vog.accum_dtype``, which loses nothing); ``write_args``: Parquet writer options (codec,
    encodings; default: Ray Data's).
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
    ledger_name, ledger = start_ledger()
    c = cfg.compute
    per_call = c.calls_of(gpus)
    gpu_decode = _gpu_decode(cfg, gpus, plan.storage)
    parts = []
    for gi, idx in enumerate(groups):
        ds = dataset_from_config(cfg, plan.storage, carried_types=plan.carried_types)
        if done is not None:
            from .resume import skip_done

            ds = ds.map_batches(skip_done, fn_kwargs={"done": done}, batch_format="pyarrow", batch_size=None,
                                zero_copy_batch=True)
        ds = decode(ds, cfg, pass_encoded=gpu_decode is not None)
        ap = cfg.compute.actors
        pool = ray.data.ActorPoolStrategy(min_size=ap.min, max_size=ap.max, max_tasks_in_flight_per_actor=ap.tasks_in_flight)
        remote_args: dict[str, Any] = {"num_cpus": cfg.compute.cpus_per_actor}
        if gpus:
            remote_args["num_gpus"] = gpus
        parts.append(ds.map_batches(
            ScorerActor, compute=pool, batch_size=c.batch_size * per_call, batch_format="pyarrow",
            zero_copy_batch=True,
            fn_constructor_kwargs=dict(model=cfg.model, checkpoints=plan.urls, indices=idx,
                                       num_checkpoints=plan.K, vog=plan.opts.as_kwargs(), device=c.device,
                                       storage=storage_kwargs, emit=emit, group=gi, threads=c.threads_per_actor,
                                       engine=c.engine_options(), engine_batch=c.batch_size if per_call > 1 else None,
                                       check_url=check_url, device_decode=gpu_decode, ledger=ledger_name,
                                       moment_dtype=moment_dtype or plan.opts.accum_dtype),
            **remote_args))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    fs, _ = resolve(out_url, plan.storage)
    try:
        ds.write_parquet(out_url, filesystem=fs, mode=mode, **(write_args or {}))
    except BaseException:
        collect_ledger(ledger, quiet=True)  # the stage's own error is the one to report
        raise
    return device_report(collect_ledger(ledger), gpus)


def _gpu_decode(cfg: "AuditConfig", gpus: float, storage: Any) -> dict[str, Any] | None:
    """The scorer's ``device_decode`` argument when JPEGs are decoded on its GPU, else None."""
    if cfg.data.transform.decode_on != "gpu":
        return None
    if not gpus:
        log.warning("data.transform.decode_on is 'gpu' but the scorer actors run on CPUs: decoding on the CPU")
        return None
    from ..data.metadata import infer_input_shape

    return {"transform": cfg.data.transform.model_dump(), "input_shape": list(infer_input_shape(cfg, storage))}


def read_precision_checks(check_url: str, storage: Any) -> list[dict[str, Any]]:
    """The scorer actors' first-batch precision checks under ``check_url`` (none in fp32)."""
    fs, path = resolve(check_url, storage)
    if not fs.exists(path):
        return []
    out = []
    for f in sorted(fs.glob(path.rstrip("/") + "/*.json")):
        with fs.open(f, "r") as fh:
            out.append(json.load(fh))
    return out


def precision_record(cfg: "AuditConfig", check_url: str, storage: Any) -> dict[str, Any]:
    """The manifest's ``precision``: the mode, what it does where the actors ran, the first-batch
    checks against fp32 (the worst Spearman per key over the actors) and the keys it measured unsafe
    (Spearman < SAFE_SPEARMAN), each logged as a warning."""
    import torch

    from ..core.precision import SAFE_SPEARMAN, precision_note, unsafe_keys

    mode = cfg.compute.precision
    rec: dict[str, Any] = {"mode": mode}
    if mode == "fp32":
        return rec
    checks = read_precision_checks(check_url, storage)
    worst: dict[str, dict[str, Any]] = {}
    for c in checks:
        for k, f in c["keys"].items():
            if f.get("spearman") is not None and (k not in worst or f["spearman"] < worst[k]["spearman"]):
                worst[k] = f
    devices = sorted({c["device"].split(":")[0] for c in checks})
    rec.update({"devices": devices, "checked_rows": sum(c["rows"] for c in checks),
                "check_seconds": round(sum(c["seconds"] for c in checks), 3), "check": worst,
                "unsafe": unsafe_keys(worst), "threshold_spearman": SAFE_SPEARMAN})
    rec["effect"] = {d: precision_note(torch.device(d), mode) for d in devices}
    if not checks:
        log.warning("compute.precision %s: no first-batch check against fp32 was recorded", mode)
    for k in rec["unsafe"]:
        f = worst[k]
        log.warning("compute.precision %s is unsafe for %s: on the first batch (%d examples) its raw VoG ranks "
                    "the examples with Spearman %.4f against fp32 (< %.2f; max |Δ| %.3g, top-decile overlap %.2f): "
                    "rerun with compute.precision: fp32 before trusting that ranking", mode, k, f["n"],
                    f["spearman"], SAFE_SPEARMAN, f["max_abs_dz"], f["top_decile_overlap"])
    return rec


def merge_sharded(plan: "Plan", parts_url: str, raw_url: str, num_groups: int) -> None:
    """Merge per-group partial moments by example id into the fused raw table."""
    fs, _ = resolve(parts_url, plan.storage)
    n = sum(plan.rows_in.values()) * num_groups
    allp = read_raw(parts_url, plan.storage, partitions_for(n, RAW_ROWS_PER_READ)).ds
    ok = allp.map_batches(filter_status, fn_kwargs={"ok": True}, batch_format="pyarrow")
    bad = allp.map_batches(rejected_of_group0, batch_format="pyarrow")
    merged = merge_by_example(ok, plan.keys, num_groups, n)
    out = bad if merged is None else merged.map_batches(moments_to_table, fn_kwargs={"vog_keys": plan.keys},
                                                        batch_format="pyarrow").union(bad)
    out.write_parquet(raw_url, filesystem=fs, mode="overwrite")



class WorkLock(DirLock):
    """An audit's work directory (``<output>/_work/<key>/lock``): one audit of a config at a time."""

    what = "another audit of the same config"
    advice = ("wait for it to finish and rerun (the rerun reuses its work), or delete the lock file if that "
              "audit died")


def run_stage(plan: "Plan", groups: list[list[int]], work_url: str) -> tuple[dict[str, Any], bool]:
    """Stage 1 into ``<work_url>/raw`` unless a finished one is there (its ``_SUCCESS``), keeping
    the finished blocks of an interrupted run (fused mode; :mod:`.resume`), under the work
    directory's lock (a second audit of the same config fails at once, touching nothing). Returns
    the stage's record (wall time, rows, what resume kept) and whether it was reused whole."""
    with WorkLock(work_url, plan.storage):
        return _run_stage(plan, groups, work_url)


def _run_stage(plan: "Plan", groups: list[list[int]], work_url: str) -> tuple[dict[str, Any], bool]:
    from ..runs import SUCCESS
    from ..storage import join
    from .resume import PartialRaw, count_new_rows, scan_partial_raw

    sharded = len(groups) > 1
    raw_url = join(work_url, "raw")
    check_url = join(work_url, PRECISION_CHECKS)
    fs_raw, raw_path = resolve(raw_url, plan.storage)
    done_marker = raw_path + "/" + SUCCESS
    t_score = time.time()
    if fs_raw.exists(done_marker):
        with fs_raw.open(done_marker, "r") as f:
            earlier = json.load(f)
        log.info("stage 1 reused: %s holds the finished raw table of an earlier invocation with the same config, "
                 "checkpoints and input files (%s rows); nothing is scored now", raw_url, earlier.get("rows"))
        # this invocation's wall time and nothing scored; the scorers are the earlier invocation's
        return {**earlier, "wall_time_s": time.time() - t_score, "earlier_wall_time_s": earlier.get("wall_time_s"),
                "resume": {"rows_scored_now": 0, "rows_from_earlier": earlier.get("rows"), "files_removed": 0}}, True
    partial = scan_partial_raw(fs_raw, raw_path) if not sharded else PartialRaw()
    if not partial.files and fs_raw.exists(raw_path):
        fs_raw.rm(raw_path, recursive=True)
    devices: dict[str, Any] = {}
    if sharded:
        parts_url = join(work_url, "parts")
        devices = score_stage(plan, groups, "moments", parts_url, check_url=check_url)
        merge_sharded(plan, parts_url, raw_url, len(groups))
        fs_raw.rm(resolve(parts_url, plan.storage)[1], recursive=True)
    elif partial.rows < sum(plan.rows_in.values()):
        if partial.files:
            log.info("resuming stage 1: %d rows in %d files from an earlier run are kept (%d half-written "
                     "files removed)", partial.rows, len(partial.files), len(partial.removed))
        devices = score_stage(plan, groups, "vog", raw_url, done=partial.done,
                              mode="append" if partial.files else "overwrite", check_url=check_url,
                              write_args=raw_write_args(plan.carried_types))
    now = count_new_rows(fs_raw, raw_path, partial.files)
    rows_in = sum(plan.rows_in.values())
    if partial.rows + now != rows_in:  # never mark a raw table done that a rerun could not use
        fs_raw.rm(raw_path, recursive=True)
        raise RuntimeError(f"stage 1 wrote {partial.rows + now} rows for {rows_in} input rows (did the input change "
                           "while it was read?); its work directory was cleared: rerun the audit")
    stage1 = {"wall_time_s": time.time() - t_score, "rows": partial.rows + now,
              "resume": {"rows_scored_now": now, "rows_from_earlier": partial.rows,
                         "files_removed": len(partial.removed)}, **devices}
    with fs_raw.open(done_marker, "w") as f:
        json.dump(stage1, f)
    return stage1, False
