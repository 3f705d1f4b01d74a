"""MNIST-C corruptions (Mu & Gilmer, 2019, "MNIST-C: A Robustness Benchmark
for Computer Vision", arXiv:1906.02337; reference code
github.com/google-research/mnist-c ``corruptions.py``).

Re-implemented with numpy / scipy.ndimage / scikit-image only (the reference
also uses PIL, OpenCV and ImageMagick/Wand).  Every corruption is a pure,
deterministic function ``fn(image, seed) -> image`` of a single grayscale
image (uint8 ``[H, W]`` in 0..255, or a float array in [0, 255]); randomness
comes only from a local ``np.random.default_rng(seed)``.  Parameters are the
reference defaults, i.e. the severities of the released MNIST-C dataset.
Geometry that the reference hard-codes for 28x28 (image centre 13.5, line
end column 27, stripe columns 7/21) is expressed relative to ``H, W``.
Outputs are rounded to the nearest integer and returned as uint8.

=============  ================================================================
name           parameters (reference severity)
=============  ================================================================
shot_noise     Poisson noise ``P(x * c) / c`` with c = 3 photons/unit (sev 5)
impulse_noise  salt & pepper, ``amount = 0.17`` of pixels, 50 % salt (sev 4)
glass_blur     Gaussian sigma 0.7, local pixel swaps with max_delta 1,
               2 iterations, Gaussian sigma 0.7 again (sev 1)
motion_blur    ImageMagick-style one-sided motion blur, radius 10 (21 taps),
               sigma 3, angle ~ U(-45, 45) degrees (sev 1)
shear          affine shear 0.4 rad with random sign, image centre fixed (sev 2)
scale          zoom out by 0.7 (inverse map scale 1/0.7) about centre (sev 3)
rotate         rotation by 0.4 rad (~23 deg) with random sign about centre (sev 2)
brightness     HSV value + 0.5, i.e. ``clip(x + 127.5)`` for gray images (sev 5)
translate      shift by 3 px in x and in y, each with random sign (sev 3)
stripe         invert the left and right quarter of columns (``255 - x``)
fog            diamond-square plasma fractal, ``(x + 3 p) * m / (m + 3)``,
               wibble decay 1.4, m = max(x) (sev 5)
spatter        "mud" blobs: N(0.65, 0.3) field, Gaussian sigma 1, threshold
               0.65, mask Gaussian sigma 1.5, keep > 0.8, blob gray 63 (sev 4)
dotted_line    random line from column 0 to W-1 (rows ~ U{0..26}), ~3 px thick
               with log decay, every other 2-column band removed
zigzag         zig-zag line (segment length 2, amplitude 2) from column 2 to
               W-3, random start row and slope
canny_edges    ``skimage.feature.canny`` (sigma 1) edge map, binary 0/255
=============  ================================================================
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, transform

__all__ = [
    "CORRUPTIONS",
    "corrupt",
    "corrupt_all",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "scale",
    "rotate",
    "brightness",
    "translate",
    "stripe",
    "fog",
    "spatter",
    "dotted_line",
    "zigzag",
    "canny_edges",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _as_unit(image) -> np.ndarray:
    """Validate a single [H, W] image and return it as float64 in [0, 1]."""
    x = np.asarray(image)
    if x.ndim != 2:
        raise ValueError(
            f"expected a single grayscale image of shape [H, W], got shape {x.shape}"
        )
    if x.size == 0:
        raise ValueError(f"image must be non-empty, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
            or x.dtype == np.bool_):
        raise ValueError(f"image must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("image contains non-finite values")
    return np.clip(x, 0.0, 255.0) / 255.0


def _to_uint8(x_unit: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8 in 0..255 (rounded)."""
    return np.clip(np.rint(np.asarray(x_unit) * 255.0), 0, 255).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    # skimage.filters.gaussian defaults: mode='nearest', truncate=4.0
    return ndi.gaussian_filter(np.asarray(x, dtype=np.float64), sigma=sigma,
                               mode="nearest", truncate=4.0)


def _centred_affine(linear: np.ndarray, shape) -> np.ndarray:
    """3x3 (x=col, y=row) matrix with 2x2 part ``linear`` keeping the image
    centre fixed, as in the reference (``a3 = 13.5 * (1 - a1 - a2)``)."""
    h, w = shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    (a1, a2), (b1, b2) = linear
    m = np.eye(3)
    m[:2, :2] = linear
    m[0, 2] = cx - a1 * cx - a2 * cy
    m[1, 2] = cy - b1 * cx - b2 * cy
    return m


