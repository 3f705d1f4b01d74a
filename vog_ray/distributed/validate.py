"""The publishing gate: a written run is checked against its invariants (:mod:`vog_ray.verify`)
before ``_SUCCESS`` — the per-file summaries of its tables and of its source run as Ray tasks, so
nothing per-example reaches the driver (a small run, up to ``LOCAL_ROWS`` input rows, is checked
on threads in the driver: the tasks would cost more than the check) — and a run that breaks one
is not published."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from ..verify import RunInvalid, local_map, verify_run
from .cluster import ray_map as cluster_map

__all__ = ["ray_map", "publish_gate"]

log = logging.getLogger("vog_ray")

# 1 CPU a task: the workers the score stage leaves idle take the gate's tasks (a fractional task
# makes Ray start new workers, ~1 s each on a small node, longer than a small run's whole check);
# a run of files per task, two tasks per CPU: a task per file would cost more than a file's work
VALIDATE_CPUS = 1.0
TASKS_PER_CPU = 2
# up to this many input rows the driver checks the run itself, on threads (vog-ray verify's way,
# memory bounded by a record batch a thread): 0.3 s at 10k rows, where tasks cost 1.4 s
LOCAL_ROWS = 50_000


def _star(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(*args)


def ray_map(fn: Callable[..., Any], args: list[tuple]) -> list:
    """``[fn(*a) for a in args]`` as Ray tasks, in order (``fn``: module-level, in a module
    without torch): ``TASKS_PER_CPU`` tasks per CPU of the cluster, each a contiguous run of
    ``args`` (:func:`.cluster.ray_map`)."""
    import ray

    if not args:
        return []
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return cluster_map(functools.partial(_star, fn), args, per_task=-(-len(args) // (TASKS_PER_CPU * cpus)),
                       num_cpus=VALIDATE_CPUS)


def publish_gate(plan: Any, *, source: bool = True) -> Callable[[str], None]:
    """The check ``write_run`` runs on a written run: every invariant, the source read again with
    the audit's own config (unless ``source`` is False). Raises
    :class:`~vog_ray.verify.RunInvalid` naming what broke."""
    rows = sum(plan.rows_in.values())
    mapper = local_map if rows <= LOCAL_ROWS else ray_map

    def gate(run_url: str) -> None:
        verdict = verify_run(run_url, plan.storage, cfg=plan.cfg, source=source, mapper=mapper)
        if not verdict.ok:
            raise RunInvalid(verdict.message())
        log.info("validate: %d rows, every invariant holds (%s)", verdict.rows, ", ".join(verdict.checked))

    return gate
