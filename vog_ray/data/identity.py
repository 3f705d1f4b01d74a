"""The identity of the input files an audit reads: per split, every file's path, size and version
(S3/GCS content tag or local modification time, :func:`~vog_ray.data.listing.file_version`), from
one listing per split (for an image folder the listing is the data). It goes into the resume key
(changed data is never mixed with earlier work) and the manifest. Imports neither Ray nor torch."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from ..storage import StorageOptions
from .listing import SourceFile, folder_sources, split_files

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AuditConfig, SplitSpec

__all__ = ["split_inputs", "inputs_identity", "FILES_IN_MANIFEST"]

# per-file entries are listed in the manifest up to this many files per split (a Parquet split
# has tens to thousands of files; an image folder may hold millions, and then the digest,
# counts and bytes stand for them)
FILES_IN_MANIFEST = 1000


def split_inputs(spec: "SplitSpec", storage: StorageOptions | None) -> list[SourceFile]:
    """The files a split reads, each with its size and version (one listing)."""
    if spec.format == "image_folder":
        return folder_sources(spec, storage)[2]
    return split_files(spec, storage)[2]


def inputs_identity(cfg: "AuditConfig", storage: StorageOptions | None = None) -> dict[str, dict[str, Any]]:
    """Per split: ``files``, ``bytes``, ``sha256`` (of the sorted ``path size version`` lines: any
    rewrite, addition or removal changes it) and ``listing`` (``[rel, size, version]`` per file, when
    there are at most :data:`FILES_IN_MANIFEST`). A split whose URL matches nothing is an error
    naming its key."""
    storage = storage or cfg.storage.options()
    out: dict[str, dict[str, Any]] = {}
    for name, spec in cfg.data.splits.items():
        try:
            files = split_inputs(spec, storage)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"data.splits.{name}.url: {e}") from None
        h = hashlib.sha256()
        for f in files:
            h.update(json.dumps([f.path, f.size, f.version]).encode() + b"\n")
        entry: dict[str, Any] = {"files": len(files), "bytes": sum(f.size for f in files), "sha256": h.hexdigest()}
        if len(files) <= FILES_IN_MANIFEST:
            entry["listing"] = [[f.rel, f.size, f.version] for f in files]
        out[name] = entry
    return out
