"""Precision modes and the fidelity measure (vog_ray.core.precision) on the CPU.

* ``fidelity`` against scipy's Spearman and a hand count of the top-decile overlap;
* ``tf32`` on the CPU is fp32 to the bit (TF32 is a CUDA format); ``fp32`` is the plain engine;
* ``bf16`` runs the forward under CPU autocast: its maps equal a naive per-example loop written with
  ``torch.autocast`` directly, and differ from fp32's by what bf16 rounding does to a ReLU network;
* the first-batch check (``compare_to_fp32``) reports Spearman 1 for tf32 on the CPU and a value
  below 1 for bf16 on a window of nearly equal checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from vog_ray.core.engine import GradientEngine
from vog_ray.core.precision import SAFE_SPEARMAN, fidelity, unsafe_keys
from vog_ray.models import build_model

LENET = {"name": "lenet", "num_classes": 10}


def state_dicts(spec, seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append({k: v.detach().clone() for k, v in build_model(spec).state_dict().items()})
    return out


def near_copies(sd, k, eps, seed=0):
    """``k`` checkpoints within ``eps`` (relative) of ``sd``: a late window's nearly equal checkpoints."""
    g = torch.Generator().manual_seed(seed)
    return [{n: v + eps * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for n, v in sd.items()} for _ in range(k)]


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(48, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 48)


def test_fidelity_against_scipy_and_a_hand_count():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=200)
    got = ref + rng.normal(scale=0.3, size=200)
    f = fidelity(ref, got)
    assert f["spearman"] == pytest.approx(spearmanr(ref, got).statistic, abs=1e-12)
    assert f["max_abs_dz"] == pytest.approx(np.max(np.abs(got - ref)))
    top_ref = set(np.argsort(ref)[-20:])
    top_got = set(np.argsort(got)[-20:])
    assert f["top_decile_overlap"] == len(top_ref & top_got) / 20
    same = fidelity(ref, ref.copy())
    assert same["spearman"] == 1.0 and same["max_abs_dz"] == 0.0 and same["top_decile_overlap"] == 1.0
    # reversed ranking: -1, no overlap; NaNs are left out
    rev = fidelity(ref, -ref)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["top_decile_overlap"] == 0.0
    with_nan = fidelity(np.r_[ref, np.nan], np.r_[got, 1.0])
    assert with_nan["n"] == 200 and with_nan["spearman"] == f["spearman"]
    assert unsafe_keys({"a": {"spearman": 0.5}, "b": {"spearman": SAFE_SPEARMAN}, "c": {"spearman": None}}) == ["a"]


def test_tf32_on_cpu_is_fp32_to_the_bit(batch):
    x, y = batch
    sds = state_dicts(LENET, [1, 2, 3])
    kw = dict(windows={"all": [0, 1, 2], "late": [1, 2]}, targets=["logit", "softmax"])
    a = GradientEngine(build_model(LENET), sds, **kw).run(x, y, emit="both")
    b = GradientEngine(build_model(LENET), sds, precision="tf32", **kw).run(x, y, emit="both")
    for k in a.vog:
        assert np.array_equal(a.vog[k], b.vog[k])
        assert np.array_equal(a.moments[k].m2, b.moments[k].m2)
    with pytest.raises(ValueError, match="precision"):
        GradientEngine(build_model(LENET), sds, precision="fp16", **kw)