def _warp(x_unit: np.ndarray, inverse_matrix: np.ndarray) -> np.ndarray:
    """skimage.transform.warp with an (output -> input) affine map."""
    tf = transform.AffineTransform(matrix=inverse_matrix)
    return transform.warp(x_unit, inverse_map=tf, order=1, mode="constant",
                          cval=0.0, clip=True, preserve_range=True)


def _line_from_points(c0, r0, c1, r1, shape) -> np.ndarray:
    """Anti-aliased line mask (reference ``line_from_points``): intensity
    ``log(1 - d/2.3) + 1`` of the vertical distance ``d`` to the line,
    restricted to columns [floor(c0), ceil(c1))."""
    h, w = shape
    if c1 == c0:
        return np.zeros((h, w))
    cc = np.arange(w, dtype=np.float64)[None, :]
    rr = np.arange(h, dtype=np.float64)[:, None]
    m = (r1 - r0) / (c1 - c0)
    dist = np.clip(np.abs(rr - (m * (cc - c0) + r0)), 0, 2.3 - 1e-10)
    corruption = np.clip(np.log(1 - dist / 2.3) + 1, 0, 1)
    left = int(np.floor(c0))
    right = int(np.ceil(c1))
    if left > 0:
        corruption[:, :left] = 0
    corruption[:, max(right, 0):] = 0
    return corruption


def _plasma_fractal(rng: np.random.Generator, mapsize: int = 256,
                    wibbledecay: float = 3.0) -> np.ndarray:
    """Diamond-square height map in [0, 1] (reference ``plasma_fractal``)."""
    assert mapsize & (mapsize - 1) == 0
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        # diamonds
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ldrsum = drgrid + np.roll(drgrid, 1, axis=0)
        lulsum = ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ldrsum + lulsum)
        tdrsum = drgrid + np.roll(drgrid, 1, axis=1)
        tulsum = ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tdrsum + tulsum)
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    return maparray / maparray.max()


# --------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------

def shot_noise(image, seed: int) -> np.ndarray:
    """Poisson noise, c = 3 (severity 5)."""
    c = 3.0
    x = _as_unit(image)
    rng = np.random.default_rng(seed)
    return _to_uint8(np.clip(rng.poisson(x * c) / c, 0, 1))


def impulse_noise(image, seed: int) -> np.ndarray:
    """Salt & pepper noise on 17 % of pixels (severity 4)."""
    amount, salt_vs_pepper = 0.17, 0.5
    x = _as_unit(image).copy()
    rng = np.random.default_rng(seed)
    flipped = rng.random(x.shape) < amount
    salted = rng.random(x.shape) < salt_vs_pepper
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return _to_uint8(x)


def glass_blur(image, seed: int) -> np.ndarray:
    """Blur, locally shuffle pixels, blur again (severity 1: sigma 0.7,
    max_delta 1, 2 iterations)."""
    sigma, max_delta, iterations = 0.7, 1, 2
    x = _as_unit(image)
    h, w = x.shape
    rng = np.random.default_rng(seed)
    # the reference truncates to uint8 between the two blurs
    x = np.floor(np.clip(_gaussian(x, sigma), 0, 1) * 255.0)

    hs = range(h - max_delta, max_delta, -1)
    ws = range(w - max_delta, max_delta, -1)
    n_h, n_w = len(hs), len(ws)
    if n_h > 0 and n_w > 0:
        # Pre-draw all randomness (vectorised), then run the sequential,
        # order-dependent swaps of the reference on a flat Python list.
        swap = (rng.random((iterations, n_h, n_w)) < 0.5).tolist()
        delta = rng.integers(-max_delta, max_delta, size=(iterations, n_h, n_w, 2)).tolist()
        flat = x.ravel().tolist()
        for it in range(iterations):
            swap_it, delta_it = swap[it], delta[it]
            for i, hh in enumerate(hs):
                swap_row, delta_row = swap_it[i], delta_it[i]
                base = hh * w
                for j, ww in enumerate(ws):
                    if swap_row[j]:
                        dx, dy = delta_row[j]
                        a = base + ww
                        b = (hh + dy) * w + ww + dx
                        flat[a], flat[b] = flat[b], flat[a]
        x = np.asarray(flat, dtype=np.float64).reshape(h, w)

    return _to_uint8(np.clip(_gaussian(x / 255.0, sigma), 0, 1))


