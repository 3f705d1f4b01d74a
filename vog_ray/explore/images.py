"""Images for the explorer's pages: thumbnails read from the source data by id (a page's images
fetched together, in the background, as soon as the page is rendered, so its ``<img>`` requests
find them in the cache), the placeholder for an example whose image cannot be read, and the VoG
heat maps, one :class:`~.heatmap.MapMaker` per key (its checkpoints loaded once)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ..report import figures as F
from .heatmap import MapMaker

__all__ = ["ImageCache", "HeatMaps", "placeholder_png"]

log = logging.getLogger("vog_ray.explore")

CACHE_IMAGES = 4096      # decoded source images kept (a few pages of thumbnails)
CACHE_HEATMAPS = 256     # heat-map PNGs kept
FETCH_THREADS = 2        # background fetches (each reads a page's images in one pass)

Loader = Callable[[str, list[str]], dict[str, np.ndarray]]   # (split, ids) -> id -> image


def placeholder_png(size: int = 96) -> bytes:
    """A gray tile for an example whose image cannot be read."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "#e6e6e6")
    ImageDraw.Draw(im).text((size // 2 - 10, size // 2 - 6), "n/a", fill="#777777")
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


MISSING = object()   # not in a cache (None is a cached "no image")


class _LRU:
    def __init__(self, size: int):
        self.size, self.d, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, k: Any, default: Any = None) -> Any:
        with self.lock:
            if k in self.d:
                self.d.move_to_end(k)
                return self.d[k]
        return default

    def put(self, k: Any, v: Any) -> None:
        with self.lock:
            self.d[k] = v
            self.d.move_to_end(k)
            while len(self.d) > self.size:
                self.d.popitem(last=False)


class ImageCache:
    """Source images by ``(split, id)``; ``None`` is cached too (an id whose image cannot be read)."""

    def __init__(self, loader: Loader):
        self.loader = loader
        self.cache = _LRU(CACHE_IMAGES)
        self.pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="vog-explore-fetch")
        self.pending: dict[tuple[str, str], Future] = {}
        self.lock = threading.Lock()

    def _load(self, split: str, ids: list[str]) -> dict[str, Any]:
        try:
            got = self.loader(split, ids)
        except Exception as e:  # noqa: BLE001 - unreadable source data: the page shows placeholders
            log.warning("images of split %r could not be read: %s", split, e)
            got = {}
        for i in ids:
            self.cache.put((split, i), got.get(i))
        with self.lock:
            for i in ids:
                self.pending.pop((split, i), None)
        return got

    def prefetch(self, split: str, ids: list[str]) -> None:
        """Read the images of ``ids`` not cached yet, in one background pass."""
        with self.lock:
            todo = [i for i in dict.fromkeys(ids) if (split, i) not in self.pending
                    and self.cache.get((split, i), MISSING) is MISSING]
            if not todo:
                return
            fut = self.pool.submit(self._load, split, todo)
            for i in todo:
                self.pending[(split, i)] = fut

    def get(self, split: str, example_id: str) -> np.ndarray | None:
        key = (split, example_id)
        with self.lock:
            fut = self.pending.get(key)
        if fut is not None:
            return fut.result().get(example_id)
        hit = self.cache.get(key, MISSING)
        if hit is not MISSING:
            return hit
        return self._load(split, [example_id]).get(example_id)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class HeatMaps:
    """Heat-map PNGs by ``(split, id, key, overlay)``: one :class:`MapMaker` per key, made on
    first use; the engine runs one map at a time."""

    def __init__(self, make: Callable[[str], MapMaker]):
        self.make = make
        self.makers: dict[str, MapMaker] = {}
        self.cache = _LRU(CACHE_HEATMAPS)
        self.lock = threading.Lock()

    def maker(self, key: str) -> MapMaker:
        """The key's :class:`MapMaker` (made on first use; a failure is raised, not kept)."""
        with self.lock:
            if key not in self.makers:
                self.makers[key] = self.make(key)
            return self.makers[key]

    def get(self, split: str, row: dict[str, Any], key: str, overlay: bool, size: int) -> tuple[bytes, Any]:
        """(PNG, the :class:`~.heatmap.VogMap`) of one scored row."""
        ck = (split, row["id"], key)
        maker = self.maker(key)
        with self.lock:
            vm = self.cache.get(ck)
            if vm is None:
                vm = maker.maps(split, [row])[str(row["id"])]
                self.cache.put(ck, vm)
        pix = vm.pixels()
        if pix is None:
            raise ValueError("a vector input has no image to draw its heat map on")
        return F.heatmap_png(vm.image, pix, overlay=overlay, min_size=size), vm
