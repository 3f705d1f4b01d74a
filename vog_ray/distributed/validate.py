"""The publishing gate: a written run is checked against its invariants (:mod:`vog_ray.verify`)
before ``_SUCCESS`` — the per-file summaries of its tables and of its source run as Ray tasks, so
nothing per-example reaches the driver — and a run that breaks one is not published."""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..verify import RunInvalid, verify_run
from .cluster import remote_task

__all__ = ["ray_map", "publish_gate"]

log = logging.getLogger("vog_ray")

# a summary task mostly waits on reads; half a CPU lets it run beside the scorer's leftovers
VALIDATE_CPUS = 0.5


def ray_map(fn: Callable[..., Any], args: list[tuple]) -> list:
    """``[fn(*a) for a in args]`` as Ray tasks (``fn``: module-level, in a module without torch)."""
    import ray

    if not args:
        return []
    task = remote_task(fn, num_cpus=VALIDATE_CPUS)
    return ray.get([task.remote(*a) for a in args])


def publish_gate(plan: Any, *, source: bool = True) -> Callable[[str], None]:
    """The check ``write_run`` runs on a written run: every invariant, the source read again with
    the audit's own config (unless ``source`` is False). Raises
    :class:`~vog_ray.verify.RunInvalid` naming what broke."""

    def gate(run_url: str) -> None:
        verdict = verify_run(run_url, plan.storage, cfg=plan.cfg, source=source, mapper=ray_map)
        if not verdict.ok:
            raise RunInvalid(verdict.message())
        log.info("validate: %d rows, every invariant holds (%s)", verdict.rows, ", ".join(verdict.checked))

    return gate
