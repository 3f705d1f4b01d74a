"""An exclusive lock on a directory of an output URL: a ``lock`` file created with exclusive
create (``open(..., "xb")``: O_EXCL locally, a conditional write — If-None-Match — on S3) that
names its holder. The incremental state and the work directory of an audit take one each.

A lock left by a process that died on this host (its pid gone, or reused by another process) is
taken over; a lock held from another host is reported with its holder and age, to be removed by
hand if that audit died (this host cannot tell whether it runs).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from typing import Any

from ..storage import StorageOptions, join, resolve

__all__ = ["DirLock", "LockHeld", "process_start"]

log = logging.getLogger("vog_ray")
HOLDER_READ_TRIES = 20  # a local lock file exists a moment before its holder's record is in it
HOLDER_READ_WAIT_S = 0.05


class LockHeld(RuntimeError):
    """Another process holds the lock."""


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), None if it does not run (or
    is a zombie) — a pid and its start time name one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


class DirLock:
    """``with DirLock(url, storage):`` holds ``<url>/lock``; raises :attr:`error` when another live
    process holds it. Subclasses name what they lock (:attr:`what`) and the error they raise."""

    what = "another process"
    error: type[Exception] = LockHeld
    advice = "if it died, delete the lock file"

    def __init__(self, url: str, storage: StorageOptions | None):
        self.fs, self.path = resolve(join(url, "lock"), storage)
        self.token = secrets.token_hex(8)

    def __enter__(self) -> "DirLock":
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        pid = os.getpid()
        info = {"token": self.token, "host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for attempt in range(2):
            try:
                with self.fs.open(self.path, "xb") as f:
                    f.write(json.dumps(info).encode())
                return self
            except (FileExistsError, OSError) as e:
                if not self.fs.exists(self.path):
                    raise
                held = self._holder()
                if attempt == 0 and self._dead(held) and self._remove_if(held):
                    log.warning("took over the lock %s left by pid %s (%s), which no longer runs",
                                self.path, held.get("pid"), held.get("since"))
                    continue
                raise self.error(
                    f"{self.what} holds the lock {self.path} (host {held.get('host')}, pid {held.get('pid')}, "
                    f"since {held.get('since')}); {self.advice}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _dead(held: dict[str, Any]) -> bool:
        """The holder ran on this host and runs no more."""
        if not held or held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
            return False
        start = process_start(held["pid"])
        return start is None or (held.get("pid_start") is not None and start != held["pid_start"])

    def _remove_if(self, held: dict[str, Any]) -> bool:
        """Remove the lock file if it still holds ``held`` (not a lock taken meanwhile)."""
        try:
            if self._holder().get("token") != held.get("token"):
                return False
            self.fs.rm_file(self.path)
            return True
        except FileNotFoundError:
            return True

    def _holder(self) -> dict[str, Any]:
        """Who holds the lock (best effort: a local lock file is created before it is written)."""
        for _ in range(HOLDER_READ_TRIES):
            try:
                with self.fs.open(self.path, "rb") as f:
                    held = json.loads(f.read().decode() or "{}")
                if held:
                    return held
            except FileNotFoundError:
                return {}
            except Exception:  # noqa: BLE001 - half-written: try again
                pass
            time.sleep(HOLDER_READ_WAIT_S)
        return {}

    def __exit__(self, *exc: Any) -> None:
        try:
            with self.fs.open(self.path, "rb") as f:
                mine = json.loads(f.read().decode() or "{}").get("token") == self.token
            if mine:
                self.fs.rm_file(self.path)  # never a glob: an output URL may hold [ ] * ?
        except FileNotFoundError:
            pass
