"""One audit on Ray, from config to published run: :func:`plan_audit` (checkpoints listed, hashed
and checked against the model, windows resolved, rows counted — before any Ray work), then stage 1
(:mod:`.stage`), the reduce (:mod:`.reduce`), publishing (:mod:`.publish`) and the report."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..config import AuditConfig, redact
from ..core.options import VogOptions
from ..core.windows import resolve_windows
from ..runs import new_run_id
from ..storage import StorageOptions, join, resolve
from .cluster import check_address, configure_data_context, ensure_ray
from .publish import check_writable, top_ids, versions, write_run
from .reduce import reduce_raw
from .stage import PRECISION_CHECKS, checkpoint_groups, precision_record, run_stage, work_key

__all__ = ["run_audit", "plan_audit", "reduce_and_publish", "Plan", "AuditResult", "Steps", "ReportFailed",
           "remove_work", "write_report", "list_config_checkpoints", "count_config_rows"]

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
            *self._work_lines(),
        ]
        for split, ids in self.top.items():
            lines.append(f"highest VoG in {split}: {', '.join(ids)}")
        return "\n".join(lines)

    def _work_lines(self) -> list[str]:
        """What this invocation did: new checkpoints, rows scored now and at what rate, where, warnings."""
        m = self.manifest
        tp, res = m["throughput"], m.get("resume") or {}
        lines = []
        if m.get("mode") == "incremental":
            lines.append(f"incremental: {len(m['new_checkpoints'])} new checkpoint(s) folded in, "
                         f"{m['num_checkpoints']} in all (generation {m['generation']})")
        if tp.get("examples_per_s") is None:
            lines.append(f"wall time: {m['wall_time_s']:.1f} s  nothing scored now: stage 1 reused whole from "
                         f"{m['work']['url']} ({res.get('rows_from_earlier')} rows scored by an earlier invocation)")
        else:
            kept = res.get("rows_from_earlier") or 0
            lines.append(f"wall time: {m['wall_time_s']:.1f} s  throughput: {tp['examples_per_s']:.1f} examples/s "
                         f"({tp['example_checkpoints_per_s']:.1f} example×checkpoints/s) over the "
                         f"{tp['rows_scored_now']} rows scored now"
                         + (f"; {kept} rows kept from an interrupted earlier invocation" if kept else ""))
        scorers = m.get("scorers") or []
        if scorers:
            busy = [s for s in scorers if s["rows"]]
            on = ", ".join(f"{d} {n} rows" for d, n in m["devices"].items())
            when = "scored by the earlier invocation on" if tp.get("examples_per_s") is None else "scored on"
            lines.append(f"{when}: {on} ({len(busy)} of {len(scorers)} actor(s) scored rows, on "
                         f"{len({s['node_id'] for s in busy})} node(s))")
        lines += [f"warning: {w}" for w in m.get("warnings") or []]
        return lines


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
    carried_types: dict[str, Any] = field(default_factory=dict)  # keep column -> pa.DataType (scan_splits)
    inputs: dict[str, Any] = field(default_factory=dict)  # data.identity.inputs_identity, per split

    @property
    def K(self) -> int:
        return len(self.urls)


def list_config_checkpoints(cfg: AuditConfig, storage: StorageOptions) -> list[str]:
    """The config's checkpoints in order; nothing found is an error naming the ``checkpoints`` key."""
    from ..models.checkpoints import list_checkpoints

    try:
        return list_checkpoints(cfg.checkpoints, storage)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoints: {e}") from None


def count_config_rows(cfg: AuditConfig, storage: StorageOptions) -> dict[str, int]:
    """Rows per split from metadata (no Ray); a split that cannot be read names its key."""
    from ..data.metadata import count_split_rows

    out = {}
    for name, spec in cfg.data.splits.items():
        try:
            out[name] = count_split_rows(spec, storage)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"data.splits.{name}: {e}") from None
    return out


