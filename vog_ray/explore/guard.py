"""What the explorer may read: the run's own files and the source data its config names, nothing
else. A request names an example by split and id, never by a path; the server serves an example
only when it is a row of the run, and an id that names a file (``<file>:<row>`` ids, image-folder
paths) only when that file lies inside its split's base directory (no ``..``, no absolute path,
no other scheme or bucket)."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from ..storage import StorageOptions

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["Refused", "id_file", "split_base", "check_source"]


class Refused(PermissionError):
    """A request that would read outside the run and its source data."""


def id_file(spec: "SplitSpec", example_id: str) -> str | None:
    """The path, relative to the split's base, that an id names (None: the id names no file)."""
    if spec.format == "image_folder":
        return example_id
    if spec.id_column:
        return None
    rel, sep, row = example_id.rpartition(":")
    return rel if sep and row.isdigit() else None


def _inside(rel: str) -> bool:
    if not rel or "://" in rel or rel.startswith(("/", "\\")) or "\\" in rel or "\0" in rel:
        return False
    parts = rel.split("/")
    return ".." not in parts and posixpath.normpath(rel) == rel.rstrip("/") and not rel.startswith("./")


def split_base(spec: "SplitSpec", storage: StorageOptions | None = None) -> str:
    """The directory (filesystem path) that a split's file-naming ids are relative to."""
    if spec.format == "image_folder":
        from ..data.listing import folder_root

        return folder_root(spec, storage)[1]
    from ..data.listing import split_files

    return split_files(spec, storage, list_files=False)[1]


def check_source(spec: "SplitSpec", example_id: str, storage: StorageOptions | None = None, *,
                 base: str | None = None) -> None:
    """Raise :class:`Refused` when ``example_id`` names a file outside its split's base directory
    (``base``: :func:`split_base`, when the caller has it already)."""
    rel = id_file(spec, example_id)
    if rel is None:
        return
    if not _inside(rel):
        raise Refused(f"id {example_id!r} names a path outside its split's data")
    base = split_base(spec, storage) if base is None else base
    full = posixpath.normpath(posixpath.join(base, rel))
    if base not in ("", "/") and not full.startswith(base.rstrip("/") + "/"):
        raise Refused(f"id {example_id!r} names a path outside its split's data")
