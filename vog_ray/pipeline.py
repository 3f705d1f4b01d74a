"""The distributed audit on Ray Data (DESIGN.md §2–3).

Stage 1 (score): read every split → decode/normalise (CPU tasks) → scorer actors (GPU or CPU,
an autoscaling pool; each loads its checkpoints once, in ``__init__``, from their URLs) → the
raw per-example table, written as Parquet to a work prefix keyed by the config (a crashed
run resumes from it).

* **Fused** (default): one actor holds every checkpoint; only per-example scalars leave it.
* **Checkpoint-sharded** (``compute.checkpoint_groups: G``): G groups of actors each emit
  per-example partial pixel moments; a reduce merges them by example id (Chan), in group order.

Stage 2 (reduce): class moments per block (float64) merged in a deterministic order → class
z-scores → a distributed sort → global and per-class ranks from block offsets → the ranked
score table, ``classes.parquet``, ``rejected.parquet`` and ``manifest.json``; ``_SUCCESS`` is
written last. Nothing per-example is collected into the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from . import __version__
from .checkpoints import CheckpointInfo, list_checkpoints
from .config import AuditConfig, ComputeSpec, redact
from .engine import SIGNALS, BatchResult, resolve_windows
from .reduce import (_filter_splits, _filter_status, _normalize_block, _rejected_columns, _rejected_of_group0,
                     SORT_KEYS, choose_boundaries, class_lookup, rank_offsets)
from .runs import SUCCESS, new_run_id, publish, write_json, write_table
from .single import VogOptions, keep_array, load_checkpoints, make_engine, result_to_table
from .storage import StorageOptions, join, resolve

__all__ = ["run_audit", "AuditResult", "ScorerActor", "checkpoint_groups", "ensure_ray"]

log = logging.getLogger("vog_ray")


class _Steps:
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


# --------------------------------------------------------------------------- ray setup
def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address`` / ``RAY_ADDRESS``) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # at least 2 logical CPUs: the scorer actors hold theirs for the whole stage and the read
        # tasks need one more (on a 1-core machine they share the core)
        ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 1), include_dashboard=False, **kwargs)


def checkpoint_groups(num_checkpoints: int, groups: int) -> list[list[int]]:
    """Split checkpoint indices into ``groups`` contiguous, near-equal groups."""
    groups = max(1, min(groups, num_checkpoints))
    bounds = np.linspace(0, num_checkpoints, groups + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(groups)]


# --------------------------------------------------------------------------- scorer actor
class ScorerActor:
    """A stateful Ray Data UDF: loads its checkpoints once, scores batches with the engine.

    Takes only URLs and plain options (no object refs), so Ray can restart it after a crash.
    """

    def __init__(self, *, model: Any, checkpoints: list[str], indices: list[int], num_checkpoints: int,
                 vog: dict[str, Any], device: str, storage: dict[str, Any], emit: str = "vog",
                 group: int = 0, threads: int | None = None):
        import torch

        threads = threads or int(os.environ.get("VOG_RAY_TORCH_THREADS", "0"))  # else Ray's OMP_NUM_THREADS
        torch.set_num_threads(max(1, threads or torch.get_num_threads()))
        # diagnostics: one JSON line per batch (wall-clock start/end, rows, seconds in the engine) in
        # $VOG_RAY_TRACE_DIR/scorer-<pid>.jsonl; bench/pipeline.py takes its steady-state rate from it
        trace_dir = os.environ.get("VOG_RAY_TRACE_DIR")
        self._engine_s = 0.0
        self._trace = open(os.path.join(trace_dir, f"scorer-{os.getpid()}.jsonl"), "a", buffering=1) if trace_dir else None
        self.storage = StorageOptions(**storage)
        self.opts = VogOptions(**vog)
        self.emit = emit
        self.group = group
        self.K = num_checkpoints
        loaded = load_checkpoints(model, checkpoints, self.storage, indices=indices)
        predict_sd = None
        if self.opts.label_mode == "predicted" and (num_checkpoints - 1) not in indices:
            predict_sd = load_checkpoints(model, checkpoints, self.storage, indices=[num_checkpoints - 1]).state_dicts[0]
        dev = device
        if device in ("auto", "cuda"):
            dev = "cuda" if torch.cuda.is_available() else "cpu"  # fake GPUs: schedule, run on CPU
        self.engine = make_engine(loaded, self.opts, dev, indices=indices, num_checkpoints=num_checkpoints,
                                  predict_state_dict=predict_sd)
        self.keys = self.engine.keys()
        self.windows = self.engine.windows
        self.num_classes: int | None = None

    def _classes(self, x: np.ndarray) -> int:
        if self.num_classes is None:
            import torch

            with torch.no_grad():
                out = self.engine._forward(self.engine.models[0], self.engine._prepare(x[:1]))
            self.num_classes = int(out.shape[1])
        return self.num_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self._trace is None:
            return self._score(batch)
        t0 = time.time()
        self._engine_s = 0.0
        out = self._score(batch)
        self._trace.write(json.dumps({"start": t0, "end": time.time(), "rows": out.num_rows,
                                      "engine_s": self._engine_s, "group": self.group}) + "\n")
        return out

    def _score(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        status = np.asarray(batch["status"]).astype(object)
        labels = np.asarray(batch["label"]).astype(np.int64)
        x = np.asarray(batch["x"])
        ok = status == "ok"
        if ok.any():
            C = self._classes(x[ok])
            bad = ok & ((labels >= C) | (labels < -1))
            status[bad] = [f"label_out_of_range: {int(v)} not in [0, {C})" for v in labels[bad]]
            if self.opts.label_mode == "true":
                miss = ok & (labels == -1)
                status[miss] = "missing_label"
            ok = status == "ok"
        keep = [c for c in batch if c not in ("x", "id", "split", "label", "status")]
        parts = []
        if ok.any():
            t = time.perf_counter()
            res = self.engine.run(x[ok], labels[ok], emit="vog" if self.emit == "vog" else "moments")
            self._engine_s = time.perf_counter() - t
            t = self._table(res, batch, ok, keep)
            parts.append(t)
        if (~ok).any():
            parts.append(self._rejected(batch, ~ok, status, keep))
        out = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
        assert out.num_rows == n
        return out

    def _table(self, res: BatchResult, batch: dict[str, np.ndarray], ok: np.ndarray, keep: list[str]) -> pa.Table:
        ids = np.asarray(batch["id"])[ok]
        splits = np.asarray(batch["split"])[ok]
        labels = np.asarray(batch["label"]).astype(np.int64)[ok]
        extra = {c: np.asarray(batch[c])[ok] for c in keep}
        if self.emit == "vog":
            return result_to_table(res, ids=list(ids), split=list(splits), labels=labels, keys=self.keys,
                                   extra=extra)
        # checkpoint-sharded: partial pixel moments per example
        n = int(ok.sum())
        cols: dict[str, Any] = {
            "id": pa.array([str(i) for i in ids], pa.string()),
            "split": pa.array([str(s) for s in splits], pa.string()),
            "label": pa.array(labels, pa.int64()),
            "status": pa.array(list(res.status), pa.string()),
            "group": pa.array(np.full(n, self.group, np.int64)),
            "target_label": pa.array(res.target_label, pa.int64()),
            "pred": pa.array(res.pred if res.pred is not None else np.full(n, -1, np.int64), pa.int64()),
        }
        pix = None
        for st in res.moments.values():
            pix = int(np.prod(st.mean.shape[1:]))
        for k in self.keys:
            st = res.moments.get(k)
            if st is None:  # this group holds no checkpoint of that window
                mean = np.zeros((n, pix or 1)); m2 = mean; cnt = 0
            else:
                mean = st.mean.reshape(n, -1).astype(np.float64); m2 = st.m2.reshape(n, -1).astype(np.float64); cnt = st.n
            P = mean.shape[1]
            cols[f"mn_{k}"] = pa.array(np.full(n, cnt, np.int64))
            cols[f"mmean_{k}"] = pa.FixedSizeListArray.from_arrays(pa.array(mean.ravel()), P)
            cols[f"mm2_{k}"] = pa.FixedSizeListArray.from_arrays(pa.array(m2.ravel()), P)
        for s in SIGNALS:
            v = res.signals[s]
            cols[f"sig_{s}"] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
        for c in keep:
            cols[c] = keep_array(np.asarray(batch[c])[ok])
        return pa.table(cols)

    def _rejected(self, batch: dict[str, np.ndarray], mask: np.ndarray, status: np.ndarray, keep: list[str]) -> pa.Table:
        cols: dict[str, Any] = {
            "id": pa.array([str(i) for i in np.asarray(batch["id"])[mask]], pa.string()),
            "split": pa.array([str(s) for s in np.asarray(batch["split"])[mask]], pa.string()),
            "label": pa.array(np.asarray(batch["label"]).astype(np.int64)[mask], pa.int64()),
            "status": pa.array([str(s) for s in status[mask]], pa.string()),
        }
        if self.emit != "vog":
            cols["group"] = pa.array(np.full(int(mask.sum()), self.group, np.int64))
        for c in keep:
            cols[c] = keep_array(np.asarray(batch[c])[mask])
        return pa.table(cols)


# --------------------------------------------------------------------------- sharded merge
_MOMENT_PREFIXES = ("mn_", "mmean_", "mm2_")
_STATE_META = ("id", "split", "label", "status", "group", "target_label", "pred")


def _fsl(values: np.ndarray) -> pa.Array:
    """A 2-D array as a fixed-size-list column."""
    values = np.asarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), max(1, values.shape[1]))


def _list_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a 2-D numpy array."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def moments_to_table(t: pa.Table, vog_keys: list[str]) -> pa.Table:
    """Moment rows (ok rows of a state or merged shards) → fused-format score rows (raw VoG)."""
    n = t.num_rows
    res = BatchResult(status=np.array(["ok"] * n, object),
                      target_label=t["target_label"].to_numpy().astype(np.int64),
                      pred=t["pred"].to_numpy().astype(np.int64))
    for k in vog_keys:
        cnt = t[f"mn_{k}"].to_numpy().astype(np.float64)
        m2 = _list_values(t[f"mm2_{k}"]).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.maximum(m2 / cnt[:, None], 0))
        res.vog[k] = np.where(cnt > 0, std.mean(axis=1) if n else np.zeros(0), np.nan)
    for s in SIGNALS:
        res.signals[s] = _list_values(t[f"sig_{s}"])
    extra = {c: t[c] for c in t.column_names if c not in _STATE_META and not c.startswith(_MOMENT_PREFIXES)
             and not c.startswith("sig_")}
    return result_to_table(res, ids=t["id"].to_pylist(), split=t["split"].to_pylist(),
                           labels=t["label"].to_numpy().astype(np.int64), keys=vog_keys, extra=extra)


# --------------------------------------------------------------------------- helpers
def _work_key(cfg: AuditConfig, ckpts: list[CheckpointInfo]) -> str:
    """Identity of an audit's stage-1 work: same config + same checkpoints ⇒ resumable."""
    d = cfg.to_dict()
    d.pop("output", None); d.pop("report", None); d["compute"] = {"checkpoint_groups": cfg.compute.checkpoint_groups}
    payload = json.dumps({"cfg": d, "ck": [c.sha256 for c in ckpts]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _hash_checkpoints(urls: list[str], storage: StorageOptions) -> list[CheckpointInfo]:
    out = []
    for u in urls:
        fs, path = resolve(u, storage)
        h = hashlib.sha256()
        size = 0
        with fs.open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                h.update(chunk); size += len(chunk)
        out.append(CheckpointInfo(u, size, h.hexdigest()))
    return out


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch

    return {"vog_ray": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "pyarrow": pyarrow.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------- the audit
@dataclass
class Plan:
    """Everything the stages share: resolved checkpoints, windows, keys, storage."""

    cfg: AuditConfig
    storage: StorageOptions
    opts: VogOptions
    urls: list[str]
    infos: list[CheckpointInfo]
    windows: dict[str, list[int]]
    keys: list[str]
    primary: str
    out_url: str
    rows_in: dict[str, int]

    @property
    def K(self) -> int:
        return len(self.urls)


def plan_audit(cfg: AuditConfig, address: str | None = None, *, urls: list[str] | None = None) -> Plan:
    """Connect to Ray, list and validate checkpoints, resolve windows, count the input rows."""
    import ray.data

    from .data.metadata import count_rows

    storage = cfg.storage.options()
    opts = cfg.vog.options()
    urls = urls if urls is not None else list_checkpoints(cfg.checkpoints, storage)
    windows = resolve_windows(opts.windows, len(urls))
    keys = opts.keys(windows)
    infos = _hash_checkpoints(urls, storage)
    # every checkpoint checked against the model once, here: clear errors before any actor starts
    load_checkpoints(cfg.model, urls, storage)
    _check_writable(cfg.output.url, storage)
    ensure_ray(address)  # after the checks: a bad checkpoint URL fails without starting Ray
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic batches => byte-identical reruns
    ctx.max_errored_blocks = cfg.compute.max_errored_blocks
    # per audit, not left over from an earlier one in this process (-1: Ray's "do not wait")
    ctx.wait_for_min_actors_s = cfg.compute.actors.wait_for_min_s or -1
    _retry_transient_s3_errors(ctx)
    return Plan(cfg, storage, opts, urls, infos, windows, keys, opts.primary(windows),
                cfg.output.url.rstrip("/"), count_rows(cfg, storage))


# s3fs/botocore (which vog-ray's filesystems use) retry throttling and 5xx answers themselves; when
# those retries run out, Ray Data retries the whole file read/write on these messages as well (its
# defaults name only the messages of pyarrow's own S3 client)
_TRANSIENT_S3_ERRORS = ("SlowDown", "[Rr]educe your request rate", "Service ?Unavailable", "InternalError",
                        "RequestTimeout")


def _retry_transient_s3_errors(ctx) -> None:
    missing = [p for p in _TRANSIENT_S3_ERRORS if p not in ctx.retried_io_errors]
    if missing:
        import warnings

        with warnings.catch_warnings():  # "substring matching will be deprecated": these are regexes
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.retried_io_errors = [*ctx.retried_io_errors, *missing]


def _check_writable(url: str, storage: StorageOptions) -> None:
    """Write and delete a probe object under ``<output>/_work``: an output that cannot be written
    fails here, before any work, with an error naming it."""
    probe = join(url.rstrip("/"), "_work", f".probe-{os.getpid()}-{time.time_ns()}")
    try:
        fs, path = resolve(probe, storage)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    except Exception as e:  # noqa: BLE001 - permission, missing bucket, a file in the way, no network …
        raise PermissionError(f"output.url {redact(url)!r} cannot be written: "
                              f"{type(e).__name__}: {redact(str(e))}") from None


def score_stage(plan: Plan, groups: list[list[int]], emit: str, out_url: str, *, done: Any = None,
                mode: str = "overwrite") -> None:
    """Stage 1: read → decode → scorer actors for each checkpoint group → Parquet at ``out_url``.

    ``done`` (resume, :mod:`vog_ray.resume`): sorted ``split/id`` keys of rows already in
    ``out_url``; they are dropped right after the read and the new rows appended (``mode``).
    """
    import ray
    import ray.data

    from .data.dataset import dataset_from_config
    from .data.decode import decode

    cfg = plan.cfg
    device = cfg.compute.device
    gpus = 0.0
    if device in ("auto", "cuda"):
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0 or _wait_for_gpus(cfg)
        if device == "cuda" and not has_gpu:
            waited = f" after waiting {cfg.compute.gpu_wait_s} s for the autoscaler" if cfg.compute.gpu_wait_s else ""
            raise RuntimeError(f"compute.device is 'cuda' but the Ray cluster has no GPU{waited} (on an autoscaling "
                               "cluster whose GPU workers start at 0, set compute.gpu_wait_s)")
        if not has_gpu and cfg.compute.gpu_wait_s:
            log.warning("no GPU joined the cluster within compute.gpu_wait_s = %d s: scoring on CPUs",
                        cfg.compute.gpu_wait_s)
        gpus = cfg.compute.gpus_per_actor if has_gpu else 0.0
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    _check_cpus_left(cfg.compute, cluster_cpus, len(groups))
    if not gpus:
        hint = cpu_layout_hint(cfg.compute, cluster_cpus, len(groups))
        if hint:
            log.warning(hint)
    o = plan.opts
    vog_kwargs = {"windows": dict(o.windows), "targets": list(o.targets), "label_mode": o.label_mode,
                  "normalization": o.normalization, "rank_by": o.rank_by, "accum_dtype": o.accum_dtype}
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
                                       num_checkpoints=plan.K, vog=vog_kwargs, device=device,
                                       storage=storage_kwargs, emit=emit, group=gi,
                                       threads=cfg.compute.threads_per_actor),
            **remote_args))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    fs, _ = resolve(out_url, plan.storage)
    ds.write_parquet(out_url, filesystem=fs, mode=mode)


