"""Checkpoints from any fsspec URL, loaded safely (``weights_only=True``, or safetensors).

Accepted formats: a plain ``state_dict``, ``{"state_dict": ...}`` (Lightning: the ``model.``
prefix is stripped), ``{"model": ...}``, ``{"model_state_dict": ...}``, and ``.safetensors``.
A ``torch.nn.DataParallel`` ``module.`` prefix is stripped too.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..storage import StorageOptions, expand, resolve
from .registry import build_model

__all__ = ["CheckpointInfo", "list_checkpoints", "read_bytes", "load_state_dict", "load_into", "check_fits",
           "checkpoint_info", "CheckpointError", "LoadedCheckpoints", "load_checkpoints", "hash_checkpoints",
           "read_hashed", "inspect_checkpoints", "check_finite", "check_checkpoints"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


@dataclass(frozen=True)
class CheckpointInfo:
    url: str
    size: int
    sha256: str
    version: str = ""   # the store's tag of this content (ETag, generation, mtime+inode): see stored_version

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "size": self.size, "sha256": self.sha256, "version": self.version}


_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "VersionId")  # s3fs, gcsfs: change with the content


def stored_version(url: str, storage: StorageOptions | None = None) -> tuple[int, str]:
    """``(size, tag)`` of the object at ``url`` from its metadata alone (one HEAD on a store): a
    tag the store changes whenever the content changes — the ETag or generation of an object,
    the modification time and inode of a local file."""
    fs, path = resolve(url, storage)
    info = fs.info(path)
    tags = [f"{k}={info[k]}" for k in _VERSION_KEYS if info.get(k)]
    if not tags:
        tags = [f"mtime={info.get('mtime') or info.get('LastModified')}", f"ino={info.get('ino')}"]
    return int(info.get("size") or 0), ";".join(tags)


def list_checkpoints(urls: str | list[str], storage: StorageOptions | None = None) -> list[str]:
    """Expand checkpoint URLs / globs into a list in natural order (``epoch_2`` < ``epoch_10``).

    A glob expands to its matches in natural order; an explicit list keeps the given order
    (each of its globs expanded in place).
    """
    out = expand(urls, storage)
    if not out:
        raise FileNotFoundError(f"no checkpoint found at {urls!r}")
    return out


def read_bytes(url: str, storage: StorageOptions | None = None) -> bytes:
    fs, path = resolve(url, storage)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint not found: {url!r}") from e


def checkpoint_info(url: str, data: bytes) -> CheckpointInfo:
    return CheckpointInfo(url=url, size=len(data), sha256=hashlib.sha256(data).hexdigest())


_WRAPPERS = ("state_dict", "model_state_dict", "model")


def _unwrap(obj: Any, url: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                if any(isinstance(v, torch.Tensor) for v in inner.values()):
                    obj = inner
                    break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"checkpoint {url!r} holds no state_dict (got {type(obj).__name__})")


def _strip_prefixes(sd: dict[str, torch.Tensor], model: nn.Module | None) -> dict[str, torch.Tensor]:
    expected = set(model.state_dict().keys()) if model is not None else None
    # Without a model to check against, "model." / "net." may be the architecture's own
    # attribute names (vog_ray's MLP keys all start with "net."): strip only DataParallel's.
    for prefix in (("model.", "module.", "net.") if expected is not None else ("module.",)):
        if expected is not None and set(sd) <= expected:
            break
        if all(k.startswith(prefix) for k in sd):
            stripped = {k[len(prefix):]: v for k, v in sd.items()}
            if expected is None or len(set(stripped) & expected) >= len(set(sd) & expected):
                sd = stripped
        elif expected is not None and any(k.startswith(prefix) for k in sd):
            # Lightning: keys of the wrapped model start with "model.", others are extras
            stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if set(stripped) >= expected:
                sd = stripped
    return sd


def _safetensors_meta(data: bytes, url: str) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file declares (its JSON header) as meta tensors: keys, shapes,
    dtypes, no data."""
    import json

    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}
        return {k: torch.empty(v["shape"], dtype=dtypes.get(v["dtype"], torch.float32), device="meta")
                for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {url!r} is not a valid safetensors file: {e}") from e


def load_state_dict(url: str, storage: StorageOptions | None = None, *, data: bytes | None = None,
                    model: nn.Module | None = None, meta: bool = False) -> dict[str, torch.Tensor]:
    """Load a state_dict from a URL. Never unpickles arbitrary objects (``weights_only=True``).
    ``meta``: the tensors' keys, shapes and dtypes only (meta tensors: no data is copied)."""
    if data is None:
        data = read_bytes(url, storage)
    if url.endswith(".safetensors"):
        from safetensors.torch import load as st_load

        if meta:
            return _strip_prefixes(_safetensors_meta(data, url), model)
        try:
            sd = st_load(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"checkpoint {url!r} is not a valid safetensors file: {e}") from e
    else:
        if not data:
            raise CheckpointError(f"checkpoint {url!r} is empty (0 bytes)")
        try:
            obj = torch.load(io.BytesIO(data), map_location="meta" if meta else "cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise CheckpointError(_load_error(url, e)) from None
        sd = _unwrap(obj, url)
    return _strip_prefixes(sd, model)


def _load_error(url: str, e: BaseException) -> str:
    """What is wrong with a checkpoint ``torch.load`` refused, naming the file — without torch's
    advice on loading untrusted pickles, which vog-ray never does."""
    import pickle

    text = str(e)
    if isinstance(e, pickle.UnpicklingError):
        m = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"a pickled object ({m.group(1)})" if m else "a pickled object"
        return (f"checkpoint {url!r} cannot be loaded with weights_only=True: it holds {what}, not only tensors "
                "and plain containers (save model.state_dict(), not the model or other objects)")
    # a cut-off zip: torch reports it as EOF, a stream-reader or zip error, or a seek before the
    # start of the file (the central directory's offsets point past what is there)
    if isinstance(e, EOFError) or "PytorchStreamReader" in text or "zip archive" in text or \
            (isinstance(e, ValueError) and "negative seek" in text):
        first = text.split(". ", 1)[0].strip()
        return (f"checkpoint {url!r} is truncated or corrupt (not a complete torch.save file"
                + (f": {first}" if first else "") + ")")
    return f"checkpoint {url!r} is not a readable torch.save file ({type(e).__name__}: {text.splitlines()[0] if text else ''})"


def check_finite(sd: dict[str, torch.Tensor], url: str) -> None:
    """Every floating tensor of a state dict finite: one NaN weight makes every gradient NaN (and
    every VoG of the audit NaN); the error names the file and the tensor."""
    for k, v in sd.items():
        if v.is_floating_point() or v.is_complex():
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                n = int(bad.sum())
                vals = v[bad].flatten()
                kinds = [name for name, hit in (("NaN", torch.isnan(vals).any()), ("+inf", (vals == float("inf")).any()),
                                                ("-inf", (vals == float("-inf")).any())) if bool(hit)]
                raise CheckpointError(f"checkpoint {url!r}: tensor {k!r} holds {n} non-finite value(s) "
                                      f"({', '.join(kinds)}); VoG of such weights is not a number")


def check_fits(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], url: str) -> None:
    """``sd`` has exactly the keys and shapes of ``expected`` (a model's ``state_dict()``); a
    mismatch names the file and the keys."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        def fmt(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")

        raise CheckpointError(
            f"checkpoint {url!r} does not fit the model: missing keys [{fmt(missing)}], "
            f"unexpected keys [{fmt(unexpected)}]")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"checkpoint {url!r} does not fit the model: {k} has shape {tuple(sd[k].shape)}, "
            f"the model expects {tuple(expected[k].shape)} ({len(bad)} mismatched tensors)")


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], url: str) -> nn.Module:
    """Load ``sd`` into ``model`` strictly; a mismatch names the file and the keys."""
    check_fits(model.state_dict(), sd, url)
    model.load_state_dict(sd, strict=True)
    return model


@dataclass
class LoadedCheckpoints:
    model: torch.nn.Module
    urls: list[str]
    state_dicts: list[dict[str, torch.Tensor]]
    infos: list[CheckpointInfo]


def load_checkpoints(model_spec: Any, checkpoints: str | list[str], storage: StorageOptions | None = None,
                     *, indices: Sequence[int] | None = None) -> LoadedCheckpoints:
    """Build the model and load its checkpoints (all of them, or those at ``indices``).

    Every checkpoint is checked against the architecture; a mismatch names the file and keys.
    """
    urls = list_checkpoints(checkpoints, storage)
    model = build_model(model_spec)
    sel = list(range(len(urls))) if indices is None else list(indices)
    sds, infos = [], []
    for i in sel:
        data = read_bytes(urls[i], storage)
        sd = load_state_dict(urls[i], data=data, model=model)
        load_into(model, sd, urls[i])  # validates keys and shapes
        sds.append(sd)
        infos.append(checkpoint_info(urls[i], data))
    return LoadedCheckpoints(model, urls, sds, infos)


def check_checkpoints(model_spec: Any, urls: list[str], storage: StorageOptions | None = None, *,
                      known: dict[str, CheckpointInfo] | None = None) -> list[CheckpointInfo]:
    """What an audit checks before any Ray work: every checkpoint read once (hashed while read),
    checked against the model (keys, shapes) and for non-finite tensors, then dropped — one
    checkpoint in memory at a time (:func:`inspect_checkpoints` with :func:`check_finite`).
    ``known``: checkpoints an earlier audit checked, not read again while their stored version is
    unchanged. Returns their sizes, sha256 and versions."""
    return inspect_checkpoints(model_spec, urls, storage, check=lambda url, sd: check_finite(sd, url), known=known)


HASH_CHUNK = 1 << 22  # bytes read at a time while hashing a checkpoint


def _hashed_stream(url: str, storage: StorageOptions | None, sink: Any = None) -> CheckpointInfo:
    """Size and sha256 of a checkpoint from one streamed read; each chunk also goes to ``sink``."""
    try:
        version = stored_version(url, storage)[1]  # before the read: a rewrite during it shows later
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint not found: {url!r}") from e
    fs, path = resolve(url, storage)
    h = hashlib.sha256()
    size = 0
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                size += len(chunk)
                if sink is not None:
                    sink.write(chunk)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint not found: {url!r}") from e
    return CheckpointInfo(url, size, h.hexdigest(), version)


def hash_checkpoints(urls: list[str], storage: StorageOptions | None = None, *,
                     known: dict[str, CheckpointInfo] | None = None) -> list[CheckpointInfo]:
    """Size and sha256 of each checkpoint, streamed (one chunk in memory at a time). A checkpoint
    in ``known`` whose stored size and version tag are unchanged is not read again."""
    return [_unchanged(u, storage, known) or _hashed_stream(u, storage) for u in urls]


def _unchanged(url: str, storage: StorageOptions | None, known: dict[str, CheckpointInfo] | None
               ) -> CheckpointInfo | None:
    """``known[url]`` when the object still has its recorded size and version tag, else None."""
    k = (known or {}).get(url)
    if k is None or not k.version:
        return None
    try:
        return k if stored_version(url, storage) == (k.size, k.version) else None
    except FileNotFoundError:
        return None


def read_hashed(url: str, storage: StorageOptions | None = None) -> tuple[bytes, CheckpointInfo]:
    """A checkpoint's bytes and its size and sha256, from one read (hashed while read)."""
    buf = io.BytesIO()
    info = _hashed_stream(url, storage, buf)
    return buf.getvalue(), info


def inspect_checkpoints(model_spec: Any, urls: list[str], storage: StorageOptions | None = None, *,
                        check: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
                        known: dict[str, CheckpointInfo] | None = None) -> list[CheckpointInfo]:
    """What planning needs of the checkpoints, reading each once and holding one at a time.

    Each checkpoint is streamed once (hashed while read), loaded safely, checked against the
    architecture — the first one loaded into the model (strict), the others compared key by key
    and shape by shape with it from their structure alone (meta tensors: no data copied) —
    passed to ``check(url, state_dict)`` if given (then with its values), and dropped before the
    next is read. The scorer actors load the checkpoints themselves. A checkpoint in ``known``
    (checked by an earlier audit: an incremental state) whose stored size and version tag are
    unchanged is taken as it was, without a read.
    """
    model = build_model(model_spec)
    expected = {k: v.detach() for k, v in model.state_dict().items()}
    infos: list[CheckpointInfo] = []
    loaded_one = False
    for url in urls:
        same = _unchanged(url, storage, known)
        if same is not None:
            infos.append(same)
            continue
        data, info = read_hashed(url, storage)
        sd = load_state_dict(url, data=data, model=model, meta=loaded_one and check is None)
        del data
        if not loaded_one:
            load_into(model, sd, url)
            loaded_one = True
        else:
            check_fits(expected, sd, url)
        if check is not None:
            check(url, sd)
        del sd
        infos.append(info)
    return infos
