"""The files a split reads: a split's base directory and naturally sorted files (``SourceFile``,
whose ``rel`` is the id prefix), the image-folder root, classes and images, and the filter that
skips hidden and temporary files. Imports neither Ray nor torch."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..storage import StorageOptions, is_local, natural_key, resolve

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["SourceFile", "list_split_files", "split_files", "folder_root", "list_classes", "folder_files",
           "folder_sources", "split_bases", "file_version", "IMAGE_EXTENSIONS", "PARQUET_EXTENSIONS",
           "TAR_EXTENSIONS", "MANIFEST_FORMATS"]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm")
PARQUET_EXTENSIONS = (".parquet", ".pq", ".parq")
TAR_EXTENSIONS = (".tar",)
MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                    ".ndjson": "jsonl", ".json": "jsonl"}   # a manifest's extension → its table format
_CIFAR_TRAIN = re.compile(r"^(data_batch_\d+|train)$")
_CIFAR_TEST = re.compile(r"^(test_batch|test)$")


@dataclass(frozen=True)
class SourceFile:
    path: str        # the filesystem path (no scheme)
    rel: str         # path relative to the split's base directory (the id prefix)
    size: int = 0
    version: str = ""  # what changes when the file is rewritten (file_version), from the listing


def file_version(info: dict[str, Any]) -> str:
    """What changes when a listed file is rewritten, from its listing entry: the object store's
    content tag (S3 ``ETag``; GCS ``md5Hash``/``crc32c``/``generation``), else the local file's
    modification time (ns) and inode, else a modification timestamp. "" when the store gives none
    (the size alone then)."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag={str(etag).strip(chr(34))}"
    gcs = [f"{k}={info[k]}" for k in ("md5Hash", "crc32c", "generation") if info.get(k)]
    if gcs:
        return ",".join(gcs)
    if info.get("mtime") is not None:
        ino = f",ino={info['ino']}" if info.get("ino") is not None else ""
        return f"mtime={int(round(float(info['mtime']) * 1e9))}{ino}"
    for k in ("LastModified", "updated", "last_modified", "created"):
        if info.get(k) is not None:
            return f"{k}={info[k]}"
    return ""


def _has_magic(p: str) -> bool:
    return any(ch in p for ch in "*?[")


def _glob_base(p: str) -> str:
    parts = p.split("/")
    fixed = []
    for part in parts:
        if _has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or "/"


def _urls(spec: "SplitSpec") -> list[str]:
    return [spec.url] if isinstance(spec.url, str) else list(spec.url)


def _fs_for(spec: "SplitSpec", storage: StorageOptions | None):
    urls = _urls(spec)
    if not urls:
        raise ValueError("split url list is empty")
    protos = {re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", u).group(1).lower() if "://" in u else "file"
              for u in urls}
    if len(protos) > 1:
        raise ValueError(f"the urls of one split must share one filesystem, got {sorted(protos)}")
    fs, _ = resolve(urls[0], storage)
    return fs


def _hidden_or_temporary(name: str) -> bool:
    """A ``.``/``_`` prefix on any part of the path (_SUCCESS, _temporary/, .ipynb_checkpoints/)."""
    return any(part.startswith((".", "_")) for part in name.strip("/").split("/"))


def _accept(fmt: str, name: str, cifar_batches: str | None) -> bool:
    base = posixpath.basename(name)
    if _hidden_or_temporary(name):
        return False
    if fmt == "parquet":
        return base.lower().endswith(PARQUET_EXTENSIONS)
    if fmt == "npz":
        return base.lower().endswith(".npz")
    if fmt == "webdataset":
        return base.lower().endswith(TAR_EXTENSIONS)
    if fmt == "manifest":
        return base.lower().endswith(tuple(MANIFEST_FORMATS))
    if fmt == "cifar":
        if cifar_batches == "train":
            return bool(_CIFAR_TRAIN.match(base))
        if cifar_batches == "test":
            return bool(_CIFAR_TEST.match(base))
        return bool(_CIFAR_TRAIN.match(base) or _CIFAR_TEST.match(base))
    return True