def _wait_for_gpus(cfg: AuditConfig) -> bool:
    """An autoscaling cluster may have no GPU node until something asks for one: ask the autoscaler
    for ``actors.min`` bundles of ``gpus_per_actor`` GPUs and wait up to ``compute.gpu_wait_s`` for a
    GPU to join (progress logged). The request is withdrawn afterwards (the scorer actors then hold
    the GPUs). Returns whether the cluster has a GPU."""
    import ray
    from ray.autoscaler.sdk import request_resources

    c = cfg.compute
    if not c.gpu_wait_s:
        return False
    request_resources(bundles=[{"GPU": c.gpus_per_actor, "CPU": c.cpus_per_actor}] * c.actors.min)
    try:
        deadline = time.monotonic() + c.gpu_wait_s
        next_log = 0.0
        while time.monotonic() < deadline:
            if ray.cluster_resources().get("GPU", 0) > 0:
                return True
            if time.monotonic() >= next_log:
                log.info("waiting for the autoscaler to add GPU nodes (%d s left)", deadline - time.monotonic())
                next_log = time.monotonic() + 30
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        return ray.cluster_resources().get("GPU", 0) > 0
    finally:
        request_resources(bundles=[])


def cpu_layout(cpus: int, num_groups: int = 1, actors: int | None = None) -> dict[str, Any]:
    """The fastest CPU layout for ``cpus`` cores: one single-threaded scorer actor per core (per
    checkpoint group; or ``actors`` per group), the actors reserving all but one CPU between them
    for the read/decode tasks (so :func:`_check_cpus_left` accepts it)."""
    per = actors or max(1, cpus // num_groups)
    return {"actors": {"min": per, "max": per},
            "cpus_per_actor": max(0.01, math.floor(100 * (cpus - 1) / (per * num_groups)) / 100),
            "threads_per_actor": 1}


def cpu_layout_hint(c: ComputeSpec, cluster_cpus: float, num_groups: int = 1) -> str | None:
    """On the CPU, one single-threaded scorer actor per core is the fastest layout (bench/pipeline.py
    on 2 cores: 2 actors × 1 thread 0.93–0.98 of the engine alone with 2 threads; 1 actor × 2 threads
    0.64): torch's intra-op threads on small batches wait on each other and on the read/decode tasks
    sharing the cores. A hint when the pool would leave cores idle; None when it does not."""
    threads = c.threads_per_actor or max(1, int(c.cpus_per_actor))
    used = c.actors.max * threads * num_groups
    cpus = int(cluster_cpus)
    if cpus <= 1 or c.gpu_wait_s or used + num_groups > cpus:  # not one more actor per group
        return None
    lay = cpu_layout(cpus, num_groups)
    n = lay["actors"]["min"]
    return (f"scoring on the CPU with at most {c.actors.max} actor(s) × {threads} torch thread(s)"
            + (f" × {num_groups} checkpoint groups" if num_groups > 1 else "")
            + f" on a Ray cluster of {cpus} CPUs: cores stay idle. One single-threaded actor per core is the "
            f"fastest CPU layout: compute.actors: {{min: {n}, max: {n}}}, compute.cpus_per_actor: "
            f"{lay['cpus_per_actor']:g}, compute.threads_per_actor: 1")


def _check_cpus_left(c: ComputeSpec, cluster_cpus: float, num_groups: int) -> None:
    """The scorer actors hold their CPUs for the whole stage; the read and decode tasks that feed
    them need at least one more. If the minimum pool takes every CPU, nothing is ever read and the
    audit would wait forever: refuse it, naming the keys. Not checked on an autoscaling cluster
    (no CPU yet, or ``compute.gpu_wait_s`` set), where pending tasks make Ray add nodes."""
    if cluster_cpus <= 0 or c.gpu_wait_s:  # an autoscaling cluster (workers from 0): CPUs come on demand
        return
    held = c.actors.min * c.cpus_per_actor * num_groups
    if held > cluster_cpus - 1:
        raise ValueError(
            f"compute.actors.min ({c.actors.min}) × compute.cpus_per_actor ({c.cpus_per_actor:g})"
            + (f" × {num_groups} checkpoint groups" if num_groups > 1 else "")
            + f" = {held:g} CPUs, but the Ray cluster has {cluster_cpus:g}: the read/decode tasks need at least "
            "one CPU besides the scorer actors, or the audit cannot make progress. Lower actors.min or "
            "cpus_per_actor (fractions such as 0.5 are allowed), or add CPUs.")


def merge_sharded(plan: Plan, parts_url: str, raw_url: str, num_groups: int) -> None:
    """Merge per-group partial moments by example id into the fused raw table."""
    fs, _ = resolve(parts_url, plan.storage)
    allp, _, _ = read_raw(parts_url, plan.storage, _partitions(sum(plan.rows_in.values()) * num_groups, 50_000))
    ok = allp.map_batches(_filter_status, fn_kwargs={"ok": True}, batch_format="pyarrow")
    bad = allp.map_batches(_rejected_of_group0, batch_format="pyarrow")
    merged = merge_by_example(ok, plan.keys, num_groups, sum(plan.rows_in.values()) * num_groups)
    out = bad if merged is None else merged.map_batches(moments_to_table, fn_kwargs={"vog_keys": plan.keys},
                                                        batch_format="pyarrow").union(bad)
    out.write_parquet(raw_url, filesystem=fs, mode="overwrite")


def run_audit(cfg: AuditConfig, *, address: str | None = None, run_id: str | None = None,
              report: bool | None = None) -> AuditResult:
    """Run a whole audit on Ray and publish it. Returns where it went and the manifest."""
    t0 = time.time()
    plan = plan_audit(cfg, address)
    groups = checkpoint_groups(plan.K, cfg.compute.checkpoint_groups)
    sharded = len(groups) > 1
    work_url = join(plan.out_url, "_work", _work_key(cfg, plan.infos))
    raw_url = join(work_url, "raw")
    fs_raw, raw_path = resolve(raw_url, plan.storage)
    done_marker = raw_path + "/" + SUCCESS
    t_score = time.time()
    resumed = fs_raw.exists(done_marker)
    if not resumed:
        from .resume import PartialRaw, count_new_rows, scan_partial_raw

        # fused: keep the finished blocks of an interrupted run (per-block resume, vog_ray.resume)
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
        with fs_raw.open(done_marker, "w") as f:
            json.dump({"wall_time_s": time.time() - t_score, "rows": partial.rows + now,
                       "resume": {"rows_scored_now": now, "rows_from_earlier": partial.rows,
                                  "files_removed": len(partial.removed)}}, f)
    with fs_raw.open(done_marker, "r") as f:
        stage1 = json.load(f)
    resume = stage1.get("resume", {}) if not resumed else {
        "rows_scored_now": 0, "rows_from_earlier": stage1.get("rows"), "files_removed": 0}
    extra = {"mode": "checkpoint-sharded" if sharded else "fused", "checkpoint_groups": groups,
             "resumed_from_work": resumed, "work_url": work_url, "resume": resume}
    return reduce_and_publish(plan, raw_url, run_id=run_id, t0=t0, score_wall=stage1["wall_time_s"],
                              extra=extra, report=report)


def reduce_and_publish(plan: Plan, raw_url: str, *, run_id: str | None, t0: float, score_wall: float,
                       extra: dict[str, Any], report: bool | None = None,
                       scored_checkpoints: int | None = None) -> AuditResult:
    """Stage 2: class moments → z → ranks → the published run (``_SUCCESS`` last), then the report."""
    cfg, storage, keys = plan.cfg, plan.storage, plan.keys
    run_id = run_id or new_run_id()
    run_url = join(plan.out_url, "runs", run_id)
    fs_out, _ = resolve(plan.out_url, storage)
    steps = _Steps()
    with steps("reduce: read raw table"):  # once, into the object store: every pass below reads that
        raw, scored_by_split, rejected_by_split = read_raw(raw_url, storage,
                                                           _partitions(sum(plan.rows_in.values()), 50_000))
    ok = raw.map_batches(_filter_status, fn_kwargs={"ok": True}, batch_format="pyarrow")
    rejected = raw.map_batches(_filter_status, fn_kwargs={"ok": False}, batch_format="pyarrow")
    n_scored, n_rejected = sum(scored_by_split.values()), sum(rejected_by_split.values())
    n_in = sum(plan.rows_in.values())
    # ids a reader makes ("<file>:<row>", image paths) are unique by construction; ids read from
    # an id_column are checked (a distributed sort of those splits' ids)
    id_splits = sorted(name for name, spec in cfg.data.splits.items() if spec.id_column)
    if id_splits:
        with steps("reduce: unique ids"):
            _check_unique_ids(raw.map_batches(_filter_splits, fn_kwargs={"splits": id_splits},
                                              batch_format="pyarrow"), n_in)
    if n_in != n_scored + n_rejected:
        raise RuntimeError(f"row accounting failed: {n_in} rows in != {n_scored} scored + {n_rejected} rejected")
    if n_scored == 0:
        raise RuntimeError("no row could be scored (see the rejected rows for the reasons)")
    with steps("reduce: class moments"):
        classes = _class_table_exact(ok, keys)
    lookup = class_lookup(classes, keys)
    normalized = ok.map_batches(_normalize_block, fn_kwargs={"lookup": lookup, "keys": keys,
                                                             "method": plan.opts.normalization,
                                                             "primary": plan.primary},
                                batch_format="pyarrow")
    with steps("reduce: z, sort, ranks"):
        ranked, split_counts = _rank(normalized, n_scored)
    if split_counts != scored_by_split:
        raise RuntimeError(f"row accounting failed: ranked rows per split {split_counts} != scored {scored_by_split}")

    # ---------------- publish: tables, manifest, then _SUCCESS
    t_publish = time.perf_counter()
    try:
        ranked.write_parquet(join(run_url, "scores"), filesystem=fs_out, mode="overwrite")
        if n_rejected:  # an empty write on S3 fails: Ray then deletes a prefix that never existed
            rejected.map_batches(_rejected_columns, batch_format="pyarrow").repartition(1).write_parquet(
                join(run_url, "rejected.parquet"), filesystem=fs_out, mode="overwrite")
        else:
            write_table(join(run_url, "rejected.parquet", "empty.parquet"), _rejected_columns(None), storage)
        write_table(join(run_url, "classes.parquet"), classes, storage)
        K = scored_checkpoints or plan.K
        manifest = {
            "run_id": run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": redact(cfg.to_dict()),
            "checkpoints": [{**i.as_dict(), "url": redact(i.url)} for i in plan.infos],  # no userinfo
            "num_checkpoints": plan.K,
            "windows": plan.windows,
            "targets": list(plan.opts.targets),
            "keys": keys,
            "primary": plan.primary,
            "label_mode": plan.opts.label_mode,
            "normalization": plan.opts.normalization,
            "rows": {"in": n_in, "scored": n_scored, "rejected": n_rejected},
            "splits": {s: {"rows_in": plan.rows_in.get(s, 0), "rows_scored": scored_by_split.get(s, 0),
                           "rows_rejected": int(rejected_by_split.get(s, 0))} for s in cfg.data.splits},
            "wall_time_s": time.time() - t0,
            "score_wall_time_s": score_wall,
            "throughput": {"examples_per_s": n_in / max(score_wall, 1e-9),
                           "example_checkpoints_per_s": n_in * K / max(score_wall, 1e-9),
                           "checkpoints_scored": K},
            "versions": _versions(),
            "timings_s": {"score": round(score_wall, 3), **steps.t,
                          "publish (tables)": round(time.perf_counter() - t_publish, 3)},
            **extra,
        }
        write_json(join(run_url, "manifest.json"), manifest, storage)
        publish(run_url, plan.out_url, run_id, storage)
    except Exception as e:  # noqa: BLE001 - any failure to write the run is reported the same way
        raise _publish_failed(run_url, run_id, storage, e) from None
    log.info("publish: %.1f s", time.perf_counter() - t_publish)
    result = AuditResult(run_url=run_url, run_id=run_id, manifest=manifest,
                         top=_top_ids(run_url, storage, list(cfg.data.splits)))
    if cfg.report.enabled if report is None else report:
        from .report import build_report

        build_report(run_url, storage=storage)
    return result


def _check_unique_ids(raw, n_rows: int) -> None:
    """Ids must be unique within a split: a duplicate is an error naming it. One distributed sort
    of the ``split``/``id`` columns (:func:`_sample_sort`); each sorted partition reports its
    repeats (nothing per-example reaches the driver)."""
    import ray

    keys = [("split", "ascending"), ("id", "ascending")]
    refs = _block_refs(raw.select_columns(["split", "id"]))
    # equal keys always land in one partition (reduce.partition_block), so each partition's
    # repeats are all there is
    dups = {(r["split"], r["id"]): r["n"] for t in ray.get(_sample_sort(refs, keys, _partitions(n_rows, 1_000_000),
                                                                        "merge_dups"))
            for r in t.to_pylist()}
    if dups:
        listed = ", ".join(f"{i!r} in split {s!r}" + (f" ({n} rows)" if n > 2 else "")
                           for (s, i), n in sorted(dups.items())[:5])
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise ValueError(f"duplicate example ids: {listed}{more}; ids must be unique within a split "
                         "(check the split's id_column)")


def _class_table_exact(ok, keys: list[str]) -> pa.Table:
    """The class table from exact per-block sums (two passes over the scored rows): the same bit
    for bit however the raw table is blocked (see ``reduce.exact_class_sums``)."""
    from .reduce import exact_class_means, exact_class_sums, exact_class_table

    kw = {"batch_format": "pyarrow", "batch_size": None}
    first = ok.map_batches(exact_class_sums, fn_kwargs={"vog_keys": list(keys)}, **kw).take_all()
    means = exact_class_means(first, keys)
    second = ok.map_batches(exact_class_sums, fn_kwargs={"vog_keys": list(keys), "means": means}, **kw).take_all()
    return exact_class_table(first, second, keys)


def _publish_failed(run_url: str, run_id: str, storage: StorageOptions, e: BaseException) -> RuntimeError:
    """The error for a run that could not be written; removes what was written (best effort)."""
    root: BaseException = e
    while (getattr(root, "cause", None) or root.__cause__) not in (None, root):
        root = getattr(root, "cause", None) or root.__cause__
    msg = redact(str(root) or type(root).__name__)
    # Ray Data appends retry-tuning hints to I/O errors: keep the error and what failed
    msg = "; ".join(x.strip() for x in re.split(r"\n(?:This looks like|To change retry)", msg)[0].splitlines()
                    if x.strip())
    where = redact(run_url)
    try:
        fs, path = resolve(run_url, storage)
        if fs.exists(path + "/" + SUCCESS):
            return RuntimeError(f"run {run_id} was published at {where}, but LATEST could not be updated: {msg}")
        fs.rm(path, recursive=True)
    except Exception:  # noqa: BLE001 - the store may be unreachable: readers ignore it anyway
        pass
    return RuntimeError(f"could not publish run {run_id} to {where}: {msg}; nothing was published "
                        f"(a run without {SUCCESS} is never listed or opened)")


def _partitions(n_rows: int, rows_per_partition: int = 100_000) -> int:
    return int(max(1, min(200, -(-n_rows // rows_per_partition))))


@functools.cache
def _sort_tasks():
    """The Ray tasks of :func:`_sample_sort` (made once, when Ray is there)."""
    import ray

    from . import reduce as R

    @ray.remote
    def sample(block, sort_keys, k):
        return R.sort_key_sample(block, sort_keys, k)

    @ray.remote
    def cut(block, sort_keys, boundaries):
        parts = R.partition_block(block, sort_keys, boundaries)
        return parts if len(parts) > 1 else parts[0]

    @ray.remote(num_returns=2)
    def merge_counted(sort_keys, *parts):
        t = R.merge_sorted(list(parts), sort_keys)
        return t, R.block_counts(t)

    @ray.remote
    def merge_dups(sort_keys, *parts):
        return R._adjacent_duplicates(R.merge_sorted(list(parts), sort_keys))

    @ray.remote
    def assign(block, so, co, sizes):
        return R.assign_ranks(block, so, co, sizes)

    # S3 answers that s3fs's own retries did not absorb (throttling, 5xx) are retried here
    @ray.remote(num_returns=2, max_retries=3, retry_exceptions=[OSError])
    def read_files(paths, url, storage):
        t = _read_parquet_files(paths, url, storage)
        return t, R._status_counts(t)

    @ray.remote(num_returns=2)
    def merge_examples(sort_keys, vog_keys, num_groups, *parts):
        t = _merge_examples(R.merge_sorted(list(parts), sort_keys), vog_keys, num_groups)
        return t, t.num_rows

    return {"sample": sample, "cut": cut, "merge_counted": merge_counted, "merge_dups": merge_dups,
            "assign": assign, "merge_examples": merge_examples, "read_files": read_files}


def _read_parquet_files(paths: list[str], url: str, storage: dict[str, Any]) -> pa.Table:
    """Parquet files (paths in the filesystem of ``url``) → one table; list columns as plain
    fixed-size lists; files whose columns differ (a batch of rejected rows only) are unified."""
    import pyarrow.parquet as pq

    from .reduce import _sigs_to_lists

    fs, _ = resolve(url, StorageOptions(**storage))
    tables = []
    for p in paths:
        with fs.open(p, "rb") as f:
            tables.append(_sigs_to_lists(pq.read_table(f)))
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def read_raw(url: str, storage: StorageOptions, num_blocks: int):
    """A directory of Parquet files → (dataset, rows per split scored, rows per split rejected),
    read by ``num_blocks`` Ray tasks into the object store (nothing reaches the driver but the
    per-split counts)."""
    import ray
    import ray.data

    fs, path = resolve(url, storage)
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {redact(url)}")
    chunks = [list(c) for c in np.array_split(np.array(files, dtype=object), min(num_blocks, len(files))) if len(c)]
    outs = [_sort_tasks()["read_files"].remote(c, url, dataclasses.asdict(storage)) for c in chunks]
    scored: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for counts in ray.get([o[1] for o in outs]):
        for row in counts.to_pylist():
            d = scored if row["ok"] else rejected
            d[row["split"]] = d.get(row["split"], 0) + int(row["n"])
    return ray.data.from_arrow_refs([o[0] for o in outs]), scored, rejected


def _merge_examples(t: pa.Table, vog_keys: list[str], num_groups: int) -> pa.Table:
    """A table sorted by (split, id, group), ``num_groups`` rows per example → one merged moment
    row per example: Chan's merge of ``PixelMoments`` vectorised over the examples (the same
    updates in group order, the same float64 operations in the same order as merging one example
    at a time — tests/test_sort.py checks the bits); signals concatenated in checkpoint order,
    prediction and target from the last group (the run's last checkpoint)."""
    n = t.num_rows
    if n == 0:
        return t
    s = t.column("split").to_numpy(zero_copy_only=False).astype(object)
    i = t.column("id").to_numpy(zero_copy_only=False).astype(object)
    starts = np.r_[0, np.flatnonzero((s[1:] != s[:-1]) | (i[1:] != i[:-1])) + 1, n]
    counts = np.diff(starts)
    if np.any(counts != num_groups):
        j = int(np.flatnonzero(counts != num_groups)[0])
        raise RuntimeError(f"example {i[starts[j]]!r}: expected {num_groups} partial rows, got {int(counts[j])}")
    E, G = len(counts), num_groups
    first = pa.array(starts[:-1])
    last = pa.array(starts[1:] - 1)
    cols: dict[str, Any] = {c: t[c].take(last) for c in t.column_names
                            if c in ("id", "split", "label", "status", "target_label", "pred")}
    cols["group"] = pa.array(np.zeros(E, np.int64), pa.int64())
    for k in vog_keys:
        ns = t[f"mn_{k}"].to_numpy().astype(np.int64).reshape(E, G)
        means = _list_values(t[f"mmean_{k}"]).astype(np.float64)
        m2s = _list_values(t[f"mm2_{k}"]).astype(np.float64)
        P = means.shape[1]
        means, m2s = means.reshape(E, G, P), m2s.reshape(E, G, P)
        n_acc, mean, m2 = ns[:, 0].copy(), means[:, 0].copy(), m2s[:, 0].copy()
        for g in range(1, G):
            nb = ns[:, g]
            tot = n_acc + nb
            safe = np.where(tot > 0, tot, 1)
            delta = means[:, g] - mean
            merged_mean = mean + delta * (nb / safe)[:, None]
            merged_m2 = m2 + m2s[:, g] + delta * delta * (n_acc * nb / safe)[:, None]
            take_b = (n_acc == 0)[:, None]
            keep = (nb == 0)[:, None]
            mean = np.where(keep, mean, np.where(take_b, means[:, g], merged_mean))
            m2 = np.where(keep, m2, np.where(take_b, m2s[:, g], merged_m2))
            n_acc = tot
        cols[f"mn_{k}"] = pa.array(n_acc, pa.int64())
        cols[f"mmean_{k}"] = _fsl(mean)
        cols[f"mm2_{k}"] = _fsl(m2)
    for c in t.column_names:
        if c.startswith("sig_"):  # group g's rows hold that group's checkpoints, in order
            per_group = [_list_values(t[c].take(pa.array(np.arange(g, n, G)))) for g in range(G)]
            cols[c] = _fsl(np.concatenate(per_group, axis=1))
    for c in t.column_names:
        if c not in cols and c not in _STATE_META and not c.startswith(_MOMENT_PREFIXES):
            cols[c] = t[c].take(first)
    return pa.table(cols)


def merge_by_example(ds, vog_keys: list[str], num_groups: int, num_rows: int):
    """Partial moment rows (``group`` 0 … num_groups - 1 of each example) → one merged row per
    example, as a dataset: a distributed sort by (split, id, group) (:func:`_sample_sort`), then
    each sorted partition merges its runs of equal ids (Chan, in group order)."""
    import ray
    import ray.data

    keys = [("split", "ascending"), ("id", "ascending"), ("group", "ascending")]
    merged = _sample_sort(_block_refs(ds), keys, _partitions(num_rows, 20_000), "merge_examples",
                          args=(vog_keys, num_groups))
    sizes = ray.get([m[1] for m in merged])
    refs = [m[0] for m, n in zip(merged, sizes) if n]
    return ray.data.from_arrow_refs(refs) if refs else None


def _block_refs(ds) -> list:
    """The blocks of a dataset as object refs, in order (it is executed; nothing reaches the driver)."""
    return [r for bundle in ds.materialize().iter_internal_ref_bundles() for r in bundle.block_refs]


def _sample_sort(refs: list, sort_keys: list[tuple[str, str]], partitions: int, merge: str,
                 args: tuple = ()) -> list:
    """A sample sort of the blocks ``refs`` into ``partitions`` sorted partitions, with Ray tasks
    (the steps are :func:`reduce.sort_key_sample`, :func:`reduce.choose_boundaries`,
    :func:`reduce.partition_block`, :func:`reduce.merge_sorted`). Returns what the ``merge`` task
    gives for each partition, in sort order. The driver sees only the samples (``SORT_SAMPLES`` keys
    per block) and the boundaries."""
    import ray

    T = _sort_tasks()
    if partitions > 1 and refs:
        samples = ray.get([T["sample"].remote(r, sort_keys, SORT_SAMPLES) for r in refs])
        bounds = choose_boundaries(samples, sort_keys, partitions)
        partitions = bounds.num_rows + 1
    if partitions > 1 and refs:
        bref = ray.put(bounds)
        cut = [T["cut"].options(num_returns=partitions).remote(r, sort_keys, bref) for r in refs]
        columns = [[c[p] for c in cut] for p in range(partitions)]
    else:
        columns = [list(refs)]
    return [T[merge].remote(sort_keys, *args, *col) for col in columns]


SORT_SAMPLES = 64  # sort keys sampled per block to choose the partition boundaries


def _rank(ds, num_rows: int):
    """Distributed sort by (split, score desc, id) (:func:`_sample_sort`), then ranks from
    per-partition offsets. Returns the ranked dataset and the rows per split."""
    import ray
    import ray.data

    merged = _sample_sort(_block_refs(ds), SORT_KEYS, _partitions(num_rows), "merge_counted")
    sorted_refs = [m[0] for m in merged]
    counts = ray.get([m[1] for m in merged])
    sizes, offsets = rank_offsets(counts)
    out_refs = [_sort_tasks()["assign"].remote(r, so, co, sizes) for r, (so, co) in zip(sorted_refs, offsets)]
    return ray.data.from_arrow_refs(out_refs), sizes


def _top_ids(run_url: str, storage: StorageOptions, splits: list[str], k: int = 10) -> dict[str, list[str]]:
    from .runs import Run, read_json

    run = Run(run_url, read_json(join(run_url, "manifest.json"), storage), storage)
    out: dict[str, list[str]] = {}
    best: dict[str, list[tuple[int, str]]] = {}
    for b in run.iter_scores(columns=["id", "split", "rank"]):
        d = b.to_pydict()
        for i, s, r in zip(d["id"], d["split"], d["rank"]):
            if r <= k:
                best.setdefault(s, []).append((r, i))
    for s in splits:
        out[s] = [i for _, i in sorted(best.get(s, []))]
    return out
