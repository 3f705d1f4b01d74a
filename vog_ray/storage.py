"""One place that turns a URL into a filesystem (local paths, file://, s3://, gs://, memory://).

Every reader, checkpoint loader and writer in vog-ray goes through :func:`resolve`, so an
S3-compatible endpoint configured once (``storage.endpoint_url``) is honoured everywhere.
Credentials are never taken from the config: they come from the environment (``AWS_*``,
``GOOGLE_APPLICATION_CREDENTIALS``) as the underlying libraries read them.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

__all__ = ["StorageOptions", "resolve", "join", "natural_key", "expand", "redact_url", "list_files",
           "atomic_write", "is_local"]


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret options for object storage."""

    endpoint_url: str | None = None
    anonymous: bool = False
    region: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        if protocol in ("s3", "s3a"):
            opts: dict[str, Any] = {"anon": self.anonymous}
            client: dict[str, Any] = {}
            endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                client["endpoint_url"] = endpoint
            if self.region:
                client["region_name"] = self.region
            if client:
                opts["client_kwargs"] = client
            # Writes of a run must not leave half-uploaded objects behind; and listings must
            # see what another process wrote a moment ago.
            opts["use_listings_cache"] = False
            opts.update(self.extra)
            return opts
        if protocol in ("gs", "gcs"):
            opts = {"token": "anon"} if self.anonymous else {}
            opts.update(self.extra)
            return opts
        return dict(self.extra)


def _protocol(url: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    return m.group(1).lower() if m else "file"


def resolve(url: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a URL or local path."""
    storage = storage or StorageOptions()
    url = os.fspath(url)
    proto = _protocol(url)
    opts = storage.for_protocol(proto)
    # skip_instance_cache: a filesystem must see the endpoint/credentials of *this* call
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **opts)
    if proto == "file":
        path = os.path.abspath(path)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL path segments with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path back into a URL with the filesystem's protocol."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        return path
    return f"{proto}://{path}"


_USERINFO = re.compile(r"(://)([^/@\s:]+)(:[^/@\s]*)?@")


def redact_url(text: str) -> str:
    """Mask the userinfo of every URL in ``text``: ``https://user:pw@host`` → ``https://***:***@host``
    (a token alone, ``https://tok@host``, → ``https://***@host``)."""
    return _USERINFO.sub(lambda m: m.group(1) + ("***:***@" if m.group(3) is not None else "***@"), text)


_num = re.compile(r"(\d+)")


def natural_key(s: str) -> list[Any]:
    """Sort key so that ``epoch_2`` comes before ``epoch_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in _num.split(s)]


def expand(urls: str | list[str], storage: StorageOptions | None = None) -> list[str]:
    """Expand a URL, a glob, or a list of either into a naturally sorted list of file URLs.

    A missing file or a glob that matches nothing raises ``FileNotFoundError`` naming it.
    """
    if isinstance(urls, (str, os.PathLike)):
        urls = [os.fspath(urls)]
    out: list[str] = []
    for u in urls:
        fs, path = resolve(u, storage)
        if any(ch in path for ch in "*?["):
            hits = sorted(fs.glob(path), key=natural_key)
            hits = [h for h in hits if not fs.isdir(h)]
            if not hits:
                raise FileNotFoundError(f"no file matches {u!r}")
            out.extend(unstrip(fs, h) for h in hits)
        else:
            if not fs.exists(path):
                raise FileNotFoundError(f"no such file: {u!r}")
            out.append(u)
    return out


def list_files(url: str, storage: StorageOptions | None = None, suffix: str = ".parquet"
               ) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """``(fs, paths)``: the files named ``*<suffix>`` under ``url`` (a directory, searched
    recursively, or one file), sorted. A missing ``url`` gives no files (not an error): callers
    decide whether an empty listing is one."""
    fs, path = resolve(url, storage)
    path = path.rstrip("/") or path
    if not fs.exists(path):
        return fs, []
    if not fs.isdir(path):
        return fs, [path] if path.endswith(suffix) else []
    return fs, sorted(f for f in fs.find(path) if f.endswith(suffix))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")


def atomic_write(url: str, data: bytes, storage: StorageOptions | None = None, *,
                 fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Write ``data`` so that a reader never sees a half-written file.

    Local files are written under a temporary name beside ``url`` and renamed into place (an
    atomic rename). On an object store a single PUT is already atomic — the object appears only
    once the upload completes — so the object is written directly (a copy + delete "move" would
    only add requests). ``fs``: an already resolved filesystem, ``url`` then being its path
    (saves building a new client per file on object stores).
    """
    if fs is None:
        fs, path = resolve(url, storage)
    else:
        path = url
    parent = path.rsplit("/", 1)[0]
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:  # pragma: no cover - best effort cleanup
            pass
        raise
