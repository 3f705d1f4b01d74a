"""Moment algebra (DESIGN.md §1 steps 4–6, §2) against independent numpy float64 references.

Every check compares ``vog_ray.moments`` with plain numpy (``np.std(ddof=0)``, ``np.mean``) or
with the values published with the official VoG release — never with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vog_ray.core.moments import ClassMoments, PixelMoments, class_normalize, vog_from_gradient_maps

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Finite, moderately scaled values; hypothesis also draws zeros, duplicates and tiny numbers.
# Magnitudes below 1e-150 are left out: their squared deviations underflow into float64's
# subnormal range (e.g. [1.1e-160, 0, 0]), where no implementation, numpy's included, keeps 1e-6.
VALUES = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False,
                   allow_subnormal=False, width=64).filter(lambda v: v == 0 or abs(v) > 1e-150)


def maps_strategy(max_k: int = 6):
    """Gradient maps ``[K, N, H, W]`` with K >= 1."""
    shape = st.tuples(st.integers(1, max_k), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
    return shape.flatmap(lambda s: hnp.arrays(np.float64, s, elements=VALUES))


def ref_vog(maps: np.ndarray) -> np.ndarray:
    """Independent two-pass float64 reference: mean over pixels of np.std(ddof=0) over checkpoints."""
    m = np.asarray(maps, dtype=np.float64)
    return np.std(m, axis=0, ddof=0).reshape(m.shape[1], -1).mean(axis=1)


def rel_err(got, ref, scale: float, floor: float) -> float:
    """max |got - ref| / (|ref| + floor * scale): relative error with an absolute floor.

    The floor covers cancellation when the spread is far below the magnitude of the maps: a
    one-pass (or merged) variance then carries an error ~ eps * scale**2, i.e. a std error of
    ~ sqrt(eps) * scale, for *any* correct algorithm.
    """
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.all(np.isfinite(got)), got
    den = np.abs(ref) + floor * max(scale, 1e-300)
    return float(np.max(np.abs(got - ref) / den)) if got.size else 0.0


def fold(maps, dtype=None) -> PixelMoments:
    """One-at-a-time Welford updates."""
    st_ = PixelMoments.from_map(maps[0], dtype=dtype)
    for t in range(1, len(maps)):
        st_.update(maps[t])
    return st_


# --------------------------------------------------------------------------- reference values
def test_official_imagenet_reference(reference_dir):
    path = reference_dir / "official_imagenet_late.npz"
    if not path.is_file():
        pytest.fail(f"reference file missing: {path}")
    d = np.load(path)
    maps, vog = d["gradient_maps"], d["vog"]
    assert maps.shape == (3, 24, 224, 224) and vog.shape == (24,)
    got = np.asarray(vog_from_gradient_maps(maps), dtype=np.float64)
    rel = np.abs(got - vog.astype(np.float64)) / np.abs(vog.astype(np.float64))
    print(f"official ImageNet late VoG: max relative error {rel.max():.3e} over {len(rel)} examples")
    assert rel.max() < 1e-6
    # the torch path (float64 on CPU) reproduces them too
    got_t = vog_from_gradient_maps(torch.from_numpy(maps).double()).numpy()
    rel_t = np.abs(got_t - vog) / np.abs(vog)
    print(f"  torch float64 path: max relative error {rel_t.max():.3e}")
    assert rel_t.max() < 1e-6


# --------------------------------------------------------------------------- pixel moments
def test_welford_equals_merge_equals_two_pass():
    worst = {"welford": 0.0, "merge": 0.0, "vog_from_maps": 0.0}

    @SETTINGS
    @given(maps=maps_strategy(), cut=st.integers(0, 100))
    def check(maps, cut):
        K = maps.shape[0]
        scale = float(np.max(np.abs(maps)))
        ref = ref_vog(maps)
        welford = fold(maps).finalize()
        c = 1 + cut % K if K > 1 else 1
        merged = fold(maps[:c]).merge(fold(maps[c:])) if c < K else fold(maps)
        direct = vog_from_gradient_maps(maps)
        for name, got in (("welford", welford), ("merge", merged.finalize()),
                          ("vog_from_maps", direct)):
            e = rel_err(got, ref, scale, floor=1e-7)
            worst[name] = max(worst[name], e)
            assert e < 1e-6, (name, e)
        # the merged state also holds the right per-pixel mean and population variance
        np.testing.assert_allclose(merged.mean, maps.mean(axis=0), rtol=1e-9, atol=1e-12 * scale)
        np.testing.assert_allclose(merged.variance(), maps.var(axis=0), rtol=1e-6,
                                   atol=1e-13 * scale ** 2 + 1e-300)
        assert merged.n == K

    check()
    print("max relative error vs numpy two-pass float64: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def test_merge_associative_and_commutative():
    worst = [0.0]

    @SETTINGS
    @given(maps=maps_strategy(max_k=8).filter(lambda m: m.shape[0] >= 3),
           cuts=st.tuples(st.integers(0, 100), st.integers(0, 100)))
    def check(maps, cuts):
        K = maps.shape[0]
        i, j = sorted((1 + cuts[0] % (K - 1), 1 + cuts[1] % (K - 1)))
        if i == j:
            j = min(K, i + 1)
        a, b, c = fold(maps[:i]), fold(maps[i:j]) if j > i else None, (fold(maps[j:]) if j < K else None)
        parts = [p for p in (a, b, c) if p is not None]
        if len(parts) < 3:
            parts.append(PixelMoments.empty(maps.shape[1:]))  # the empty state is the identity
        a, b, c = parts
        scale = float(np.max(np.abs(maps)))
        ref = ref_vog(maps)
        variants = {
            "(a+b)+c": a.merge(b).merge(c),
            "a+(b+c)": a.merge(b.merge(c)),
            "(c+b)+a": c.merge(b).merge(a),
            "b+(a+c)": b.merge(a.merge(c)),
        }
        vals = {k: v.finalize() for k, v in variants.items()}
        for k, v in vals.items():
            assert variants[k].n == K
            e = rel_err(v, ref, scale, floor=1e-7)
            e2 = rel_err(v, vals["(a+b)+c"], scale, floor=1e-7)
            worst[0] = max(worst[0], e, e2)
            assert e < 1e-6 and e2 < 1e-6, (k, e, e2)

    check()
    print(f"merge orders: max relative error (vs each other and vs numpy) {worst[0]:.2e}")


@pytest.mark.parametrize("backend", ["numpy", "torch64", "torch32"])
def test_single_checkpoint_and_constant_maps_give_exact_zero(backend):
    rng = np.random.default_rng(0)
    one = rng.normal(size=(1, 5, 7, 7))                       # K = 1
    const = np.broadcast_to(rng.normal(size=(1, 5, 7, 7)), (4, 5, 7, 7)).copy()  # K = 4, same map
    conv = {"numpy": lambda a: a, "torch64": lambda a: torch.from_numpy(a),
            "torch32": lambda a: torch.from_numpy(a).float()}[backend]
    out = []
    for maps in (one, const):
        v = vog_from_gradient_maps(conv(maps))
        v = v.numpy() if isinstance(v, torch.Tensor) else v
        out.append(np.max(np.abs(v)))
        assert np.all(v == 0.0), v
        # a merge of partials of a constant sequence is exactly zero too
        if len(maps) > 1:
            m = fold(conv(maps[:2])).merge(fold(conv(maps[2:]))).finalize()
            m = m.numpy() if isinstance(m, torch.Tensor) else m
            assert np.all(m == 0.0), m
    print(f"{backend}: max |VoG| for K=1 {out[0]!r}, constant maps {out[1]!r}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_matches_numpy_reference(dtype):
    rng = np.random.default_rng(1)
    worst = 0.0
    for K in (2, 3, 7):
        maps = rng.normal(size=(K, 6, 9, 11)) * rng.uniform(0.1, 10, size=(1, 6, 1, 1))
        ref = ref_vog(maps)
        t = torch.from_numpy(maps).to(dtype)
        got = [vog_from_gradient_maps(t), fold(t).finalize(),
               fold(t[:1]).merge(fold(t[1:])).finalize()]
        # the state stays on the torch backend in the requested dtype
        st_ = fold(t)
        assert isinstance(st_.mean, torch.Tensor) and st_.mean.dtype == dtype
        for g in got:
            assert isinstance(g, torch.Tensor) and g.dtype == dtype
            worst = max(worst, float(np.max(np.abs(g.double().numpy() - ref) / ref)))
        # float32 maps accumulated in float64 (the engine's accum_dtype option)
        if dtype == torch.float32:
            st64 = PixelMoments.empty(tuple(t.shape[1:]), like=t, dtype=torch.float64)
            for k in range(K):
                st64.update(t[k])
            ref32 = ref_vog(t.double().numpy())  # same float32 inputs, exact reference
            e64 = float(np.max(np.abs(st64.finalize().numpy() - ref32) / ref32))
            assert e64 < 1e-12, e64
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    print(f"torch {dtype}: max relative error vs numpy float64 two-pass {worst:.2e} (tol {tol})")
    assert worst < tol


def test_vector_maps_and_bad_shapes():
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(5, 4, 3))   # [K, N, D]: tabular inputs
    got = vog_from_gradient_maps(maps)
    ref = np.std(maps, axis=0, ddof=0).mean(axis=1)
    e = float(np.max(np.abs(got - ref) / ref))
    print(f"vector maps: max relative error {e:.2e}")
    assert e < 1e-12
    with pytest.raises(ValueError, match="K = 0|zero checkpoints"):
        vog_from_gradient_maps(np.zeros((0, 2, 3, 3)))
    with pytest.raises(ValueError, match="shape"):
        vog_from_gradient_maps(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="empty"):
        PixelMoments.empty((2, 3)).finalize()


def test_select_subset_matches_reference():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(4, 10, 3, 3))
    idx = np.array([7, 2, 5])
    got = fold(maps).select(idx).finalize()
    np.testing.assert_allclose(got, ref_vog(maps[:, idx]), rtol=1e-12)


# --------------------------------------------------------------------------- class moments
def test_class_moments_merge_equals_concatenation():
    worst = [0.0]
    vals = hnp.arrays(np.float64, st.integers(0, 40), elements=VALUES)

    @SETTINGS
    @given(parts=st.lists(vals, min_size=1, max_size=5), order=st.permutations(range(5)))
    def check(parts, order):
        allv = np.concatenate(parts)
        if allv.size == 0:
            m, s = ClassMoments.empty().merge(ClassMoments.empty()).finalize()
            assert np.isnan(m) and np.isnan(s)
            return
        scale = float(np.max(np.abs(allv)))
        states = [ClassMoments.from_values(p) for p in parts]
        ordered = [states[i] for i in order if i < len(states)]
        acc = ClassMoments.empty()
        for s_ in ordered:
            acc = acc.merge(s_)
        one = ClassMoments.empty()
        for v in allv:
            one = one.update(float(v))
        ref_m, ref_s = np.mean(allv), np.std(allv, ddof=0)
        for st_ in (acc, one):
            m, s = st_.finalize()
            assert float(st_.n) == allv.size
            em = abs(float(m) - ref_m) / (abs(ref_m) + 1e-12 * scale + 1e-300)
            es = abs(float(s) - ref_s) / (abs(ref_s) + 1e-7 * scale + 1e-300)
            worst[0] = max(worst[0], em, es)
            assert em < 1e-6 and es < 1e-6, (em, es)

    check()
    print(f"ClassMoments merge/update vs np.mean/np.std(ddof=0): max relative error {worst[0]:.2e}")


def test_class_moments_from_groups_vector_state():
    rng = np.random.default_rng(4)
    v = rng.gamma(2.0, 1.0, size=300)
    g = rng.integers(0, 5, size=300)
    g[g == 3] = 2                      # class 3 is empty
    a, b = ClassMoments.from_groups(v[:120], g[:120], 6), ClassMoments.from_groups(v[120:], g[120:], 6)
    m, s = a.merge(b).finalize()
    worst = 0.0
    for c in range(6):
        sel = v[g == c]
        if sel.size == 0:
            assert np.isnan(m[c]) and np.isnan(s[c])
            continue
        worst = max(worst, abs(m[c] - sel.mean()) / sel.mean(), abs(s[c] - sel.std()) / sel.std())
    print(f"vector ClassMoments: max relative error {worst:.2e}")
    assert worst < 1e-12


# --------------------------------------------------------------------------- class normalisation
def _manual_z(v, cls):
    z = np.empty_like(v)
    for c in np.unique(cls):
        sel = cls == c
        m, s = v[sel].mean(), v[sel].std()
        z[sel] = 0.0 if s == 0 else (v[sel] - m) / s
    return z


def test_class_normalize_methods():
    rng = np.random.default_rng(5)
    v = rng.gamma(2.0, 0.01, size=200)
    cls = rng.integers(0, 4, size=200)
    st_ = ClassMoments.from_groups(v, cls, 4)
    mean, std = st_.finalize()
    ref = _manual_z(v, cls)
    z = class_normalize(v, cls, mean, std, "zscore")
    za = class_normalize(v, cls, mean, std, "abs_zscore")
    zn = class_normalize(v, cls, mean, std, "none")
    e = float(np.max(np.abs(z - ref)))
    print(f"class_normalize zscore: max abs error vs manual per-class z {e:.2e}")
    assert e < 1e-9
    np.testing.assert_allclose(za, np.abs(ref), atol=1e-9)
    np.testing.assert_array_equal(zn, v)
    # each class of the z-scores has mean 0 and population std 1
    for c in range(4):
        assert abs(z[cls == c].mean()) < 1e-9 and abs(z[cls == c].std() - 1) < 1e-9
    with pytest.raises(ValueError, match="normalization"):
        class_normalize(v, cls, mean, std, "minmax")


def test_class_normalize_degenerate_classes_give_zero_not_nan():
    v = np.array([0.5, 0.5, 0.5, 0.2, 0.9, 0.4, 0.7])
    cls = np.array([0, 0, 0, 1, 2, 2, 2])    # class 0: std 0; class 1: a single example
    mean, std = ClassMoments.from_groups(v, cls, 3).finalize()
    assert std[0] == 0 and std[1] == 0
    for method in ("zscore", "abs_zscore"):
        z = class_normalize(v, cls, mean, std, method)
        assert np.all(np.isfinite(z)), z
        assert np.all(z[:4] == 0.0), z
        assert np.all(z[4:] != 0.0)
    print(f"degenerate classes: z = {class_normalize(v, cls, mean, std).round(3).tolist()}")
