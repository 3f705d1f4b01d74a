"""How partial pixel moments are stored (``merge.moment_columns`` / ``merge.moments_of``): float64
and float32 give back exactly the values stored; float16 keeps 11 bits of every example's
moments whatever their magnitude (per-row scales), where a plain float16 cast would flush small
gradients' M2 to zero. No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vog_ray.distributed.merge import moment_columns, moments_of


def _table(key: str, mean: np.ndarray, m2: np.ndarray, dtype: str) -> pa.Table:
    return pa.table(moment_columns(key, mean, m2, dtype))


def test_float64_and_float32_round_trip_exactly():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(5, 12))
    m2 = rng.random((5, 12))
    got = moments_of(_table("all_logit", mean, m2, "float64"), "all_logit")
    assert np.array_equal(got[0], mean) and np.array_equal(got[1], m2)
    m32, v32 = mean.astype(np.float32), m2.astype(np.float32)       # what a float32 engine computes
    got = moments_of(_table("all_logit", m32, v32, "float32"), "all_logit")
    assert np.array_equal(got[0], m32.astype(np.float64)) and np.array_equal(got[1], v32.astype(np.float64))
    assert _table("k", mean, m2, "float32").schema.field("mmean_k").type.value_type == pa.float32()


@pytest.mark.parametrize("magnitude", [1e-9, 1e-4, 1.0, 1e4])
def test_float16_keeps_relative_precision_at_any_magnitude(magnitude):
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(6, 64)) * magnitude
    m2 = rng.random((6, 64)) * magnitude ** 2 * 3
    m2[2] = 0.0                                                      # an example with one checkpoint
    t = _table("late_softmax", mean, m2, "float16")
    assert t.schema.field("mmean_late_softmax").type.value_type == pa.float16()
    got_mean, got_m2 = moments_of(t, "late_softmax")
    # |error| ≤ half a float16 ulp of the row's largest value (2^-11 relative), for every pixel
    for want, got in ((mean, got_mean), (m2, got_m2)):
        bound = np.abs(want).max(axis=1, keepdims=True) * 2.0 ** -11
        assert np.all(np.abs(got - want) <= bound + 1e-300)
    assert np.all(got_m2[2] == 0)
    # the VoG of a row (mean over pixels of sqrt(M2 / n)) within 1e-3 relative
    vog, vog16 = np.sqrt(m2 / 3).mean(axis=1), np.sqrt(got_m2 / 3).mean(axis=1)
    ok = vog > 0
    assert np.all(np.abs(vog16[ok] - vog[ok]) / vog[ok] < 1e-3)
    if magnitude <= 1e-4:  # a plain float16 cast loses these M2 values (underflow): the scales matter
        assert np.abs(m2.astype(np.float16).astype(np.float64) - m2).max() > 0.1 * m2.max()
    with pytest.raises(ValueError, match="moment dtype"):
        moment_columns("k", mean, m2, "bfloat16")
