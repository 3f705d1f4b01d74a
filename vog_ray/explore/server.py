"""Running the explorer: :func:`serve` (``vog-ray explore``: uvicorn in the foreground, bound to
127.0.0.1 unless told otherwise) and :class:`ExplorerServer` (the same app in a background
thread, for tests and benchmarks)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..storage import StorageOptions
from .app import LOOPBACK, Explorer, create_app

__all__ = ["serve", "ExplorerServer", "DEFAULT_PORT"]

DEFAULT_PORT = 8765
START_TIMEOUT_S = 30

log = logging.getLogger("vog_ray.explore")


def serve(run: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, storage: StorageOptions | None = None,
          data_storage: StorageOptions | None = None, device: str = "cpu", announce=print) -> None:
    """Serve the explorer of ``run`` (a run URL or an output URL: its latest run) until stopped."""
    import uvicorn

    ex = Explorer(run, storage=storage, data_storage=data_storage, device=device)
    ex.warm()
    if host not in LOOPBACK:
        log.warning("the explorer is bound to %s: anyone who can reach this address can browse the run", host)
    shown = f"[{host}]" if ":" in host else host
    announce(f"explorer of run {ex.run.run_id} ({ex.run.url}): http://{shown}:{port}/  (Ctrl-C stops it)")
    try:
        uvicorn.run(create_app(ex, host=host), host=host, port=port, log_level="warning")
    finally:
        ex.close()


class ExplorerServer:
    """The explorer on a free (``port=0``) or given port in a background thread::

        with ExplorerServer(run_url) as srv:
            urllib.request.urlopen(srv.url + "/")
    """

    def __init__(self, run: str, *, host: str = "127.0.0.1", port: int = 0, **kwargs: Any):
        self.explorer = Explorer(run, **kwargs)
        self.host, self.port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ExplorerServer":
        import uvicorn

        self.explorer.warm()
        config = uvicorn.Config(create_app(self.explorer, host=self.host), host=self.host, port=self.port,
                                log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="vog-explorer", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the explorer did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT_S)
        self.explorer.close()