def naive_autocast_maps(spec, sds, x, y):
    """Per example and checkpoint: the forward under ``torch.autocast("cpu", bfloat16)``, the logit
    at the label in float32, ``.backward()``, the channel mean of ``x.grad`` — written directly."""
    out = np.zeros((len(sds), len(x), *x.shape[2:]), np.float32)
    for k, sd in enumerate(sds):
        m = build_model(spec)
        m.load_state_dict(sd)
        m.eval()
        for i in range(len(x)):
            xi = torch.tensor(x[i:i + 1], requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lg = m(xi)
            lg.float()[0, int(y[i])].backward()
            out[k, i] = xi.grad[0].mean(dim=0).numpy()
    return out


def test_bf16_maps_are_autocast_maps_and_differ_from_fp32_by_bf16_rounding(batch):
    x, y = batch
    x, y = x[:8], y[:8]
    sds = state_dicts(LENET, [4, 5, 6])
    windows = {f"c{k}": [k] for k in range(3)}
    bf = GradientEngine(build_model(LENET), sds, windows=windows, precision="bf16",
                        channels_last=False).run(x, y, emit="moments")
    fp = GradientEngine(build_model(LENET), sds, windows=windows, channels_last=False).run(x, y, emit="moments")
    ref = naive_autocast_maps(LENET, sds, x, y)
    for k in range(3):
        got, f32 = bf.moments[f"c{k}_logit"].mean, fp.moments[f"c{k}_logit"].mean
        assert got.dtype == np.float32  # the maps (and moments) stay float32
        scale = np.abs(f32).max()
        # the same computation as the naive autocast loop (batched vs one example: kernel order only)
        assert np.abs(got - ref[k]).max() <= 1e-3 * scale
        # bf16 keeps 8 significant bits, and a random-init LeNet on noise has many activations near a
        # ReLU or max-pool switch that the rounding flips: the maps move by ~0.1 (L2, measured), far
        # beyond float32 rounding (~1e-7) and far from unrelated maps (~1.4)
        err = np.linalg.norm(got - f32) / np.linalg.norm(f32)
        assert 1e-3 < err < 0.3, err


def test_compare_to_fp32_flags_bf16_on_nearly_equal_checkpoints(batch):
    x, y = batch
    base = state_dicts(LENET, [7])[0]
    far = state_dicts(LENET, [8, 9, 10])               # an early window: checkpoints far apart
    late = near_copies(base, 3, eps=1e-3)              # a late window: nearly equal checkpoints
    sds = far + late
    windows = {"early": [0, 1, 2], "late": [3, 4, 5], "one": [0]}
    tf = GradientEngine(build_model(LENET), sds, windows=windows, precision="tf32")
    check = tf.compare_to_fp32(x, y)
    assert set(check) == {"early_logit", "late_logit"}  # a one-checkpoint window has VoG 0: left out
    assert all(f["spearman"] == 1.0 and f["max_abs_dz"] == 0.0 for f in check.values())
    bf = GradientEngine(build_model(LENET), sds, windows=windows, precision="bf16")
    check = bf.compare_to_fp32(x, y)
    assert check["early_logit"]["n"] == len(x)
    # far-apart checkpoints: bf16 keeps the ranking; nearly equal ones: rounding noise swamps the
    # spread, the ranking moves (what the audit warns about)
    assert check["early_logit"]["spearman"] > SAFE_SPEARMAN
    assert check["late_logit"]["spearman"] < SAFE_SPEARMAN
    assert bf.precision == "bf16"  # the check switched to fp32 only for its reference
    # the scorer passes the batch's own result (raw VoG, or moments when checkpoint-sharded)
    for emit in ("vog", "moments"):
        again = bf.compare_to_fp32(x, y, got=bf.run(x, y, emit=emit))
        for k, f in check.items():
            assert again[k]["n"] == f["n"]
            assert again[k]["spearman"] == pytest.approx(f["spearman"], abs=1e-6)


def test_cuda_flags_scope_sets_and_restores_the_tf32_flags():
    """The flag logic needs no GPU: PyTorch keeps the flags on any build."""
    from vog_ray.core.precision import cuda_flags

    b = torch.backends
    before = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark)
    cuda = torch.device("cuda")
    for precision, want in (("tf32", "tf32"), ("fp32", "ieee"), ("bf16", "ieee")):
        with cuda_flags(cuda, precision):
            assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark) == (want, want, True)
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark) == before
    with cuda_flags(torch.device("cpu"), "tf32"):  # the CPU: untouched
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark) == before