def split_files(spec: "SplitSpec", storage: StorageOptions | None,
                *, list_files: bool = True) -> tuple[Any, str, list[SourceFile]]:
    """``(fs, base, files)`` for a split (files naturally sorted by relative path)."""
    fs = _fs_for(spec, storage)
    bases: list[str] = []
    found: list[tuple[str, int, str]] = []
    for u in _urls(spec):
        p = fs._strip_protocol(u) if "://" in u else resolve(u, storage)[1]
        p = p.rstrip("/") or p
        if _has_magic(p):
            bases.append(_glob_base(p))
            if list_files:
                hits = fs.glob(p, detail=True)
                hits = {k: v for k, v in hits.items() if v.get("type") != "directory"}
                if not hits:
                    raise FileNotFoundError(f"no file matches {u!r}")
                found.extend((k, int(v.get("size") or 0), file_version(v)) for k, v in hits.items())
        elif fs.isdir(p):
            bases.append(p)
            if list_files:
                hits = fs.find(p, detail=True)
                kept = [(k, int(v.get("size") or 0), file_version(v)) for k, v in hits.items()
                        if _accept(spec.format, k[len(p):], spec.cifar_batches)]
                if not kept:
                    what = f" ({spec.cifar_batches} batches)" if spec.format == "cifar" else ""
                    raise FileNotFoundError(f"no {spec.format} files{what} under {u!r}")
                found.extend(kept)
        else:
            if list_files and not fs.exists(p):
                raise FileNotFoundError(f"no such file: {u!r}")
            bases.append(posixpath.dirname(p))
            if list_files:
                info = fs.info(p)
                found.append((p, int(info.get("size") or 0), file_version(info)))
    base = bases[0] if len(bases) == 1 else posixpath.commonpath(bases)
    files: dict[str, SourceFile] = {}
    for path, size, version in found:
        rel = posixpath.relpath(path, base) if base not in ("", "/") else path.lstrip("/")
        files.setdefault(rel, SourceFile(path, rel, size, version))
    out = sorted(files.values(), key=lambda f: natural_key(f.rel))
    return fs, base, out


def list_split_files(spec: "SplitSpec", storage: StorageOptions | None = None) -> list[SourceFile]:
    """The files a (non image-folder) split reads, naturally sorted; ``rel`` is the id prefix."""
    return split_files(spec, storage)[2]


def folder_root(spec: "SplitSpec", storage: StorageOptions | None):
    """``(fs, root)`` of an image-folder split (one directory url, one sub-folder per class)."""
    urls = _urls(spec)
    if len(urls) != 1 or _has_magic(urls[0]):
        raise ValueError("an image_folder split takes one directory url (one sub-folder per class)")
    fs, root = resolve(urls[0], storage)
    root = root.rstrip("/") or root
    if not fs.isdir(root):
        raise FileNotFoundError(f"image_folder root is not a directory: {urls[0]!r}")
    return fs, root


def list_classes(spec: "SplitSpec", storage: StorageOptions | None = None) -> list[str]:
    """Class folder names of an image-folder split, sorted (label = index in this list)."""
    fs, root = folder_root(spec, storage)
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(root, detail=True)
                   if e.get("type") == "directory")
    names = [n for n in names if n and not n.startswith(".")]
    if not names:
        raise FileNotFoundError(f"image_folder {spec.url!r} has no class sub-folders")
    return names


def folder_sources(spec: "SplitSpec", storage: StorageOptions | None) -> tuple[Any, str, list[SourceFile]]:
    """``(fs, root, files)``: the images of an image-folder split — in a class folder, no
    ``.``/``_`` prefix inside it, an image extension (case-insensitive) — naturally sorted by
    their path under the root (``rel``, the id). The one listing that both the row count and the
    read use. Symlinks (local folders): a file link whose target stays inside the root is read
    through the link; a link whose target leaves the root, or that leads nowhere, is refused
    (:class:`~vog_ray.config.ConfigError` naming it); a directory link inside the root is not
    followed (as ``find`` does)."""
    fs, root = folder_root(spec, storage)
    classes = set(list_classes(spec, storage))
    exts = tuple("." + e for e in IMAGE_EXTENSIONS)
    local = is_local(fs)
    real_root = os.path.realpath(root) if local else root
    out = []
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        cls, _, inner = rel.partition("/")
        is_image = cls in classes and inner and not inner.startswith((".", "_")) and inner.lower().endswith(exts)
        if local and info.get("islink") and (is_image or (not inner and os.path.isdir(path))):
            _check_link(spec, path, rel, real_root)
        if is_image:
            out.append(SourceFile(path, rel, int(info.get("size") or 0), file_version(info)))
    return fs, root, sorted(out, key=lambda f: natural_key(f.rel))


def _check_link(spec: "SplitSpec", path: str, rel: str, real_root: str) -> None:
    target = os.path.realpath(path)
    where = f"image_folder {spec.url!r}: {rel!r} is a symlink to {target!r}"
    if not os.path.exists(target):
        raise ConfigError(f"{where}, which does not exist (a broken link or a loop)")
    if os.path.commonpath([real_root, target]) != real_root:
        raise ConfigError(f"{where}, outside the split's root {real_root!r}: links that leave the root are "
                          "refused (copy the file into the root, or point url at a directory that holds both)")


def folder_files(spec: "SplitSpec", storage: StorageOptions | None) -> tuple[Any, str, list[str]]:
    """``(fs, root, rel paths)`` of :func:`folder_sources`."""
    fs, root, files = folder_sources(spec, storage)
    return fs, root, [f.rel for f in files]


def split_bases(spec: "SplitSpec", storage: StorageOptions | None) -> list[tuple[str, str]]:
    """``(protocol, path)`` of every URL of a split: the file or directory it names, the fixed
    prefix of a glob (for checking that an output URL lies apart from the inputs)."""
    out = []
    for u in _urls(spec):
        fs, p = resolve(u, storage)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        p = p.rstrip("/") or p
        out.append((proto, _glob_base(p) if _has_magic(p) else p))
    return out
