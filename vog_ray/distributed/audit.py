"""One audit on Ray, from config to published run: :func:`plan_audit` (checkpoints listed, hashed
and checked against the model, windows resolved, rows counted — before any Ray work), then stage 1
(:mod:`.stage`), the reduce (:mod:`.reduce`), publishing (:mod:`.publish`) and the report."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import AuditConfig, redact
from ..core.options import VogOptions
from ..core.windows import resolve_windows
from ..runs import new_run_id
from ..storage import StorageOptions, join
from .cluster import configure_data_context, ensure_ray
from .publish import check_writable, top_ids, versions, write_run
from .reduce import reduce_raw
from .stage import checkpoint_groups, run_stage, work_key

__all__ = ["run_audit", "plan_audit", "reduce_and_publish", "Plan", "AuditResult", "Steps"]

log = logging.getLogger("vog_ray")


class Steps:
    """Wall time of each named step of an audit, logged as it ends (progress on long work) and
    kept for the manifest (``timings_s``)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = round(self.t.get(name, 0.0) + time.perf_counter() - t, 3)
            log.info("%s: %.1f s", name, self.t[name])


@dataclass
class AuditResult:
    run_url: str
    run_id: str
    manifest: dict[str, Any]
    top: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        r = m["rows"]
        lines = [
            f"run: {self.run_url}",
            f"rows: {r['in']} in = {r['scored']} scored + {r['rejected']} rejected",
            f"checkpoints: {m['num_checkpoints']}  windows: {', '.join(m['windows'])}  "
            f"targets: {', '.join(m['targets'])}  ranked by: {m['primary']}",
            f"wall time: {m['wall_time_s']:.1f} s  throughput: "
            f"{m['throughput']['examples_per_s']:.1f} examples/s "
            f"({m['throughput']['example_checkpoints_per_s']:.1f} example×checkpoints/s)",
        ]
        for split, ids in self.top.items():
            lines.append(f"highest VoG in {split}: {', '.join(ids)}")
        return "\n".join(lines)


@dataclass
class Plan:
    """Everything the stages share: resolved checkpoints, windows, keys, storage."""

    cfg: AuditConfig
    storage: StorageOptions
    opts: VogOptions
    urls: list[str]
    infos: list[Any]            # models.checkpoints.CheckpointInfo, one per checkpoint
    windows: dict[str, list[int]]
    keys: list[str]
    primary: str
    out_url: str
    rows_in: dict[str, int]

    @property
    def K(self) -> int:
        return len(self.urls)


def plan_audit(cfg: AuditConfig, address: str | None = None, *, urls: list[str] | None = None,
               known: dict[str, Any] | None = None) -> Plan:
    """List, hash and validate the checkpoints, resolve windows, count the input rows, check the
    output is writable — then connect to Ray (a bad checkpoint URL fails without starting Ray).

    Each checkpoint is read once here (hashed while read, checked against the model, dropped):
    the driver never holds more than one; the scorer actors load them. ``known``: checkpoints an
    earlier audit checked (url → ``CheckpointInfo``), not read again while unchanged."""
    from ..data.metadata import count_split_rows, declared_class_names
    from ..models.checkpoints import inspect_checkpoints, list_checkpoints
    from .cluster import ray_map

    storage = cfg.storage.options()
    opts = cfg.vog.options()
    urls = urls if urls is not None else list_checkpoints(cfg.checkpoints, storage)
    windows = resolve_windows(opts.windows, len(urls))
    keys = opts.keys(windows)
    # every checkpoint checked against the model once, here: clear errors before any actor starts
    infos = inspect_checkpoints(cfg.model, urls, storage, known=known)
    check_writable(cfg.output.url, storage)
    if cfg.data.class_names is None:  # a Hugging Face dataset names its classes in its metadata
        names = declared_class_names(cfg, storage)
        if names:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"class_names": names})})
    ensure_ray(address)
    configure_data_context(cfg.compute)
    # rows per split from metadata; WebDataset shards have none: their header passes run as Ray tasks
    rows_in = {name: count_split_rows(spec, storage, mapper=ray_map if spec.format == "webdataset" else None)
               for name, spec in cfg.data.splits.items()}
    return Plan(cfg, storage, opts, urls, infos, windows, keys, opts.primary(windows),
                cfg.output.url.rstrip("/"), rows_in)


