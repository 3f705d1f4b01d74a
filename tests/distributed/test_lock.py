"""The directory lock (``distributed/lock.py``) that the work directory and the incremental state
take: a live holder makes the next taker fail naming it; a lock left by a process that died on
this host is taken over; a holder on another host is never presumed dead. No Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from vog_ray.distributed.lock import DirLock, LockHeld, process_start
from vog_ray.distributed.stage import WorkLock


def _write_lock(url, **holder) -> None:
    os.makedirs(url, exist_ok=True)
    with open(os.path.join(url, "lock"), "w") as f:
        json.dump({"token": "t0", "since": "2026-01-01T00:00:00Z", **holder}, f)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_holder_is_named_and_kept(tmp_path):
    url = str(tmp_path / "work")
    with WorkLock(url, None):
        with pytest.raises(LockHeld, match=rf"another audit of the same config holds the lock .*pid {os.getpid()}"):
            with WorkLock(url, None):
                pass
        assert os.path.exists(os.path.join(url, "lock"))
    assert not os.path.exists(os.path.join(url, "lock"))


def test_a_lock_of_a_dead_local_process_is_taken_over(tmp_path, caplog):
    url = str(tmp_path / "work")
    pid = _dead_pid()
    _write_lock(url, host=socket.gethostname(), pid=pid, pid_start="1")
    with DirLock(url, None) as lock:
        with open(os.path.join(url, "lock")) as f:
            assert json.load(f)["token"] == lock.token
    assert f"left by pid {pid}" in caplog.text


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """The holder's pid now names another process (its start time differs): taken over."""
    url = str(tmp_path / "work")
    _write_lock(url, host=socket.gethostname(), pid=os.getpid(), pid_start="0")
    assert process_start(os.getpid()) not in (None, "0")
    with DirLock(url, None):
        pass


def test_a_holder_on_another_host_is_never_presumed_dead(tmp_path):
    url = str(tmp_path / "work")
    _write_lock(url, host="some-other-host", pid=_dead_pid(), pid_start="1")
    with pytest.raises(LockHeld, match="host some-other-host"):
        with DirLock(url, None):
            pass


def test_too_few_checkpoints_waits_and_an_unfillable_window_is_a_config_error():
    from vog_ray.config import ConfigError, validate
    from vog_ray.distributed.incremental import TooFewCheckpoints, check_window_counts

    def cfg(windows):
        return validate({"data": {"splits": {"t": {"format": "npz", "url": "x.npz"}}}, "model": "lenet",
                         "checkpoints": "c/*.pt", "output": {"url": "o"}, "vog": {"windows": windows}}, "s.yaml")

    with pytest.raises(TooFewCheckpoints, match=r"1 checkpoint\(s\) so far"):
        check_window_counts(cfg({"all": "all"}), 1)
    with pytest.raises(TooFewCheckpoints):
        check_window_counts(cfg({"early": "first:3"}), 2)
    check_window_counts(cfg({"all": "all", "early": "first:3"}), 3)
    with pytest.raises(ConfigError, match=r"invalid config s\.yaml:\n  vog\.windows: window 'one' = 'first:1'"):
        check_window_counts(cfg({"one": "first:1"}), 5)