def motion_blur(image, seed: int) -> np.ndarray:
    """One-sided Gaussian motion blur as ImageMagick ``MotionBlurImage``
    (severity 1: radius 10, sigma 3, angle ~ U(-45, 45) degrees)."""
    radius, sigma = 10.0, 3.0
    x = _as_unit(image)
    h, w = x.shape
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(rng.uniform(-45, 45))

    width = int(2 * np.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(i * i) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    # ImageMagick: offset = ceil(i * dir - 0.5) (round half down), x = column
    off_x = np.ceil(i * np.cos(angle) - 0.5).astype(int)
    off_y = np.ceil(i * np.sin(angle) - 0.5).astype(int)

    pad = width
    xp = np.pad(x, pad, mode="edge")  # ImageMagick default virtual pixels: edge
    out = np.zeros_like(x)
    for k, ox, oy in zip(kernel, off_x, off_y):
        out += k * xp[pad + oy:pad + oy + h, pad + ox:pad + ox + w]
    return _to_uint8(np.clip(out, 0, 1))


def shear(image, seed: int) -> np.ndarray:
    """Affine shear of 0.4 rad with random sign about the centre (severity 2)."""
    c = 0.4
    x = _as_unit(image)
    rng = np.random.default_rng(seed)
    c *= rng.choice([-1, 1])
    # skimage (<0.24) AffineTransform(shear=c): [[1, -sin c], [0, cos c]]
    linear = np.array([[1.0, -np.sin(c)], [0.0, np.cos(c)]])
    return _to_uint8(_warp(x, _centred_affine(linear, x.shape)))


def scale(image, seed: int) -> np.ndarray:
    """Zoom out to 70 % about the centre (severity 3); deterministic."""
    s = 1 / 0.7
    x = _as_unit(image)
    linear = np.array([[s, 0.0], [0.0, s]])
    return _to_uint8(_warp(x, _centred_affine(linear, x.shape)))


def rotate(image, seed: int) -> np.ndarray:
    """Rotate by 0.4 rad with random sign about the centre (severity 2)."""
    c = 0.4
    x = _as_unit(image)
    rng = np.random.default_rng(seed)
    c *= rng.choice([-1, 1])
    linear = np.array([[np.cos(c), -np.sin(c)], [np.sin(c), np.cos(c)]])
    return _to_uint8(_warp(x, _centred_affine(linear, x.shape)))


def brightness(image, seed: int) -> np.ndarray:
    """HSV value + 0.5 (severity 5); for a gray image this is
    ``clip(x + 0.5)`` (gray->HSV has s = 0, v = x). Deterministic."""
    c = 0.5
    x = _as_unit(image)
    return _to_uint8(np.clip(x + c, 0, 1))


def translate(image, seed: int) -> np.ndarray:
    """Shift by 3 px along each axis with independent random signs
    (severity 3)."""
    c = 3
    x = _as_unit(image)
    rng = np.random.default_rng(seed)
    bit = rng.choice([-1, 1], 2)
    dx, dy = c * bit[0], c * bit[1]
    m = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])
    return _to_uint8(_warp(x, m))


def stripe(image, seed: int) -> np.ndarray:
    """Invert the left and right quarters of the columns (reference: columns
    [:7] and [21:] of 28). Deterministic."""
    x = _as_unit(image).copy()
    w = x.shape[1]
    left, right = w // 4, w - w // 4
    x[:, :left] = 1.0 - x[:, :left]
    x[:, right:] = 1.0 - x[:, right:]
    return _to_uint8(x)


def fog(image, seed: int) -> np.ndarray:
    """Additive plasma-fractal fog (severity 5: strength 3, wibble decay 1.4)."""
    c = (3.0, 1.4)
    x = _as_unit(image)
    h, w = x.shape
    rng = np.random.default_rng(seed)
    mapsize = max(256, 1 << int(np.ceil(np.log2(max(h, w)))))
    max_val = x.max()
    x = x + c[0] * _plasma_fractal(rng, mapsize=mapsize, wibbledecay=c[1])[:h, :w]
    return _to_uint8(np.clip(x * max_val / (max_val + c[0]), 0, 1))


def spatter(image, seed: int) -> np.ndarray:
    """Gray "mud" blobs (severity 4: loc 0.65, scale 0.3, sigma 1, threshold
    0.65, mask sigma 1.5, colour 63/255)."""
    c = (0.65, 0.3, 1, 0.65, 1.5)
    x = _as_unit(image)
    rng = np.random.default_rng(seed)
    liquid = rng.normal(loc=c[0], scale=c[1], size=x.shape)
    liquid = _gaussian(liquid, c[2])
    liquid[liquid < c[3]] = 0
    m = np.where(liquid > c[3], 1.0, 0.0)
    m = _gaussian(m, c[4])
    m[m < 0.8] = 0
    color = 63 / 255.0 * m
    return _to_uint8(np.clip(x * (1 - m) + color, 0, 1))


