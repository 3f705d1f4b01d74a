"""The stacked (vmapped) checkpoint path gives the unstacked engine's results (vog_ray.stacked).

``GradientEngine(stacked=True)`` runs the K checkpoints as one ``torch.vmap`` call;
``stacked=False`` runs them one after the other. Every output of ``run`` (raw VoG of each
window and target, pixel moments, signals, labels) must agree to 1e-6 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vog_ray.core.engine import GradientEngine, InputError
from vog_ray.core.windows import resolve_windows
from vog_ray.models import build_model
from vog_ray.core.stacked import StackedCheckpoints

K = 4
# windows that are proper subsets of the checkpoints, overlapping, and non-contiguous
WINDOWS = {"all": "all", "early": "first:2", "late": "last:3", "odd": [1, 3]}
RTOL = 1e-6

MODELS = {
    "lenet": ("lenet", (1, 28, 28), 10),
    "mlp": ({"name": "mlp", "in_features": 20, "hidden": [32, 16], "num_classes": 5}, (20,), 5),
}


def _state_dicts(spec, seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append({k: v.detach().clone() for k, v in build_model(spec).state_dict().items()})
    return out


def _data(shape, classes, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g).numpy()
    return x, y


def _engines(spec, sds, **kw):
    base = build_model(spec)
    return (GradientEngine(base, sds, stacked=False, **kw),
            GradientEngine(base, sds, stacked=True, **kw))


def _assert_same(a, b):
    assert list(a.status) == list(b.status)
    np.testing.assert_array_equal(a.target_label, b.target_label)
    if a.pred is None:
        assert b.pred is None
    else:
        np.testing.assert_array_equal(a.pred, b.pred)
    assert sorted(a.vog) == sorted(b.vog) and sorted(a.moments) == sorted(b.moments)
    for k in a.vog:
        ok = np.isfinite(a.vog[k])
        np.testing.assert_array_equal(ok, np.isfinite(b.vog[k]))
        np.testing.assert_allclose(b.vog[k][ok], a.vog[k][ok], rtol=RTOL, atol=0, err_msg=k)
    for k in a.moments:
        ma, mb = a.moments[k], b.moments[k]
        assert ma.n == mb.n
        scale = float(np.abs(ma.mean).max())
        np.testing.assert_allclose(mb.mean, ma.mean, rtol=RTOL, atol=RTOL * scale, err_msg=k)
        np.testing.assert_allclose(mb.m2, ma.m2, rtol=1e-5, atol=RTOL * scale ** 2, err_msg=k)
    assert sorted(a.signals) == sorted(b.signals)
    for s in a.signals:
        assert a.signals[s].shape == b.signals[s].shape and a.signals[s].dtype == b.signals[s].dtype
        if a.signals[s].dtype.kind in "iu":
            np.testing.assert_array_equal(b.signals[s], a.signals[s], err_msg=s)
        else:
            np.testing.assert_allclose(b.signals[s], a.signals[s], rtol=RTOL, atol=1e-6, err_msg=s)


@pytest.mark.parametrize("label_mode", ["true", "predicted"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_stacked_equals_unstacked(model, label_mode):
    spec, shape, classes = MODELS[model]
    sds = _state_dicts(spec, range(K))
    x, y = _data(shape, classes)
    x[5] = float("nan")  # a non-finite row is reported the same way on both paths
    plain, stacked = _engines(spec, sds, windows=resolve_windows(WINDOWS, K),
                              targets=["logit", "softmax"], label_mode=label_mode)
    assert stacked._use_stacked is True and plain._use_stacked is False
    a = plain.run(x, y, emit="both")
    b = stacked.run(x, y, emit="both")
    assert set(a.vog) == {f"{w}_{t}" for w in WINDOWS for t in ("logit", "softmax")}
    assert np.isnan(b.vog["all_logit"][5]) and b.status[5] == "non_finite_input"
    _assert_same(a, b)
    # a second batch through the same engines (the stacked call is traced once, then reused)
    x2, y2 = _data(shape, classes, n=7, seed=1)
    _assert_same(plain.run(x2, y2, emit="both"), stacked.run(x2, y2, emit="both"))


@pytest.mark.parametrize("model", sorted(MODELS))
def test_stacked_checkpoint_shard_and_single_target(model):
    """A group of the run's checkpoints (sharded audit) and one target at a time."""
    spec, shape, classes = MODELS[model]
    sds = _state_dicts(spec, range(K))
    x, y = _data(shape, classes, n=16, seed=2)
    ids = [1, 2]
    for target in ("logit", "softmax"):
        for label_mode in ("true", "predicted"):
            plain, stacked = _engines(
                spec, [sds[i] for i in ids], windows=resolve_windows(WINDOWS, K), targets=[target],
                label_mode=label_mode, checkpoint_ids=ids, num_checkpoints=K,
                predict_state_dict=sds[-1])
            a, b = plain.run(x, y, emit="both"), stacked.run(x, y, emit="both")
            assert a.signals["loss"].shape == (16, 2)
            _assert_same(a, b)


