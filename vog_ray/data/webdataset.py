"""WebDataset splits (``.tar`` shards): the members of a shard grouped into samples by key, one
row per sample (id ``<shard>:<key>``, the image from the first member with one of
``webdataset.image_keys``, the label from ``webdataset.label_key``), sample counts from the tar
headers alone, and image payloads by id for reports. Imports neither Ray nor torch.

A sample's members are grouped by key wherever they sit in the shard: a shard whose members are
not contiguous per key (``tar`` without ``--sort=name``; Ray issue 44068) gives the same rows as
a sorted one. A shard cut short (a member's data or the end-of-archive marker missing) keeps its
complete samples and rejects the sample it was cut in (``truncated_shard: …``); a sample with no
image member, an unreadable label or a member twice is rejected with its reason. A file that is
not a tar at all is refused up front, naming it.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from ..core.table import keep_array
from .listing import SourceFile
from .rows import make_block, reject_payload, rows_per_block

if TYPE_CHECKING:  # pragma: no cover
    from ..config import SplitSpec

__all__ = ["Member", "Sample", "split_key", "scan_members", "group_samples", "read_file", "num_rows",
           "peek_payloads", "fetch_samples", "shard_of_id", "TAR_BLOCK"]

TAR_BLOCK = 512          # a tar header or data block
_END_MARKER = 2 * TAR_BLOCK  # two zero blocks end a tar archive
_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # WebDataset: key = path up to the basename's first dot
JSON_PREFIX = "json:"    # webdataset.label_key "json:<key>": the label is a key of the sample's json member


@dataclass(frozen=True)
class Member:
    name: str
    key: str
    ext: str         # everything after the key's dot, lower case ("png", "seg.png", "cls")
    offset: int      # where the data starts in the shard
    size: int


@dataclass
class Sample:
    key: str
    members: dict[str, Member] = field(default_factory=dict)
    problem: Optional[str] = None   # a reason the sample is rejected whatever its members hold


def split_key(name: str) -> Optional[tuple[str, str]]:
    """``(key, extension)`` of a member name, or None for a member that belongs to no sample (no
    dot in its basename, or a hidden file)."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def scan_members(fileobj: Any, size: int, rel: str) -> tuple[list[Member], Optional[tuple[int, str]]]:
    """The regular-file members of a shard from its headers (their data is skipped, not read),
    and ``(index of the member the shard was cut in, reason)`` when it is truncated (None when
    complete). A file that is not a tar archive raises ``ValueError`` naming it."""
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as e:
        raise ValueError(f"{rel}: not a tar archive ({e})") from None
    members: list[Member] = []
    cut: Optional[tuple[int, str]] = None
    try:
        for ti in tf:
            kx = split_key(ti.name) if ti.isreg() else None
            if kx is not None:
                members.append(Member(ti.name, kx[0], kx[1], ti.offset_data, ti.size))
    except tarfile.ReadError as e:  # the next header lies past the end: the last data was cut
        cut = (len(members) - 1, f"unexpected end of data ({e})")
    for i, m in enumerate(members):
        if m.offset + m.size > size:
            return members[:i + 1], (i, f"{rel} ends inside {m.name} ({max(0, size - m.offset)} of "
                                        f"{m.size} bytes)")
    if cut is None and members:
        fileobj.seek(tf.offset)
        tail = fileobj.read(_END_MARKER)
        if len(tail) < _END_MARKER or tail.count(0) != _END_MARKER:
            cut = (len(members) - 1, f"{rel} has no end-of-archive marker after {members[-1].name} "
                                     "(cut short or corrupt there)")
    return members, cut


def group_samples(members: list[Member], cut: Optional[tuple[int, str]]) -> list[Sample]:
    """Members grouped by key (in the order keys first appear), wherever they sit in the shard.

    In a shard cut short, the sample of the member it was cut in is rejected; when the shard's
    members are not contiguous per key, any sample may have lost members past the cut, so all
    of its samples are."""
    samples: dict[str, Sample] = {}
    contiguous, last = True, None
    for i, m in enumerate(members):
        if m.key != last and m.key in samples:
            contiguous = False
        last = m.key
        s = samples.setdefault(m.key, Sample(m.key))
        if m.ext in s.members and s.problem is None:
            s.problem = f"duplicate_member: {m.name} appears twice in the shard"
        s.members.setdefault(m.ext, m)
        if cut is not None and i == cut[0]:
            s.problem = f"truncated_shard: {cut[1]}"
    if cut is not None and not contiguous:
        for s in samples.values():
            s.problem = (f"truncated_shard: {cut[1]}; its members are not grouped by key, so any of its "
                         "samples may have lost members")
    return list(samples.values())


def _open_scan(fs, f: SourceFile) -> list[Sample]:
    """Samples of a shard from its headers alone (for row counts)."""
    with fs.open(f.path, "rb") as fh:
        size = fh.size if getattr(fh, "size", None) is not None else fs.size(f.path)
        return group_samples(*scan_members(fh, int(size), f.rel))


def num_rows(fs, f: SourceFile) -> int:
    """Samples in a shard (one row each), from a pass over its member headers."""
    return len(_open_scan(fs, f))


