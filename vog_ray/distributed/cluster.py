"""Ray itself: connecting or starting it, Ray Data's per-audit context, cached remote tasks, and
where the scorer actors run — the GPU decision (and the wait for an autoscaler's GPU nodes), the
CPU-starvation check and the fastest CPU layout (one single-threaded actor per core)."""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from typing import Any, Callable

from ..config import AuditConfig, ComputeSpec

__all__ = ["ensure_ray", "check_address", "running_local_cluster", "UnsupportedAddress", "SUPPORTED_ADDRESSES",
           "configure_data_context", "remote_task", "ray_map", "scorer_gpus", "wait_for_gpus",
           "cpu_layout", "cpu_layout_hint", "check_cpus_left", "TRANSIENT_S3_ERRORS"]

log = logging.getLogger("vog_ray")

# s3fs/botocore (which vog-ray's filesystems use) retry throttling and 5xx answers themselves; when
# those retries run out, Ray Data retries the whole file read/write on these messages as well (its
# defaults name only the messages of pyarrow's own S3 client)
TRANSIENT_S3_ERRORS = ("SlowDown", "[Rr]educe your request rate", "Service ?Unavailable", "InternalError",
                       "RequestTimeout")


class UnsupportedAddress(ValueError):
    """A Ray address form the audit cannot use (refused before any work)."""


SUPPORTED_ADDRESSES = (
    "no address (start a local Ray, or use the cluster that `ray start` runs on this machine), "
    "'local' (always a fresh local Ray), HOST:PORT (the head's GCS address, as `ray start --address` "
    "takes it; from a machine of the cluster), or `ray job submit … -- python jobs/audit.py CONFIG` "
    "from anywhere that reaches the dashboard")


def check_address(address: str | None) -> str | None:
    """The address an audit connects to (``address``, else ``RAY_ADDRESS``, else None), refusing
    forms it cannot use with :class:`UnsupportedAddress`: Ray Client (``ray://``) — Ray Data
    2.60's executor needs the driver's core worker, which a Ray Client process does not have
    (``'Worker' object has no attribute 'core_worker'`` in the first dataset) — and the
    dashboard's ``http(s)://`` address, which is for ``ray job submit``."""
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        return None
    if address.startswith("ray://"):
        raise UnsupportedAddress(
            f"{given} {address!r}: Ray Client (ray://) cannot run an audit — Ray Data needs a driver that is part of "
            f"the cluster. Use {SUPPORTED_ADDRESSES}")
    if address.startswith(("http://", "https://")):
        raise UnsupportedAddress(
            f"{given} {address!r} is a dashboard address: give it to `ray job submit --address`. "
            f"Use {SUPPORTED_ADDRESSES}")
    return address


def running_local_cluster() -> str | None:
    """The GCS address of the cluster that ``ray start`` runs on this machine (what ``ray.init()``
    without an address connects to: Ray's ``ray_current_cluster`` file in its temp dir), or None."""
    try:
        from ray._private.services import find_bootstrap_address
    except ImportError:  # pragma: no cover - Ray moved it: ray.init() itself then says what is wrong
        return None
    return find_bootstrap_address(None) or None


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (``address`` / ``RAY_ADDRESS``), to the cluster ``ray start`` runs on
    this machine (saying so), or start a local Ray (``address="local"`` always starts one)."""
    import ray

    if ray.is_initialized():
        return
    address = check_address(address)
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address in (None, "local"):
        running = running_local_cluster() if address is None else None
        if running:
            # Ray refuses resource numbers for an existing cluster: it has its own
            log.info("using the Ray cluster that `ray start` runs on this machine (%s); --address local starts "
                     "a separate Ray for this audit", running)
            _init(ray, running, address=None, **kwargs)
        else:
            # at least 2 logical CPUs: the scorer actors hold theirs for the whole stage and the read
            # tasks need one more (on a 1-core machine they share the core)
            ray.init(address=address, num_cpus=num_cpus or max(2, os.cpu_count() or 1), include_dashboard=False,
                     **kwargs)
        return
    _init(ray, address, address=address, **kwargs)


def _init(ray: Any, where: str, **kwargs: Any) -> None:
    """``ray.init`` of an existing cluster; a refused connection says what to check."""
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        auth = "" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else (
            "; if the cluster uses token authentication (Ray's default when a token exists), export "
            "RAY_AUTH_MODE=token with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        raise ConnectionError(f"cannot connect to the Ray cluster at {where}: {e}{auth}") from None


def configure_data_context(c: ComputeSpec) -> None:
    """Ray Data's settings for one audit (not left over from an earlier one in this process)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic batches => byte-identical reruns
    ctx.max_errored_blocks = c.max_errored_blocks
    ctx.wait_for_min_actors_s = c.actors.wait_for_min_s or -1  # -1: Ray's "do not wait"
    missing = [p for p in TRANSIENT_S3_ERRORS if p not in ctx.retried_io_errors]
    if missing:
        with warnings.catch_warnings():  # "substring matching will be deprecated": these are regexes
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.retried_io_errors = [*ctx.retried_io_errors, *missing]


