"""A fault-injecting HTTP proxy for tests: sits on 127.0.0.1 in front of an S3 endpoint (moto).

    with FaultProxy(s3.endpoint, rule=fail_first(5)) as proxy:
        storage.endpoint_url = proxy.url        # clients talk to the proxy
        ...
        proxy.injected, proxy.forwarded           # counters

Every request is forwarded byte for byte — method, path and query, every header as sent
(``Host`` included, so a SigV4 signature made for the proxy's address is what the upstream
sees), and the body — unless the ``rule`` answers it with a fault:

* :func:`fail_first` — ``503 SlowDown`` (an S3 XML error body) for the first N requests;
* :func:`fail_window` — ``503 SlowDown`` for every request during the first S seconds;
* :func:`fail_every` — ``503 SlowDown`` for every k-th request;
* :func:`refuse_writes` — ``403 AccessDenied`` for writes (PUT/POST/DELETE) whose path contains a
  substring (e.g. ``/runs/``), from the moment :meth:`FaultProxy.arm` is called;

a rule is any ``callable(method, path, n) -> Fault | None`` (``n`` counts requests from 1).
A faulted request's body is read (drained) first, so a keep-alive connection stays usable.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "Fault", "fail_first", "fail_window", "fail_every", "refuse_writes", "SLOW_DOWN"]


@dataclass(frozen=True)
class Fault:
    status: int
    code: str
    message: str

    def body(self, n: int) -> bytes:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code>'
                f"<Message>{self.message}</Message><RequestId>fault-{n}</RequestId>"
                f"<HostId>faultproxy</HostId></Error>").encode()


SLOW_DOWN = Fault(503, "SlowDown", "Please reduce your request rate.")
ACCESS_DENIED = Fault(403, "AccessDenied", "Access Denied (faultproxy: writes refused)")

Rule = Callable[[str, str, int], Optional[Fault]]


def fail_first(n: int, fault: Fault = SLOW_DOWN) -> Rule:
    return lambda method, path, i: fault if i <= n else None


def fail_window(seconds: float, fault: Fault = SLOW_DOWN) -> Rule:
    t0: list[float] = []

    def rule(method: str, path: str, i: int) -> Optional[Fault]:
        if not t0:
            t0.append(time.monotonic())
        return fault if time.monotonic() - t0[0] < seconds else None

    return rule


def fail_every(k: int, fault: Fault = SLOW_DOWN, first: int = 0) -> Rule:
    """Fault the first ``first`` requests, then every ``k``-th one."""
    return lambda method, path, i: fault if (i <= first or i % k == 0) else None


def refuse_writes(path_contains: str, fault: Fault = ACCESS_DENIED) -> Rule:
    """Refuse writes under a path, once the proxy is armed (:meth:`FaultProxy.arm`)."""
    def rule(method: str, path: str, i: int) -> Optional[Fault]:
        if method in ("PUT", "POST", "DELETE") and path_contains in path.split("?", 1)[0]:
            return fault
        return None

    rule.needs_arm = True  # type: ignore[attr-defined]
    return rule


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


@dataclass
class _Stats:
    requests: int = 0
    injected: int = 0
    forwarded: int = 0
    injected_paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 (a free port) in front of ``upstream``."""

    def __init__(self, upstream: str, rule: Optional[Rule] = None):
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.rule = rule
        self.armed = not getattr(rule, "needs_arm", False)
        self.stats = _Stats()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()
                with proxy.stats.lock:
                    proxy.stats.requests += 1
                    n = proxy.stats.requests
                fault = proxy.rule(self.command, self.path, n) if (proxy.rule and proxy.armed) else None
                if fault is not None:
                    with proxy.stats.lock:
                        proxy.stats.injected += 1
                        proxy.stats.injected_paths.append(f"{self.command} {self.path}")
                    payload = fault.body(n)
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("x-amz-request-id", f"fault-{n}")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() in _HOP_BY_HOP:
                            continue
                        conn.putheader(k, v)
                    if "content-length" not in {k.lower() for k in self.headers.keys()} and body:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body if body else None)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response_only(resp.status, resp.reason)
                    has_len = False
                    for k, v in resp.getheaders():
                        if k.lower() in _HOP_BY_HOP:
                            continue
                        if k.lower() == "content-length":
                            has_len = True
                            if self.command != "HEAD":
                                v = str(len(data))
                        self.send_header(k, v)
                    if not has_len:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()
                with proxy.stats.lock:
                    proxy.stats.forwarded += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: Optional[threading.Thread] = None

    # counters ---------------------------------------------------------------------------------
    @property
    def injected(self) -> int:
        return self.stats.injected

    @property
    def forwarded(self) -> int:
        return self.stats.forwarded

    @property
    def requests(self) -> int:
        return self.stats.requests

    def arm(self) -> None:
        self.armed = True

    # lifecycle --------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- a slow model, so that a test can kill a process while stage 1 is running ----------------


def slow_small_cnn(delay: float = 0.0, **kwargs):
    """``vog_ray.models.SmallCNN`` (same weights, same numbers) whose forward sleeps ``delay`` s.

    Named in a config as ``{"name": "tests.faultproxy:slow_small_cnn", "delay": 0.05, ...}``.
    With ``VOG_TEST_FORWARD_LOG`` set (in the workers' env), every forward call appends the pid of
    its process to that file: a test sees how far scoring is, and which process scores."""
    import os as _os
    import time as _time

    from vog_ray.models.registry import SmallCNN

    log = _os.environ.get("VOG_TEST_FORWARD_LOG")

    class SlowSmallCNN(SmallCNN):
        def forward(self, x):
            _time.sleep(delay)
            if log:
                with open(log, "a") as f:
                    f.write(f"{_os.getpid()}\n")
            return super().forward(x)

    return SlowSmallCNN(**kwargs)