def plan_audit(cfg: AuditConfig, address: str | None = None, *, urls: list[str] | None = None,
               known: dict[str, Any] | None = None) -> Plan:
    """Everything that can be checked before any Ray work, refused with an error naming the file
    and key (``ConfigError``, ``CheckpointError``): the address, the output apart from the inputs,
    the checkpoints listed, windows of at least two distinct checkpoints, the splits' footers
    (rows, columns and their types), every checkpoint against the model and for non-finite
    tensors (each read once, hashed while read, one in memory at a time; ``known``: checkpoints an
    earlier audit checked, url → ``CheckpointInfo``, not read again while unchanged), the output
    writable, the input files' identity (size and version, for the work key) — then connect to
    Ray, and count the rows of WebDataset splits (a pass over their member headers, as Ray tasks)."""
    from ..data.identity import inputs_identity
    from ..data.metadata import check_output_apart, count_split_rows, declared_class_names, scan_splits
    from ..models.checkpoints import check_checkpoints
    from .cluster import ray_map

    check_address(address)  # an address the audit cannot use is refused before any work
    storage = cfg.storage.options()
    opts = cfg.vog.options()
    check_output_apart(cfg, storage)
    urls = urls if urls is not None else list_config_checkpoints(cfg, storage)
    try:
        windows = resolve_windows(opts.windows, len(urls))
    except ValueError as e:
        raise cfg.error("vog.windows", f"{e} ({len(urls)} checkpoints listed from {cfg.checkpoints!r})") from None
    keys = opts.keys(windows)
    scan = scan_splits(cfg, storage, defer=("webdataset",))
    infos = check_checkpoints(cfg.model, urls, storage, known=known)
    check_writable(cfg.output.url, storage)
    inputs = inputs_identity(cfg, storage)
    if cfg.data.class_names is None:  # a Hugging Face dataset names its classes in its metadata
        names = declared_class_names(cfg, storage)
        if names:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"class_names": names})})
    ensure_ray(address)
    configure_data_context(cfg.compute)
    rows_in = {name: scan.rows_in[name] if name in scan.rows_in else count_split_rows(spec, storage, mapper=ray_map)
               for name, spec in cfg.data.splits.items()}
    return Plan(cfg, storage, opts, urls, infos, windows, keys, opts.primary(windows),
                cfg.output.url.rstrip("/"), rows_in, scan.carried_types, inputs)


def run_audit(cfg: AuditConfig, *, address: str | None = None, run_id: str | None = None,
              report: bool | None = None) -> AuditResult:
    """Run a whole audit on Ray and publish it; then remove its work directory (unless
    ``output.keep_work``) and write the report. Returns where it went and the manifest."""
    t0 = time.time()
    plan = plan_audit(cfg, address)
    groups = checkpoint_groups(plan.K, cfg.compute.checkpoint_groups)
    work_url = join(plan.out_url, "_work", work_key(cfg, plan.infos, plan.inputs))
    stage1, reused = run_stage(plan, groups, work_url)
    extra = {"mode": "checkpoint-sharded" if len(groups) > 1 else "fused", "checkpoint_groups": groups,
             "resumed_from_work": reused, "work": {"url": work_url, "kept": cfg.output.keep_work},
             "resume": stage1.get("resume", {}),
             **{k: stage1.get(k, d) for k, d in (("scorers", []), ("devices", {}), ("warnings", []))},
             "precision": precision_record(cfg, join(work_url, PRECISION_CHECKS), plan.storage)}
    result = reduce_and_publish(plan, join(work_url, "raw"), run_id=run_id, t0=t0, score_wall=stage1["wall_time_s"],
                                extra=extra, report=False, rows_scored_now=stage1["resume"]["rows_scored_now"])
    if not cfg.output.keep_work:
        remove_work(work_url, plan.out_url, plan.storage)
    write_report(plan, result, report)
    return result