def run_audit(cfg: AuditConfig, *, address: str | None = None, run_id: str | None = None,
              report: bool | None = None) -> AuditResult:
    """Run a whole audit on Ray and publish it. Returns where it went and the manifest."""
    t0 = time.time()
    plan = plan_audit(cfg, address)
    groups = checkpoint_groups(plan.K, cfg.compute.checkpoint_groups)
    work_url = join(plan.out_url, "_work", work_key(cfg, plan.infos))
    stage1, resumed = run_stage(plan, groups, work_url)
    extra = {"mode": "checkpoint-sharded" if len(groups) > 1 else "fused", "checkpoint_groups": groups,
             "resumed_from_work": resumed, "work_url": work_url, "resume": stage1.get("resume", {})}
    return reduce_and_publish(plan, join(work_url, "raw"), run_id=run_id, t0=t0,
                              score_wall=stage1["wall_time_s"], extra=extra, report=report)


def reduce_and_publish(plan: Plan, raw_url: str, *, run_id: str | None, t0: float, score_wall: float,
                       extra: dict[str, Any], report: bool | None = None,
                       scored_checkpoints: int | None = None) -> AuditResult:
    """Stage 2: class moments → z → ranks → the published run (``_SUCCESS`` last), then the report."""
    cfg, storage = plan.cfg, plan.storage
    run_id = run_id or new_run_id()
    run_url = join(plan.out_url, "runs", run_id)
    steps = Steps()
    # ids a reader makes are unique by construction; an id column's, or a manifest's URIs, may not be
    id_splits = sorted(name for name, spec in cfg.data.splits.items() if spec.id_column or spec.format == "manifest")
    red = reduce_raw(raw_url, storage, keys=plan.keys, primary=plan.primary, normalization=plan.opts.normalization,
                     rows_in=sum(plan.rows_in.values()), id_splits=id_splits, steps=steps)
    t_publish = time.perf_counter()
    manifest = _manifest(plan, red, run_id, score_wall, steps, extra, scored_checkpoints or plan.K)
    write_run(red, run_url, plan.out_url, run_id, storage, manifest, t0=t0)
    log.info("publish: %.1f s", time.perf_counter() - t_publish)
    result = AuditResult(run_url=run_url, run_id=run_id, manifest=manifest,
                         top=top_ids(run_url, storage, list(cfg.data.splits)))
    if cfg.report.enabled if report is None else report:
        from ..report import build_report

        build_report(run_url, storage=storage)
    return result


def _manifest(plan: Plan, red: Any, run_id: str, score_wall: float, steps: Steps,
              extra: dict[str, Any], K: int) -> dict[str, Any]:
    cfg = plan.cfg
    n_in = red.rows_in
    return {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": redact(cfg.to_dict()),
        "checkpoints": [{**i.as_dict(), "url": redact(i.url)} for i in plan.infos],  # no userinfo
        "num_checkpoints": plan.K,
        "windows": plan.windows,
        "targets": list(plan.opts.targets),
        "keys": plan.keys,
        "primary": plan.primary,
        "label_mode": plan.opts.label_mode,
        "normalization": plan.opts.normalization,
        "rows": {"in": n_in, "scored": red.rows_scored, "rejected": red.rows_rejected},
        "splits": {s: {"rows_in": plan.rows_in.get(s, 0), "rows_scored": red.scored_by_split.get(s, 0),
                       "rows_rejected": int(red.rejected_by_split.get(s, 0))} for s in cfg.data.splits},
        "score_wall_time_s": score_wall,
        "throughput": {"examples_per_s": n_in / max(score_wall, 1e-9),
                       "example_checkpoints_per_s": n_in * K / max(score_wall, 1e-9),
                       "checkpoints_scored": K},
        "versions": versions(),
        "timings_s": {"score": round(score_wall, 3), **steps.t},
        **extra,
    }