@functools.cache
def _remote(fn: Callable, options: tuple) -> Any:
    import ray

    if not options:
        return ray.remote(fn)
    return ray.remote(**{k: list(v) if isinstance(v, tuple) else v for k, v in options})(fn)


def remote_task(fn: Callable, **options: Any) -> Any:
    """``ray.remote(**options)(fn)``, made once per function and options. ``fn`` must be a
    module-level function of a module that does not import torch (the reduce's workers stay
    torch-free)."""
    return _remote(fn, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())))


ITEMS_PER_TASK = 16     # files per task of ray_map: a task per file would cost more than a small file's work
MAP_TASK_CPUS = 0.25    # I/O-bound work (header passes over object storage): four tasks a CPU


def _apply_chunk(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    return [fn(i) for i in items]


def ray_map(fn: Callable[[Any], Any], items: list[Any], *, per_task: int = ITEMS_PER_TASK,
            num_cpus: float = MAP_TASK_CPUS) -> list[Any]:
    """``[fn(i) for i in items]`` computed by Ray tasks of ``num_cpus`` (``per_task`` items each),
    in order. ``fn`` must be a module-level function (or a ``functools.partial`` of one) that Ray
    workers can import."""
    import ray

    task = remote_task(_apply_chunk, num_cpus=num_cpus)
    refs = [task.remote(fn, items[a:a + per_task]) for a in range(0, len(items), max(1, per_task))]
    return [r for chunk in ray.get(refs) for r in chunk]


def scorer_gpus(cfg: AuditConfig) -> float:
    """GPUs per scorer actor (0: score on CPUs), from ``compute.device`` and the cluster's GPUs
    (waiting for an autoscaler when ``compute.gpu_wait_s`` is set)."""
    import ray

    c = cfg.compute
    if c.device not in ("auto", "cuda"):
        return 0.0
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0 or wait_for_gpus(c)
    if c.device == "cuda" and not has_gpu:
        waited = f" after waiting {c.gpu_wait_s} s for the autoscaler" if c.gpu_wait_s else ""
        raise RuntimeError(f"compute.device is 'cuda' but the Ray cluster has no GPU{waited} (on an autoscaling "
                           "cluster whose GPU workers start at 0, set compute.gpu_wait_s)")
    if not has_gpu and c.gpu_wait_s:
        log.warning("no GPU joined the cluster within compute.gpu_wait_s = %d s: scoring on CPUs", c.gpu_wait_s)
    return c.gpus_per_actor if has_gpu else 0.0


def wait_for_gpus(c: ComputeSpec) -> bool:
    """An autoscaling cluster may have no GPU node until something asks for one: ask the autoscaler
    for ``actors.min`` bundles of ``gpus_per_actor`` GPUs and wait up to ``compute.gpu_wait_s`` for a
    GPU to join (progress logged). The request is withdrawn afterwards (the scorer actors then hold
    the GPUs). Returns whether the cluster has a GPU."""
    import ray
    from ray.autoscaler.sdk import request_resources

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
    for the read/decode tasks (so :func:`check_cpus_left` accepts it)."""
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


def check_cpus_left(c: ComputeSpec, cluster_cpus: float, num_groups: int) -> None:
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
