"""Local Ray for the tests: :func:`start_test_ray` (a 2-CPU Ray whose workers get a given env),
:class:`SharedRay` (the one such Ray that the integration tests share, restarted only when a module
with its own Ray took its place) and :func:`processes_with_env` (find a test Ray's processes).
"""

from __future__ import annotations

import os
import uuid

__all__ = ["start_test_ray", "SharedRay", "processes_with_env"]

TEST_CPUS = 2            # what CI has
STARTUP_ATTEMPTS = 3     # Ray gives its raylet 30 s to register: too short on a busy machine


def start_test_ray(env_vars: dict | None = None) -> dict:
    """(Re)start a local 2-CPU Ray whose workers get ``env_vars`` (start S3 servers first).

    Returns the env vars given to the workers, with a unique ``VOG_TEST_RAY_MARKER`` among them:
    a process carrying it in its environment belongs to this Ray, and to nothing else."""
    import ray
    import ray.data

    if ray.is_initialized():  # another Ray: its workers lack this env
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {**(env_vars or {}), "VOG_RAY_TORCH_THREADS": "1", "VOG_TEST_RAY_MARKER": uuid.uuid4().hex}
    for attempt in range(STARTUP_ATTEMPTS):
        try:
            ray.init(num_cpus=TEST_CPUS, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env},
                     # a worker may need > 60 s to start on a loaded machine; Ray's default timeout
                     # then kills and restarts workers over and over
                     _system_config={"worker_register_timeout_seconds": 600})
            break
        except Exception as e:  # noqa: BLE001 - retried only for the start-up timeout
            ray.shutdown()
            if attempt == STARTUP_ATTEMPTS - 1 or "timed out during startup" not in str(e):
                raise
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray 2.60's DataSource V2 Parquet reader starts FooterReader actors for every read: 3–15 s a
    # read on 2 busy cores, and the reduce stage reads the raw table ~6 times. The V1 reader keeps
    # the suite within its time budget; VOG_TEST_DATASOURCE_V2=1 runs the default.
    ctx.use_datasource_v2 = os.environ.get("VOG_TEST_DATASOURCE_V2", "0") == "1"
    return env


class SharedRay:
    """The local Ray that the integration tests share (one worker start-up and one ``import torch``
    per worker for the whole session instead of one per module). Its workers get ``env`` (the
    session's S3 endpoint and dummy credentials). ``ensure()`` starts it, or starts it again when a
    module that needs its own Ray shut it down; ``close()`` stops it if it is still the current one."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        self.worker_env: dict[str, str] = {}
        self.starts = 0
        self._node_id: str | None = None

    def current(self) -> bool:
        import ray

        return (self._node_id is not None and ray.is_initialized()
                and ray.get_runtime_context().get_node_id() == self._node_id)

    def ensure(self) -> "SharedRay":
        import ray

        if not self.current():
            self.worker_env = start_test_ray(self.env)
            self._node_id = ray.get_runtime_context().get_node_id()
            self.starts += 1
        return self

    def close(self) -> None:
        import ray

        if self.current():
            ray.shutdown()
        self._node_id = None


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of the live processes whose environment holds ``name=value`` (Linux /proc)."""
    needle = f"{name}={value}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue  # a zombie: dead, waiting to be reaped
        except OSError:
            continue
        if needle in env:
            out.append(int(pid))
    return out