def remove_work(work_url: str, out_url: str, storage: StorageOptions) -> None:
    """Delete a published audit's work directory, and ``<output>/_work`` once it is empty."""
    fs, path = resolve(work_url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs, parent = resolve(join(out_url, "_work"), storage)
    try:
        if fs.exists(parent) and not fs.ls(parent):
            fs.rm(parent, recursive=True)
    except FileNotFoundError:  # another audit's cleanup got there first
        pass


def write_report(plan: Plan, result: AuditResult, report: bool | None) -> None:
    """The run's report, when the config (or ``report``) asks for it; a failure says that the run
    itself stands (:class:`ReportFailed`)."""
    if plan.cfg.report.enabled if report is None else report:
        from ..report import build_report

        try:
            build_report(result.run_url, storage=plan.storage)
        except Exception as e:  # noqa: BLE001 - whatever failed, the run itself stands
            raise ReportFailed(f"run {result.run_id} was published at {redact(result.run_url)}, but its report "
                               f"failed: {str(e) or type(e).__name__} (once fixed: vog-ray report "
                               f"{redact(result.run_url)})") from e


def reduce_and_publish(plan: Plan, raw_url: str, *, run_id: str | None, t0: float, score_wall: float,
                       extra: dict[str, Any], report: bool | None = None,
                       scored_checkpoints: int | None = None, rows_scored_now: int | None = None,
                       verify_source: bool = True) -> AuditResult:
    """Stage 2: class moments → z → ranks → the run, checked by the run validator (the source
    read again unless ``verify_source`` is False), published (``_SUCCESS`` last), then the report.
    ``rows_scored_now``: rows stage 1 scored in this invocation (default: all), for the throughput."""
    cfg, storage = plan.cfg, plan.storage
    run_id = run_id or new_run_id()
    run_url = join(plan.out_url, "runs", run_id)
    steps = Steps()
    # ids a reader makes are unique by construction; an id column's, or a manifest's URIs, may not be
    id_splits = sorted(name for name, spec in cfg.data.splits.items() if spec.id_column or spec.format == "manifest")
    red = reduce_raw(raw_url, storage, keys=plan.keys, primary=plan.primary, normalization=plan.opts.normalization,
                     rows_in=sum(plan.rows_in.values()), id_splits=id_splits, steps=steps,
                     normalize_against=plan.opts.normalize_against)
    t_publish = time.perf_counter()
    manifest = _manifest(plan, red, run_id, score_wall, steps, extra, scored_checkpoints or plan.K,
                         red.rows_in if rows_scored_now is None else rows_scored_now)
    from .validate import publish_gate

    carried = {c: plan.carried_types.get(c, pa.null())
               for c in dict.fromkeys(k for s in cfg.data.splits.values() for k in s.keep_columns)}
    write_run(red, run_url, plan.out_url, run_id, storage, manifest, t0=t0, flags=cfg.flags, carried=carried,
              gate=publish_gate(plan, source=verify_source))
    log.info("publish: %.1f s", time.perf_counter() - t_publish)
    result = AuditResult(run_url=run_url, run_id=run_id, manifest=manifest,
                         top=top_ids(run_url, storage, list(cfg.data.splits)))
    write_report(plan, result, report)
    return result


class ReportFailed(RuntimeError):
    """The run was published (it passed its invariants); only its report could not be written."""


def _manifest(plan: Plan, red: Any, run_id: str, score_wall: float, steps: Steps,
              extra: dict[str, Any], K: int, rows_now: int) -> dict[str, Any]:
    cfg = plan.cfg
    n_in = red.rows_in
    # the throughput of what this invocation scored (None: stage 1 was reused whole)
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
        "normalize_against": plan.opts.normalize_against,
        # rows whose class the reference split lacks: no z, no rank (split -> class -> rows)
        "rows_without_reference": {s: {str(c): n for c, n in per.items()} for s, per in red.unreferenced.items()},
        "rows": {"in": n_in, "scored": red.rows_scored, "rejected": red.rows_rejected},
        "splits": {s: {"rows_in": plan.rows_in.get(s, 0), "rows_scored": red.scored_by_split.get(s, 0),
                       "rows_rejected": int(red.rejected_by_split.get(s, 0))} for s in cfg.data.splits},
        "inputs": plan.inputs,
        "score_wall_time_s": score_wall,
        "throughput": {"examples_per_s": rows_now / max(score_wall, 1e-9) if rows_now else None,
                       "example_checkpoints_per_s": rows_now * K / max(score_wall, 1e-9) if rows_now else None,
                       "rows_scored_now": rows_now, "checkpoints_scored": K},
        "versions": versions(),
        "timings_s": {"score": round(score_wall, 3), **steps.t},
        **extra,
    }
