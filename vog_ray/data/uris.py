"""Reading objects by URI — the images a manifest lists, the files a Hugging Face image struct
names by ``path``: one filesystem per protocol, relative URIs under a base directory, retries with
back-off, and a failure as a reject payload (``fetch_error: …``) instead of an exception. Every
object is read by its exact key; nothing lists a bucket. Imports neither Ray nor torch."""

from __future__ import annotations

import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from ..storage import StorageOptions, resolve
from .rows import reject_payload

__all__ = ["Fetcher", "fetch_uris", "is_absolute", "read_object", "RETRY_BASE_S"]

RETRY_BASE_S = 0.2        # first back-off of a failed fetch; doubled at every retry
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_NOT_RETRIED = (FileNotFoundError, PermissionError, IsADirectoryError)  # the answer will not change


def read_object(fs: Any, path: str) -> bytes:
    """One object's bytes in one GET. s3fs's ``cat_file`` first asks for the size (a HEAD, and a
    LIST of the key as a prefix when the object is missing) to split large objects into parallel
    ranges; with ``max_concurrency=1`` it sends the GET alone."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("s3", "s3a"):
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def is_absolute(uri: str) -> bool:
    """Whether a URI names its object by itself (a scheme, or a local absolute path)."""
    return bool(_SCHEME.match(uri)) or uri.startswith("/")


class Fetcher:
    """Reads objects by URI: one filesystem per protocol (built once), relative URIs joined to
    ``base_dir`` on ``base_fs``, failures retried with exponential back-off, never a listing."""

    def __init__(self, storage: StorageOptions | None, base_fs: Any, base_dir: str, retries: int):
        self._storage, self._base_fs, self._base_dir = storage or StorageOptions(), base_fs, base_dir
        self._retries = retries
        self._fs: dict[str, Any] = {}

    def locate(self, uri: str) -> tuple[Any, str]:
        """``(filesystem, path)`` of a URI (a relative one is under the base directory)."""
        if _SCHEME.match(uri):
            proto = uri.split("://", 1)[0].lower()
            if proto not in self._fs:
                self._fs[proto] = resolve(uri, self._storage)[0]
            fs = self._fs[proto]
            return fs, fs._strip_protocol(uri) if proto not in ("file", "local") else uri.split("://", 1)[1]
        if uri.startswith("/"):
            if "file" not in self._fs:
                self._fs["file"] = resolve(uri, self._storage)[0]
            return self._fs["file"], uri
        return self._base_fs, posixpath.normpath(posixpath.join(self._base_dir, uri))

    def fetch(self, uri: Optional[str]) -> Optional[bytes]:
        """The object's bytes, ``None`` for a null URI, or a reject payload (``fetch_error: …``)."""
        if uri is None or uri == "":
            return None
        err: BaseException | None = None
        for attempt in range(self._retries + 1):
            try:
                fs, path = self.locate(uri)
                return read_object(fs, path)
            except _NOT_RETRIED as e:
                err = e
                break
            except Exception as e:  # noqa: BLE001 - transient or not, the row must say why
                err = e
                if attempt < self._retries:
                    time.sleep(RETRY_BASE_S * 2 ** attempt)
        msg = re.sub(r"\s+", " ", str(err)).strip()
        return reject_payload(f"fetch_error: {type(err).__name__}: {msg}"[:240])


def fetch_uris(fetcher: Fetcher, uris: list[Optional[str]], threads: int) -> list[Optional[bytes]]:
    """Each URI's payload, ``threads`` fetches at a time, in the order given."""
    if len(uris) <= 1 or threads <= 1:
        return [fetcher.fetch(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
        return list(pool.map(fetcher.fetch, uris))