def test_stacked_input_grads_match_autograd():
    spec, shape, classes = MODELS["lenet"]
    models = []
    for sd in _state_dicts(spec, range(3)):
        m = build_model(spec)
        m.load_state_dict(sd)
        m.eval().requires_grad_(False)
        models.append(m)
    x, y = _data(shape, classes, n=6)
    p = torch.as_tensor(y)
    lg, grads = StackedCheckpoints(models).input_grads(x, p, ["logit", "softmax"])
    assert lg.shape == (3, 6, classes) and grads["logit"].shape == (3, 6, *shape)
    for k, m in enumerate(models):
        xg = x.clone().requires_grad_(True)
        out = m(xg)
        (gl,) = torch.autograd.grad(out.gather(1, p.view(-1, 1)).sum(), xg, retain_graph=True)
        (gs,) = torch.autograd.grad(torch.softmax(out, 1).gather(1, p.view(-1, 1)).sum(), xg)
        torch.testing.assert_close(lg[k], out.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads["logit"][k], gl, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grads["softmax"][k], gs, rtol=1e-5, atol=1e-8)


def test_stacked_input_errors():
    spec, shape, classes = MODELS["lenet"]
    sds = _state_dicts(spec, range(2))
    eng = GradientEngine(build_model(spec), sds, windows=resolve_windows({"all": "all"}, 2),
                         stacked=True)
    x, y = _data(shape, classes, n=4)
    with pytest.raises(InputError, match="labels outside"):
        eng.run(x, np.array([0, 1, 2, 10]))
    with pytest.raises(InputError, match="does not fit the model"):
        eng.run(torch.randn(4, 1, 20, 20), y)
    with pytest.raises(ValueError, match="stacked must be"):
        GradientEngine(build_model(spec), sds, windows={"all": [0, 1]}, stacked="yes")


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.vmap cannot batch it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        out = self.fc(x)
        if out.sum() > 0:  # depends on the (stacked) weights
            return out
        return -out


def test_auto_falls_back_when_the_model_cannot_be_stacked():
    sds = []
    for s in range(3):
        torch.manual_seed(s)
        sds.append(_Branchy().state_dict())
    x = torch.randn(40, 6) + 1.0
    y = np.zeros(40, dtype=np.int64)
    auto = GradientEngine(_Branchy(), sds, windows={"all": [0, 1, 2]}, stacked="auto")
    plain = GradientEngine(_Branchy(), sds, windows={"all": [0, 1, 2]}, stacked=False)
    a, b = plain.run(x, y), auto.run(x, y)
    assert auto._use_stacked is False
    np.testing.assert_array_equal(a.vog["all_logit"], b.vog["all_logit"])
    forced = GradientEngine(_Branchy(), sds, windows={"all": [0, 1, 2]}, stacked=True)
    with pytest.raises(Exception):
        forced.run(x, y)


def test_auto_decides_on_the_first_large_batch():
    spec, shape, classes = MODELS["mlp"]
    sds = _state_dicts(spec, range(K))
    eng = GradientEngine(build_model(spec), sds, windows=resolve_windows(WINDOWS, K), stacked="auto")
    plain = GradientEngine(build_model(spec), sds, windows=resolve_windows(WINDOWS, K),
                           stacked=False)
    x, y = _data(shape, classes, n=8)
    _assert_same(plain.run(x, y), eng.run(x, y))
    assert eng._use_stacked is None  # too small a batch to time
    x, y = _data(shape, classes, n=64, seed=3)
    _assert_same(plain.run(x, y, emit="both"), eng.run(x, y, emit="both"))
    assert eng._use_stacked in (True, False) and eng.stack_timing is not None
    _assert_same(plain.run(x, y, emit="both"), eng.run(x, y, emit="both"))
    # a model too large to stack is never considered
    big = GradientEngine(build_model(spec), sds, windows={"all": [0, 1, 2, 3]}, stacked="auto")
    assert big._stack is not None  # (this one is small)
    import vog_ray.core.engine as engine_mod

    old = engine_mod.STACK_AUTO_MAX_BYTES
    engine_mod.STACK_AUTO_MAX_BYTES = 0
    try:
        big = GradientEngine(build_model(spec), sds, windows={"all": [0, 1, 2, 3]}, stacked="auto")
        assert big._stack is None and big._use_stacked is False
    finally:
        engine_mod.STACK_AUTO_MAX_BYTES = old


# ---- the other execution choice: channels_last (default on for convnets on CPU) ------------
class _ViewNet(nn.Module):
    """``.view(N, -1)`` after a convolution: cannot run on channels_last activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_default_channels_last_falls_back_for_models_that_need_contiguous():
    sds = []
    for s in range(3):
        torch.manual_seed(s)
        sds.append(_ViewNet().state_dict())
    x = torch.randn(10, 1, 8, 8)
    y = np.arange(10) % 3
    for stacked in (False, True):
        eng = GradientEngine(_ViewNet(), sds, windows={"all": [0, 1, 2]}, stacked=stacked)
        assert eng.channels_last  # the CPU default for a model with Conv2d
        res = eng.run(x, y)
        assert not eng.channels_last
        ref = GradientEngine(_ViewNet(), sds, windows={"all": [0, 1, 2]}, stacked=False,
                             channels_last=False).run(x, y)
        np.testing.assert_allclose(res.vog["all_logit"], ref.vog["all_logit"], rtol=RTOL)


def test_channels_last_matches_contiguous():
    spec, shape, classes = MODELS["lenet"]
    sds = _state_dicts(spec, range(3))
    x, y = _data(shape, classes, n=12)
    kw = dict(windows=resolve_windows({"all": "all", "late": "last:2"}, 3),
              targets=["logit", "softmax"], stacked=False)
    a = GradientEngine(build_model(spec), sds, channels_last=False, **kw).run(x, y, emit="both")
    b = GradientEngine(build_model(spec), sds, channels_last=True, **kw).run(x, y, emit="both")
    _assert_same(a, b)
