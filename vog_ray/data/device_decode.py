"""Decoding on the scorer's device (``transform.decode_on: gpu``): the JPEG rows of a batch through
``torchvision.io.decode_jpeg(device=…)`` (nvJPEG on CUDA), the other rows through the CPU decode
(:func:`~vog_ray.data.decode.decode_row`), then the CPU path's transforms on the device — channels
(PIL's integer luma for gray), resize (antialiased bilinear, rounded to 8 bits like PIL's), center
crop, scale and normalisation in the same float32 operations. Imports torch; not Ray."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .decode import (Reject, clean_error, crop_origin, decode_row, fmt_shape, is_jpeg, normalise,
                     resized_size)
from .rows import OK

if TYPE_CHECKING:  # pragma: no cover
    from ..config import TransformSpec

__all__ = ["decode_on_device", "decode_jpegs", "gray_like_pil"]


def gray_like_pil(rgb: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB to ``[1, H, W]`` luma exactly as PIL's ``convert("L")`` computes it
    (ITU-R 601-2 weights in 16-bit fixed point, rounded)."""
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(0)


def decode_jpegs(payloads: Sequence[Any], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG payloads as uint8 ``[C, H, W]`` tensors on ``device`` (C as stored: 1 or 3; ``None`` for
    one the device decoder refuses). One batched call; if it fails, one call per image."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(bytes(p)), dtype=torch.uint8) for p in payloads]
    if not data:
        return []
    with warnings.catch_warnings():  # torchvision 0.29 marks its image codecs deprecated (TorchCodec)
        warnings.simplefilter("ignore")
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.UNCHANGED, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _transform_image(img: torch.Tensor, transform: "TransformSpec") -> torch.Tensor | None:
    """One decoded uint8 image on the device → float32 CHW after channels, resize and crop (the
    steps of :func:`~vog_ray.data.decode.decode_row`); ``None`` for a channel count the CPU path
    converts differently (e.g. CMYK)."""
    c = img.shape[0]
    if c not in (1, 3):
        return None
    if transform.channels == 1 and c == 3:
        img = gray_like_pil(img)
    elif transform.channels == 3 and c == 1:
        img = img.expand(3, -1, -1)
    x = img.to(torch.float32)
    h, w = x.shape[1:]
    if transform.resize and min(h, w) != transform.resize:
        nh, nw = resized_size(h, w, transform.resize)
        x = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True,
                                            align_corners=False)[0]
        x = x.round_().clamp_(0, 255)  # an 8-bit image stays 8-bit, as PIL resizes it
    if transform.center_crop:
        size = transform.center_crop
        pad_h, pad_w, top, left = crop_origin(x.shape[1], x.shape[2], size)
        if any(pad_h + pad_w):
            x = torch.nn.functional.pad(x, (pad_w[0], pad_w[1], pad_h[0], pad_h[1]))
        x = x[:, top:top + size, left:left + size]
    return x.contiguous()


def decode_on_device(images: Sequence[Any], status: np.ndarray, transform: "TransformSpec",
                     input_shape: Sequence[int], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """The rows of a batch whose ``status`` is ok, decoded on ``device``: ``x`` float32
    ``[N, *input_shape]`` (zeros where a row is rejected) and the updated status (the CPU path's
    reasons: ``decode_error: …``, ``bad_shape: …``, ``non_finite_pixels``)."""
    device = torch.device(device)
    n = len(images)
    status = np.asarray(status, dtype=object).copy()
    maps: list[torch.Tensor | None] = [None] * n
    rows = [i for i in range(n) if status[i] == OK]
    jpeg = [i for i in rows if is_jpeg(images[i])]
    for i, img in zip(jpeg, decode_jpegs([images[i] for i in jpeg], device)):
        maps[i] = None if img is None else _transform_image(img, transform)
    for i in rows:
        if maps[i] is None:  # not a JPEG, or one the device decoder refused: the CPU decode decides
            try:
                maps[i] = torch.from_numpy(decode_row(images[i], transform)).to(device)
            except Reject as r:
                status[i] = str(r)
            except Exception as e:  # noqa: BLE001 - a row, not the batch, fails
                status[i] = clean_error(e)
    exp = tuple(int(v) for v in input_shape)
    flat = transform.flatten or len(exp) == 1
    for i in rows:
        m = maps[i]
        if m is not None and tuple(m.shape) != exp and not (flat and m.numel() == int(np.prod(exp))):
            status[i] = f"bad_shape: {fmt_shape(m.shape)} != {fmt_shape(exp)}"
            maps[i] = None
    x = torch.zeros((n, *exp), dtype=torch.float32, device=device)
    good = [i for i in rows if maps[i] is not None]
    if good:
        stacked = normalise(torch.stack([maps[i].reshape(exp) for i in good]), transform)
        finite = torch.isfinite(stacked.reshape(len(good), -1)).all(dim=1)
        idx = torch.as_tensor(good, device=device)
        x[idx[finite]] = stacked[finite]
        for j in np.flatnonzero(~finite.cpu().numpy()):
            status[good[j]] = "non_finite_pixels"
    return x, status
