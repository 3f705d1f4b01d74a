"""Host-to-device transfer of the engine's input batches: reused pinned host buffers, non-blocking
copies on a side CUDA stream, and a one-thread stager that copies batch i+1 while the caller
computes batch i. On the CPU the same calls make plain float32 tensors (the stager's thread and
ordering still run, so the CPU tests exercise them)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np
import torch

__all__ = ["to_float_tensor", "Staged", "Stager"]

# pinned host buffers in flight at once: the batch being copied and the one before it (whose copy
# may still run when the next batch is written into host memory)
HOST_BUFFERS = 2


def to_float_tensor(x: Any) -> torch.Tensor:
    """A batch as a float32 CPU tensor of its own (Ray's batches are read-only views)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
    return x


class Staged:
    """One batch on its way to the device; :meth:`tensor` waits for the copy on the caller's stream."""

    def __init__(self, t: torch.Tensor, event: Any = None):
        self._t, self._event = t, event

    def tensor(self) -> torch.Tensor:
        if self._event is not None:
            cur = torch.cuda.current_stream(self._t.device)
            cur.wait_event(self._event)
            self._t.record_stream(cur)  # its memory now belongs to the compute stream's timeline
            self._event = None
        return self._t


class Stager:
    """Moves batches to ``device``. On CUDA: the host batch is written into a reused pinned buffer and
    copied with ``non_blocking=True`` on a side stream, so the copy runs while the compute stream
    works; :meth:`prefetch` does that for the next batch in a background thread."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._host: list[torch.Tensor | None] = [None] * HOST_BUFFERS
        self._done: list[Any] = [None] * HOST_BUFFERS  # the event that ends each buffer's last copy
        self._slot = 0
        self._pool: ThreadPoolExecutor | None = None

    def _pinned(self, x: Any) -> tuple[torch.Tensor, int]:
        """``x`` in the next pinned buffer (grown when too small), once that buffer's last copy is
        done; returns the buffer's view and its slot."""
        i = self._slot
        self._slot = (i + 1) % HOST_BUFFERS
        if self._done[i] is not None:
            self._done[i].synchronize()
        shape, n = tuple(x.shape), int(np.prod(x.shape))
        buf = self._host[i]
        if buf is None or buf.numel() < n:
            buf = self._host[i] = torch.empty(n, dtype=torch.float32, pin_memory=True)
        host = buf[:n].view(shape)
        if isinstance(x, torch.Tensor):
            host.copy_(x)
        else:
            np.copyto(host.numpy(), x, casting="unsafe")
        return host, i

    def stage(self, x: Any) -> Staged:
        """Start moving one batch (numpy or a tensor) to the device as float32."""
        if isinstance(x, torch.Tensor) and x.device.type == self.device.type:
            return Staged(x.to(dtype=torch.float32))  # already there (e.g. decoded on the GPU)
        if not self.cuda:
            return Staged(to_float_tensor(x).to(self.device, dtype=torch.float32))
        host, i = self._pinned(x)
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self._done[i] = ev
        return Staged(dev, ev)

    def prefetch(self, batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Staged, Any]]:
        """``(staged x, y)`` per batch; batch i+1 is staged in a background thread while the caller
        works on batch i."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vog-stager")
        it = iter(batches)
        nxt: Future | None = None

        def submit() -> Future | None:
            try:
                x, y = next(it)
            except StopIteration:
                return None
            return self._pool.submit(lambda: (self.stage(x), y))

        nxt = submit()
        while nxt is not None:
            staged, y = nxt.result()
            nxt = submit()
            yield staged, y

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