def _label_of(s: Sample, data: memoryview, spec: "SplitSpec", doc: Any) -> tuple[int, Optional[str]]:
    """``(label, problem)``: -1 without a label; a problem names what is wrong."""
    key = spec.webdataset.label_key
    if spec.label_column is None:
        return -1, None
    if key.startswith(JSON_PREFIX):
        if isinstance(doc, str):  # the json member's error
            return -1, doc
        v = doc.get(key[len(JSON_PREFIX):]) if isinstance(doc, dict) else None
        text = None if v is None else str(v)
        if v is None:
            return -1, None
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            return -1, f"bad_label: json {key[len(JSON_PREFIX):]!r} holds {text[:40]!r}, not an integer"
        return int(v), None
    m = s.members.get(key)
    if m is None:
        return -1, None
    text = bytes(data[m.offset:m.offset + m.size]).decode("utf-8", "replace").strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        return -1, f"bad_label: {m.name} holds {text[:40]!r}, not an integer"
    return int(text), None


def _json_of(s: Sample, data: memoryview) -> Any:
    """The sample's json member parsed, None without one, or the reason it is unreadable (str)."""
    m = s.members.get("json")
    if m is None:
        return None
    try:
        return json.loads(bytes(data[m.offset:m.offset + m.size]))
    except ValueError as e:
        return f"bad_json: {m.name}: {e}"[:240]


def _image_of(s: Sample, data: memoryview, keys: list[str]) -> tuple[Optional[bytes], Optional[str]]:
    for k in keys:
        m = s.members.get(k.lower())
        if m is not None:
            return bytes(data[m.offset:m.offset + m.size]), None
    return None, (f"missing_image: no member with extension {'|'.join(keys)} "
                  f"(members: {', '.join(sorted(s.members)) or 'none'})")


def _rows(samples: list[Sample], data: memoryview, rel: str, name: str, spec: "SplitSpec") -> pa.Table:
    ids, labels, images = [], [], []
    keep: dict[str, list[Any]] = {k: [] for k in spec.keep_columns}
    for s in samples:
        doc = _json_of(s, data) if (spec.keep_columns or spec.webdataset.label_key.startswith(JSON_PREFIX)) else None
        image, problem = _image_of(s, data, spec.webdataset.image_keys)
        label, bad_label = _label_of(s, data, spec, doc)
        problem = s.problem or problem or bad_label
        ids.append(f"{rel}:{s.key}")
        labels.append(label)
        images.append(reject_payload(problem) if problem else image)
        for k in spec.keep_columns:
            keep[k].append(doc.get(k) if isinstance(doc, dict) else None)
    kept = {}
    for k, v in keep.items():
        try:
            kept[k] = keep_array(np.array(v, dtype=object))
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: as text
            kept[k] = pa.array([None if x is None else json.dumps(x) for x in v], pa.string())
    return make_block(pa.array(ids, pa.string()), name, np.asarray(labels, np.int64),
                      pa.array(images, pa.binary()), kept)


def _shard_samples(fs, f: SourceFile) -> tuple[memoryview, list[Sample]]:
    """A shard's bytes (read whole: its samples may be spread over it) and its samples."""
    data = fs.cat_file(f.path)
    return memoryview(data), group_samples(*scan_members(io.BytesIO(data), len(data), f.rel))


def read_file(fs, f: SourceFile, name: str, spec: "SplitSpec") -> Iterator[pa.Table]:
    """The rows of one shard as blocks (inside a Ray read task)."""
    data, samples = _shard_samples(fs, f)
    per_row = len(data) / max(1, len(samples))
    step = rows_per_block(per_row)
    for a in range(0, len(samples), step):
        yield _rows(samples[a:a + step], data, f.rel, name, spec)


def peek_payloads(fs, f: SourceFile, spec: "SplitSpec", n: int) -> Optional[list[Any]]:
    """The first ``n`` image members of a shard, streamed from its start (the rest is not read);
    ``None`` when it has none."""
    keys = {k.lower() for k in spec.webdataset.image_keys}
    out: list[Any] = []
    with fs.open(f.path, "rb") as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r|") as tf:
                for ti in tf:
                    kx = split_key(ti.name) if ti.isreg() else None
                    if kx is not None and kx[1] in keys:
                        out.append(tf.extractfile(ti).read())
                        if len(out) >= n:
                            break
        except tarfile.ReadError:  # cut short: what was read is enough to peek at
            pass
    return out or None


def shard_of_id(i: str) -> tuple[str, str]:
    """``(shard, key)`` of an id ``"<shard>.tar:<key>"``."""
    rel, sep, key = i.partition(".tar:")
    if not sep or not key:
        raise KeyError(f"id {i!r} does not name a shard sample ('<shard>.tar:<key>')")
    return rel + ".tar", key


def fetch_samples(fs, f: SourceFile, spec: "SplitSpec", wanted: dict[str, str],
                  found: Callable[[str, Any], None]) -> None:
    """``found(id, image payload)`` for each ``{key: id}`` of ``wanted`` that is a sample of the shard."""
    data, samples = _shard_samples(fs, f)
    for s in samples:
        i = wanted.get(s.key)
        if i is not None:
            image, problem = _image_of(s, data, spec.webdataset.image_keys)
            if image is not None and not s.problem:
                found(i, image)