def dotted_line(image, seed: int) -> np.ndarray:
    """Random dotted line across the image (2 px dashes, 2 px gaps)."""
    x = _as_unit(image)
    h, w = x.shape
    rng = np.random.default_rng(seed)
    r0, r1 = rng.integers(low=0, high=h - 1, size=2)
    corruption = _line_from_points(0, r0, w - 1, r1, x.shape)
    # zero columns [0,2), [4,6), [8,10), ...
    for start in range(0, w, 4):
        corruption[:, start:start + 2] = 0
    return _to_uint8(np.clip(x + corruption, 0, 1))


def zigzag(image, seed: int) -> np.ndarray:
    """Random zig-zag line (segment length a = 2, amplitude b = 2) from column
    2 to W-3 with slope up to +-5 rows."""
    x = _as_unit(image)
    h, w = x.shape
    rng = np.random.default_rng(seed)
    a, b = 2.0, 2.0
    c0, c1 = 2, w - 3
    r0 = int(rng.integers(low=0, high=h - 1))
    r1 = r0 + int(rng.integers(low=-5, high=5))
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / np.cos(theta)  # length of the straight line

    endpoints = [(0.0, 0.0)]
    r_i = 0.0
    for i in range(int((d - a) // (2 * a)) + 1):
        endpoints.append(((2 * i + 1) * a, (-1) ** i * b))
        r_i = (-1) ** i * b
    max_c = (2 * a) * (d // (2 * a))
    if d != max_c:
        endpoints.append((d, r_i / (2 * (d - max_c))))  # as in the reference
    pts = np.array(endpoints).T
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cs, rs = rot @ pts
    cs = cs + c0
    rs = rs + r0

    for k in range(1, pts.shape[1]):
        x = np.clip(x + _line_from_points(cs[k - 1], rs[k - 1], cs[k], rs[k], x.shape), 0, 1)
    return _to_uint8(x)


def canny_edges(image, seed: int) -> np.ndarray:
    """Canny edge map (``skimage.feature.canny``, sigma 1), binary 0/255.
    Deterministic."""
    x = _as_unit(image)
    return feature.canny(x).astype(np.uint8) * np.uint8(255)


CORRUPTIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "shear": shear,
    "scale": scale,
    "rotate": rotate,
    "brightness": brightness,
    "translate": translate,
    "stripe": stripe,
    "fog": fog,
    "spatter": spatter,
    "dotted_line": dotted_line,
    "zigzag": zigzag,
    "canny_edges": canny_edges,
}


# --------------------------------------------------------------------------
# batch API
# --------------------------------------------------------------------------

def _check_batch(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 2:
        raise ValueError(
            f"images must be a 3-D batch [N, H, W]; got a 2-D array of shape {arr.shape}. "
            "For a single image pass images[None] (or call the corruption "
            "function directly)."
        )
    if arr.ndim != 3:
        raise ValueError(
            f"images must be a 3-D batch [N, H, W] of grayscale images; got shape {arr.shape}"
            + (" (drop the channel axis, e.g. images[:, 0] or images[..., 0])"
               if arr.ndim == 4 and 1 in (arr.shape[1], arr.shape[-1]) else "")
        )
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"images must have non-empty H and W; got shape {arr.shape}")
    return arr


def _image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def corrupt(images, name: str, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` to every image of an ``[N, H, W]`` batch.

    Image ``i`` uses the seed derived from ``SeedSequence([seed, i])``, so the
    result is a deterministic function of ``(images, name, seed)`` and a given
    image's corruption does not depend on the rest of the batch beyond its
    index.  Returns uint8 ``[N, H, W]``.
    """
    if name not in CORRUPTIONS:
        raise ValueError(
            f"unknown corruption {name!r}; valid names are: {', '.join(CORRUPTIONS)}"
        )
    arr = _check_batch(images)
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    fn = CORRUPTIONS[name]
    out = np.empty(arr.shape, dtype=np.uint8)
    for i in range(arr.shape[0]):
        out[i] = fn(arr[i], _image_seed(seed, i))
    return out


def corrupt_all(images, seed: int = 0) -> dict[str, np.ndarray]:
    """All corruptions of an ``[N, H, W]`` batch: ``{name: uint8 [N, H, W]}``."""
    arr = _check_batch(images)
    return {name: corrupt(arr, name, seed) for name in CORRUPTIONS}
