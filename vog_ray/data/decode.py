"""Decoding: a payload (encoded image or ``.npy`` bytes) to a float32 CHW array, the transforms
(channels, resize, center crop, normalise), :func:`decode_batch` — where a bad row becomes a
``status`` reason instead of a failed task — and :func:`decode`, the pipeline's Ray stage.
Imports Ray only inside :func:`decode`; PIL only where images are decoded."""

from __future__ import annotations

import functools
import io
import re
import warnings
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from ..storage import StorageOptions
from .rows import NPY_MAGIC, OK, REJECT_MAGIC

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from ..config import AuditConfig, TransformSpec

__all__ = ["Reject", "clean_error", "raw_to_hwc", "pil_to_hwc", "decode_payload", "decode_native", "decode_row",
           "decode_batch", "decode", "is_jpeg", "resized_size", "crop_origin", "normalise", "fmt_shape"]


class Reject(Exception):
    """A row that cannot be decoded; the message is its ``status`` reason."""


def clean_error(e: BaseException) -> str:
    """A decode error as a short ``decode_error: …`` reason (no object addresses)."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "decode_error: cannot identify image file"
    msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(e)).strip()
    return f"decode_error: {type(e).__name__}: {msg}"[:240]


def fmt_shape(s: Sequence[int]) -> str:
    """A shape as a status reason writes it: ``(3,32,32)``."""
    return "(" + ",".join(str(int(v)) for v in s) + ")"



def raw_to_hwc(a: np.ndarray) -> np.ndarray:
    """A raw array as HxWxC (C in 1, 3), or a 1-D vector as it is."""
    if a.dtype.kind not in "uifb":
        raise Reject(f"bad_dtype: {a.dtype}")
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    if a.ndim == 1:
        return a
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim == 3:
        first, last = a.shape[0] in (1, 3, 4), a.shape[2] in (1, 3, 4)
        if first:  # (C,H,W), also when both ends could be channels (image_shape says C,H,W)
            a = np.moveaxis(a, 0, -1)
        elif not last:
            raise Reject(f"bad_shape: {fmt_shape(a.shape)} has no channel axis of size 1 or 3")
        if a.shape[2] == 4:
            a = a[:, :, :3]
        return a
    raise Reject(f"bad_shape: {fmt_shape(a.shape)} is not an image")


def pil_to_hwc(img, channels: int | None) -> np.ndarray:
    """A PIL image as HxWxC (16-bit on the 8-bit scale), converted to ``channels`` if given."""
    if channels == 1:
        img = img.convert("L") if img.mode not in ("L", "I", "I;16", "F") else img
    elif channels == 3:
        img = img.convert("RGB") if img.mode != "RGB" else img
    elif img.mode in ("1", "LA", "La"):
        img = img.convert("L")
    elif img.mode not in ("L", "RGB", "I", "I;16", "I;16B", "I;16L", "F"):
        img = img.convert("RGB")
    if img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float32) / np.float32(257.0)  # 16-bit on the 8-bit scale
    elif img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
    else:
        a = np.asarray(img)
    if a.ndim == 2:
        a = a[:, :, None]
    return a


_IMAGE_FORMAT = {b"\x89PNG": ("PNG",), b"\xff\xd8\xff\xe0": ("JPEG",), b"\xff\xd8\xff\xe1": ("JPEG",),
                 b"\xff\xd8\xff\xdb": ("JPEG",), b"\xff\xd8\xff\xee": ("JPEG",)}


def is_jpeg(payload: Any) -> bool:
    """Whether a payload is a JPEG file (by its first bytes, as the decoder picks its format)."""
    if payload is None or (isinstance(payload, np.ndarray) and payload.dtype != object):
        return False
    return _IMAGE_FORMAT.get(bytes(payload[:4])) == ("JPEG",)


def decode_payload(payload: Any) -> Any:
    """Raw ``np.ndarray`` (from ``.npy`` bytes / arrays) or a loaded PIL image."""
    if payload is None:
        raise Reject("missing_image")
    if isinstance(payload, np.ndarray) and payload.dtype != object:
        return payload
    b = bytes(payload)
    if b.startswith(NPY_MAGIC):
        return _load_npy(b)
    if b.startswith(REJECT_MAGIC):
        raise Reject(b[len(REJECT_MAGIC):].decode("utf-8", "replace"))
    from PIL import Image
    try:  # (PIL's warnings are silenced for the whole batch by decode_batch)
        img = Image.open(io.BytesIO(b), formats=_IMAGE_FORMAT.get(b[:4]))  # no probing of every format
        img.load()
        return img
    except Exception as e:
        raise Reject(clean_error(e)) from None


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> Optional[tuple[np.dtype, tuple[int, ...], bool]]:
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None  # (3, 0): utf-8 field names; np.load handles it
    return dtype, tuple(shape), fortran


def _load_npy(b: bytes) -> np.ndarray:
    """``np.load`` of ``.npy`` bytes without pickle; headers parsed once per batch shape."""
    try:
        start = 10 if b[6] == 1 else 12
        hlen = int.from_bytes(b[8:start], "little")
        info = _npy_header(b[:start + hlen])
        if info is None:
            return np.load(io.BytesIO(b), allow_pickle=False)
        dtype, shape, fortran = info
    except Exception as e:
        raise Reject(f"decode_error: bad .npy payload ({type(e).__name__}: {e})"[:240]) from None
    if dtype.hasobject:
        raise Reject("decode_error: object arrays are not accepted")
    count = int(np.prod(shape))
    if len(b) - start - hlen != count * dtype.itemsize:
        raise Reject(f"decode_error: .npy payload holds {len(b) - start - hlen} bytes, "
                      f"expected {count * dtype.itemsize}")
    a = np.frombuffer(b, dtype=dtype, count=count, offset=start + hlen)
    return a.reshape(shape, order="F" if fortran else "C")


def _convert_channels(a: np.ndarray, channels: int | None) -> np.ndarray:
    c = a.shape[2]
    if channels is None or channels == c:
        return a
    if channels == 3 and c == 1:
        return np.repeat(a, 3, axis=2)
    if channels == 1 and c == 3:
        w = np.array([0.299, 0.587, 0.114], np.float32)
        return (a.astype(np.float32) @ w)[:, :, None]
    raise Reject(f"bad_channels: cannot convert {c} channels to {channels}")


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (aspect kept), bilinear — torchvision's ``Resize(int)`` on PIL."""
    from PIL import Image

    h, w = a.shape[:2]
    if min(h, w) == size:
        return a
    nh, nw = resized_size(h, w, size)
    if a.dtype == np.uint8:
        if a.shape[2] == 3:
            return np.asarray(Image.fromarray(a).resize((nw, nh), Image.BILINEAR))
        return np.asarray(Image.fromarray(a[:, :, 0]).resize((nw, nh), Image.BILINEAR))[:, :, None]
    chans = [np.asarray(Image.fromarray(a[:, :, i].astype(np.float32), mode="F").resize((nw, nh), Image.BILINEAR))
             for i in range(a.shape[2])]
    return np.stack(chans, axis=2)


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """``(height, width)`` with the shorter side ``size``, the aspect kept (torchvision's ``Resize(int)``)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def crop_origin(h: int, w: int, size: int) -> tuple[tuple[int, int], tuple[int, int], int, int]:
    """torchvision's ``CenterCrop`` as numbers: the zero padding ``(top, bottom), (left, right)`` of an
    image smaller than ``size``, then the crop's top and left in the padded image."""
    ph, pw = max(0, size - h), max(0, size - w)
    pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    h, w = h + ph, w + pw
    return pad[0], pad[1], int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``CenterCrop``: zero-pad when smaller, then crop the centre."""
    pad_h, pad_w, top, left = crop_origin(a.shape[0], a.shape[1], size)
    if any(pad_h + pad_w):
        a = np.pad(a, (pad_h, pad_w, (0, 0)))
    return a[top:top + size, left:left + size]


def decode_native(payload: Any, transform: "TransformSpec") -> np.ndarray:
    """One payload → CHW (or a 1-D vector) before scaling, as ``uint8`` when the pixels are 8-bit
    and nothing made them fractional, else ``float32`` (a view where it can be: batches are stacked
    once and converted once, :func:`decode_batch`; the values are those of :func:`decode_row`, as
    every ``uint8`` is exact in float32). Raises ``Reject``."""
    obj = decode_payload(payload)
    if isinstance(obj, np.ndarray):
        a = raw_to_hwc(obj)
        if a.dtype != np.uint8:  # one rounding to float32, from the array's own dtype
            a = a.astype(np.float32, copy=False)
        if a.ndim == 1:
            if transform.resize or transform.center_crop or transform.channels:
                raise Reject(f"bad_shape: {fmt_shape(a.shape)} is a vector; resize/center_crop/channels "
                              "need images")
            return a
        a = _convert_channels(a, transform.channels)
    else:
        a = pil_to_hwc(obj, transform.channels)
    if transform.resize:
        a = _resize(a, transform.resize)
    if transform.center_crop:
        a = _center_crop(a, transform.center_crop)
    if a.dtype != np.uint8:
        a = a.astype(np.float32, copy=False)
    return a[None, :, :, 0] if a.shape[2] == 1 else a.transpose(2, 0, 1)


def decode_row(payload: Any, transform: "TransformSpec") -> np.ndarray:
    """One payload → float32 CHW (or a 1-D vector), before scaling. Raises ``Reject``."""
    return np.ascontiguousarray(decode_native(payload, transform), dtype=np.float32)


def normalise(x: Any, transform: "TransformSpec") -> Any:
    """``x * scale``, then ``(x - mean) / std`` per channel (axis 1), in place on float32 (numpy, or a
    torch tensor on any device: the same float32 operations in the same order)."""
    if transform.scale != 1:
        x *= np.float32(transform.scale)
    if transform.mean is None and transform.std is None:
        return x
    n_ch = x.shape[1]
    bshape = (1, n_ch) + (1,) * (x.ndim - 2)

    def vec(v: list[float] | None, what: str, default: float) -> np.ndarray:
        if v is None:
            return np.full(bshape, default, np.float32)
        v = np.asarray(v, np.float32)
        if v.size == 1:
            return v.reshape((1,) * x.ndim)
        if v.size != n_ch:
            raise ValueError(f"transform.{what} has {v.size} values but the images have {n_ch} "
                             f"{'features' if x.ndim == 2 else 'channels'}")
        return v.reshape(bshape)

    std = vec(transform.std, "std", 1.0)
    if np.any(std == 0):
        raise ValueError("transform.std holds a zero")
    mean = vec(transform.mean, "mean", 0.0)
    if not isinstance(x, np.ndarray):  # a torch tensor: the same float32 vectors on its device
        import torch

        mean, std = torch.from_numpy(mean).to(x.device), torch.from_numpy(std).to(x.device)
    x -= mean
    x /= std
    return x


def decode_batch(batch: dict[str, np.ndarray], transform: "TransformSpec",
                 input_shape: Sequence[int] | None = None, *, num_classes: int | None = None,
                 allow_unlabeled: bool = False) -> dict[str, np.ndarray]:
    """Decode + normalise a numpy batch of reader rows; never drops a row.

    Returns the input columns without ``image``, plus ``x`` (float32 ``[N, C, H, W]``, or
    ``[N, D]`` with ``transform.flatten`` / vector inputs) and ``status`` (``"ok"`` or the reason).
    Rejected rows get a zero ``x``. ``input_shape`` is the shape the model takes — (C, H, W), or
    (D,) for flattened/vector inputs; pass it, so every batch has the same ``x`` shape (without
    it the first good row of each batch sets the shape). ``num_classes``: labels outside
    ``[0, num_classes)`` are rejected (``-1`` is accepted with ``allow_unlabeled``, for audits
    against predicted labels).
    """
    images = batch["image"]
    n = len(images)
    status = np.full(n, OK, dtype=object)
    decoded: list[Optional[np.ndarray]] = [None] * n
    with warnings.catch_warnings():  # PIL's (e.g. DecompressionBomb, palette) warnings
        warnings.simplefilter("ignore")
        for i in range(n):
            try:
                decoded[i] = decode_native(images[i], transform)
            except Reject as r:
                status[i] = str(r)

    exp = tuple(int(v) for v in input_shape) if input_shape is not None else None
    if exp is None:
        first = next((d for d in decoded if d is not None), None)
        exp = tuple(first.shape) if first is not None else None

    def matches(s: tuple[int, ...]) -> bool:
        if s == exp:
            return True
        # a flattened model input given as (D,) takes any image of D values
        return transform.flatten and len(exp) == 1 and int(np.prod(s)) == exp[0]

    if exp is not None:
        for i, d in enumerate(decoded):
            if d is not None and d.shape != exp and not matches(d.shape):
                status[i] = f"bad_shape: {fmt_shape(d.shape)} != {fmt_shape(exp)}"
                decoded[i] = None
    flat = transform.flatten or (exp is not None and len(exp) == 1)
    out_shape = ((int(np.prod(exp)),) if flat else exp) if exp is not None else (0,)
    x = np.zeros((n, *out_shape), np.float32)
    good = [i for i, d in enumerate(decoded) if d is not None]
    if good:
        stacked = np.stack([decoded[i] for i in good]).astype(np.float32, copy=False)
        stacked = normalise(stacked, transform)  # per channel; per feature for [M, D] vectors
        stacked = stacked.reshape((len(good), *out_shape))
        finite = np.isfinite(stacked.reshape(len(good), -1)).all(axis=1)
        gi = np.asarray(good)
        x[gi[finite]] = stacked[finite]
        for i in gi[~finite]:
            status[i] = "non_finite_pixels"

    _check_labels(batch, status, num_classes, allow_unlabeled)
    out = {k: v for k, v in batch.items() if k != "image"}
    out["x"] = x
    out["status"] = status
    return out


def _check_labels(batch: dict[str, np.ndarray], status: np.ndarray, num_classes: int | None,
                  allow_unlabeled: bool) -> None:
    """``label_out_of_range`` reasons, in place, for rows still ok."""
    n = len(status)
    labels = np.asarray(batch["label"], np.int64) if "label" in batch else np.full(n, -1, np.int64)
    if num_classes is not None:
        bad = (labels < 0) | (labels >= num_classes)
        if allow_unlabeled:
            bad &= labels != -1
        for i in np.flatnonzero(bad):
            if status[i] == OK:
                status[i] = f"label_out_of_range: {int(labels[i])} not in [0, {int(num_classes)})"


def decode(ds: "ray.data.Dataset", cfg: "AuditConfig", *, input_shape: Sequence[int] | None = None,
           storage: StorageOptions | None = None, pass_encoded: bool = False) -> "ray.data.Dataset":
    """The decode stage: ``decode_batch`` as CPU tasks over reader rows (a lazy Dataset).

    ``input_shape`` defaults to :func:`infer_input_shape`. Labels: ``-1`` passes (the scorer
    decides what an unlabelled row means for its label mode); with ``data.class_names`` a label
    outside ``[0, len(class_names))`` is rejected here, otherwise the scorer checks it against the
    model's output size.

    ``pass_encoded`` (``transform.decode_on: gpu`` with GPU scorer actors): the images are not
    decoded here; rows keep their encoded ``image`` and get a ``status`` from the label checks, and
    the scorer decodes them on its device (:mod:`vog_ray.data.device_decode`).
    """
    from .metadata import infer_input_shape

    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(cfg, storage)
    num_classes = len(cfg.data.class_names) if cfg.data.class_names else None
    # Arrow in, Arrow out: carried columns pass through untouched (a numpy round trip would turn
    # an all-null string column into float NaN, and blocks of different splits would not unify)
    if pass_encoded:
        return ds.map_batches(_label_status_arrow, batch_format="pyarrow", batch_size=cfg.compute.decode_batch_size,
                              fn_kwargs=dict(num_classes=num_classes, allow_unlabeled=True))
    return ds.map_batches(_decode_arrow, batch_format="pyarrow", batch_size=cfg.compute.decode_batch_size,
                          fn_kwargs=dict(transform=cfg.data.transform, input_shape=shape,
                                         num_classes=num_classes, allow_unlabeled=True))


def _label_status_arrow(batch: pa.Table, num_classes: int | None, allow_unlabeled: bool) -> pa.Table:
    """The pass-through stage: the rows as read, plus ``status`` from the label checks."""
    status = np.full(batch.num_rows, OK, dtype=object)
    if "label" in batch.column_names:
        _check_labels({"label": batch.column("label").to_numpy(zero_copy_only=False)}, status, num_classes,
                      allow_unlabeled)
    return batch.append_column("status", pa.array([str(v) for v in status], pa.string()))


def _decode_arrow(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """:func:`decode_batch` on an Arrow batch; only ``image`` and ``label`` go through numpy."""
    from ray.data.extensions import ArrowTensorArray

    cols = {"image": batch.column("image").to_numpy(zero_copy_only=False)}
    if "label" in batch.column_names:
        cols["label"] = batch.column("label").to_numpy(zero_copy_only=False)
    out = decode_batch(cols, **kwargs)
    t = batch.drop_columns(["image"])
    t = t.append_column("x", ArrowTensorArray.from_numpy(out["x"]))
    return t.append_column("status", pa.array([str(v) for v in out["status"]], pa.string()))

