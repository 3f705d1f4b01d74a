"""The batched gradient engine against a naive float64 per-example reference (DESIGN.md §1).

The reference below is written independently of ``vog_ray.engine``: the model in float64 with
its parameters requiring grad, one example at a time, a fresh ``.backward()`` per checkpoint,
the channel mean of the input gradient, ``np.std(ddof=0)`` across checkpoints, the mean over
pixels.
"""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import torch

import vog_ray
from vog_ray.core.engine import GradientEngine
from vog_ray.core.windows import resolve_windows
from vog_ray.models import build_model
from vog_ray.core.moments import PixelMoments

WINDOWS = {"all": "all", "early": "first:2", "late": "last:2"}
WINDOW_IDX = {"all": [0, 1, 2], "early": [0, 1], "late": [1, 2]}
TOL = 1e-5


def random_state_dicts(spec, seeds, *, bn: bool = False):
    """Random-init checkpoints (one per seed); BatchNorm stats and affine set to non-trivial values."""
    out = []
    for s in seeds:
        torch.manual_seed(s)
        m = build_model(spec)
        if bn:
            g = torch.Generator().manual_seed(1000 + s)
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    c = mod.num_features
                    mod.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                    mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                    mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                    mod.bias.data.copy_(0.2 * torch.randn(c, generator=g))
        out.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    return out


class NaiveReference:
    """Per-example, per-checkpoint float64 input gradients, computed the plain way."""

    def __init__(self, spec, state_dicts, x):
        self.models = []
        for sd in state_dicts:
            m = build_model(spec)
            m.load_state_dict(sd)
            m = m.double().eval()
            for p in m.parameters():
                assert p.requires_grad  # on purpose: the reference does not take the engine's shortcut
            self.models.append(m)
        self.x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        self._cache: dict = {}

    def logits(self, k: int) -> np.ndarray:
        if ("logits", k) not in self._cache:
            with torch.no_grad():
                self._cache[("logits", k)] = np.stack(
                    [self.models[k](self.x[i:i + 1])[0].numpy() for i in range(len(self.x))])
        return self._cache[("logits", k)]

    def predicted(self) -> np.ndarray:
        return self.logits(len(self.models) - 1).argmax(axis=1)

    def grad_map(self, k: int, i: int, target: str, p: int) -> np.ndarray:
        key = (k, i, target, p)
        if key not in self._cache:
            model = self.models[k]
            model.zero_grad(set_to_none=True)
            xi = self.x[i:i + 1].clone().requires_grad_(True)
            out = model(xi)[0]
            s = out[p] if target == "logit" else torch.softmax(out, dim=0)[p]
            s.backward()
            g = xi.grad[0].numpy()
            self._cache[key] = g.mean(axis=0) if g.ndim == 3 else g
        return self._cache[key]

    def vog(self, target: str, labels: np.ndarray, ckpts: list[int]) -> np.ndarray:
        out = []
        for i in range(len(self.x)):
            maps = np.stack([self.grad_map(k, i, target, int(labels[i])) for k in ckpts])
            out.append(np.std(maps, axis=0, ddof=0).mean())
        return np.array(out)


def by_id(table, col):
    ids = np.asarray(table.column("id").to_pylist()).astype(int)
    vals = np.asarray(table.column(col).to_pylist(), dtype=np.float64)
    out = np.full(ids.max() + 1, np.nan)
    out[ids] = vals
    return out


CASES = {
    # name: (spec, example shape, BatchNorm stats perturbed, checkpoint seeds, data seed, N)
    "lenet": ({"name": "lenet", "num_classes": 10}, (1, 28, 28), False, [11, 12, 13], 0, 6),
    "resnet8": ({"name": "resnet18_cifar", "num_classes": 10, "width": 8}, (3, 32, 32), True,
                [21, 22, 23], 1, 4),
}


@pytest.fixture(scope="module")
def naive_case():
    """Lazily built cases; the naive reference caches its gradient maps across tests."""
    built: dict = {}

    def get(name):
        if name not in built:
            spec, shape, bn, seeds, dseed, n = CASES[name]
            sds = random_state_dicts(spec, seeds, bn=bn)
            rng = np.random.default_rng(dseed)
            x = rng.normal(size=(n, *shape)).astype(np.float32)
            y = rng.integers(0, 10, size=n)
            built[name] = (spec, sds, x, y, NaiveReference(spec, sds, x))
        return built[name]

    return get


@pytest.mark.parametrize("case", [
    "lenet", pytest.param("resnet8", marks=pytest.mark.slow)])
def test_score_matches_naive_reference(case, naive_case, save_checkpoints):
    """``vog_ray.score`` (checkpoints from files) vs the naive reference: all windows, both
    targets, both label modes (predicted = argmax of the last checkpoint)."""
    spec, sds, x, y, ref = naive_case(case)
    glob = save_checkpoints(sds, name=case, subdir=case)
    t0 = time.time()
    worst = 0.0
    pred_last = ref.predicted()
    for mode in ("true", "predicted"):
        t = vog_ray.score(x, y, model=spec, checkpoints=glob, windows=WINDOWS,
                          targets=["logit", "softmax"], label_mode=mode, batch_size=len(x),
                          device="cpu")
        p = y if mode == "true" else pred_last
        np.testing.assert_array_equal(by_id(t, "target_label").astype(int), p)
        np.testing.assert_array_equal(by_id(t, "pred").astype(int), pred_last)
        for w, ck in WINDOW_IDX.items():
            for target in ("logit", "softmax"):
                r = ref.vog(target, p, ck)
                got = by_id(t, f"vog_{w}_{target}")
                assert np.all(r > 0)
                e = float(np.max(np.abs(got - r) / r))
                worst = max(worst, e)
                assert e < TOL, (mode, w, target, e)
    print(f"{case}: max relative error score() vs naive float64 = {worst:.2e} "
          f"(windows all/early/late, logit+softmax, true+predicted) [{time.time() - t0:.1f}s]")


@pytest.mark.slow
def test_naive_reference_resnet18_cifar_default_width(save_checkpoints):
    spec = {"name": "resnet18_cifar", "num_classes": 10}
    sds = random_state_dicts(spec, [31, 32, 33], bn=True)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=2)
    ref = NaiveReference(spec, sds, x)
    glob = save_checkpoints(sds, name="resnet64", subdir="resnet64")
    t0 = time.time()
    t = vog_ray.score(x, y, model=spec, checkpoints=glob, windows=WINDOWS,
                      targets=["logit", "softmax"], batch_size=2, device="cpu")
    worst = 0.0
    for w, ck in WINDOW_IDX.items():
        for target in ("logit", "softmax"):
            r = ref.vog(target, y, ck)
            e = float(np.max(np.abs(by_id(t, f"vog_{w}_{target}") - r) / r))
            worst = max(worst, e)
            assert e < TOL, (w, target, e)
    print(f"resnet18_cifar width 64: max relative error engine vs naive float64 = {worst:.2e} "
          f"[{time.time() - t0:.1f}s]")


# the engine's execution paths (one checkpoint after the other, or all stacked with vmap) must
# each match the naive reference; None = the engine's default where it has no such option
ENGINE_PATHS = ([False, True] if "stacked" in inspect.signature(GradientEngine.__init__).parameters
                else [None])


@pytest.mark.parametrize("stacked", ENGINE_PATHS)
@pytest.mark.parametrize("case", ["lenet", pytest.param("resnet8", marks=pytest.mark.slow)])
def test_engine_paths_match_naive_reference(case, stacked, naive_case):
    spec, sds, x, y, ref = naive_case(case)
    windows = resolve_windows(WINDOWS, 3)
    kw = {} if stacked is None else {"stacked": stacked}
    n = len(x)
    worst = 0.0
    for mode in ("true", "predicted"):
        eng = GradientEngine(build_model(spec), sds, windows=windows, targets=["logit", "softmax"],
                             label_mode=mode, **kw)
        res = eng.run(x, y)
        p = y if mode == "true" else ref.predicted()
        np.testing.assert_array_equal(res.target_label, p)
        for w, ck in windows.items():
            for target in ("logit", "softmax"):
                r = ref.vog(target, p, ck)
                e = float(np.max(np.abs(res.vog[f"{w}_{target}"] - r) / r))
                worst = max(worst, e)
                assert e < TOL, (mode, w, target, e)
        # signals from the same forward passes: label logit per checkpoint
        for k in range(3):
            np.testing.assert_allclose(res.signals["label_logit"][:, k],
                                       ref.logits(k)[np.arange(n), p], rtol=1e-4, atol=1e-5)
    print(f"{case}, stacked={stacked}: max relative error GradientEngine vs naive float64 = {worst:.2e}")


def test_engine_vector_inputs_and_accum_dtype():
    """MLP on [N, D] inputs: the map is the gradient vector itself; float64 accumulation agrees."""
    spec = {"name": "mlp", "in_features": 5, "hidden": [7], "num_classes": 3, "activation": "tanh"}
    sds = random_state_dicts(spec, [1, 2, 3, 4])
    rng = np.random.default_rng(3)
    x = rng.normal(size=(9, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=9)
    ref = NaiveReference(spec, sds, x)
    windows = resolve_windows({"all": "all", "mid": "1:3"}, 4)
    worst = 0.0
    for dt in (torch.float32, torch.float64):
        eng = GradientEngine(build_model(spec), sds, windows=windows, targets=["softmax", "logit"],
                             accum_dtype=dt)
        res = eng.run(x, y)
        for w in windows:
            for target in ("softmax", "logit"):
                r = ref.vog(target, y, windows[w])
                e = float(np.max(np.abs(res.vog[f"{w}_{target}"] - r) / r))
                worst = max(worst, e)
                assert e < TOL, (dt, w, target, e)
    print(f"mlp vector inputs: max relative error vs naive float64 = {worst:.2e}")


def test_checkpoint_sharded_moments_merge_to_fused():
    """Two engines holding checkpoint groups {0,1} and {2,3}; merged moments == fused VoG."""
    spec = {"name": "lenet", "num_classes": 10}
    sds = random_state_dicts(spec, [41, 42, 43, 44])
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 1, 28, 28)).astype(np.float32)
    windows = resolve_windows({"all": "all", "late": "last:3"}, 4)
    model = build_model(spec)
    fused = GradientEngine(model, sds, windows=windows, targets=["logit", "softmax"],
                           label_mode="predicted").run(x)
    a = GradientEngine(model, sds[:2], windows=windows, targets=["logit", "softmax"],
                       label_mode="predicted", checkpoint_ids=[0, 1], num_checkpoints=4,
                       predict_state_dict=sds[3]).run(x, emit="moments")
    b = GradientEngine(model, sds[2:], windows=windows, targets=["logit", "softmax"],
                       label_mode="predicted", checkpoint_ids=[2, 3], num_checkpoints=4).run(x, emit="moments")
    np.testing.assert_array_equal(a.target_label, fused.target_label)
    worst = 0.0
    for key, v in fused.vog.items():
        ma = a.moments.get(key, PixelMoments.empty(b.moments[key].mean.shape))
        merged = ma.merge(b.moments[key])
        assert merged.n == len(windows[key.rsplit("_", 1)[0]])
        e = float(np.max(np.abs(merged.finalize() - v) / v))
        worst = max(worst, e)
        assert e < 1e-6, (key, e)
    print(f"checkpoint-sharded merge vs fused: max relative error {worst:.2e}")


def test_resolve_windows_forms():
    assert resolve_windows({"early": "first:3", "late": "last:3", "all": "all"}, 10) == {
        "early": [0, 1, 2], "late": [7, 8, 9], "all": list(range(10))}
    assert resolve_windows({"a": "-3:", "b": [0, -1, 4], "c": "2:5"}, 10) == {
        "a": [7, 8, 9], "b": [0, 4, 9], "c": [2, 3, 4]}
    for spec, msg in [({"late": "last:11"}, "late"), ({"x": [12]}, "x"), ({"bad": "sometimes"}, "bad"),
                      ({"e": "first:0"}, "e"), ({"bad name": "all"}, "bad name"),
                      ({"s": "0:12"}, "s"), ({"t": "12:"}, "t"), ({"u": "5:5"}, "u")]:
        with pytest.raises(ValueError, match=msg):
            resolve_windows(spec, 10)
    with pytest.raises(ValueError, match="zero checkpoints"):
        resolve_windows({"all": "all"}, 0)


def test_target_errors_name_the_targets():
    """An empty or unknown target list is an error listing the real target names (the message is
    formatted, not a literal ``{TARGETS}``)."""
    from vog_ray.core.options import TARGETS

    spec = {"name": "mlp", "in_features": 4, "hidden": [3], "num_classes": 2}
    sds = random_state_dicts(spec, [1])
    for targets, start in (([], "no target given"), (["logits"], "unknown target 'logits'")):
        with pytest.raises(ValueError) as err:
            GradientEngine(build_model(spec), sds, windows={"all": [0]}, targets=targets)
        msg = str(err.value)
        assert msg.startswith(start) and "{" not in msg, msg
        assert all(repr(t) in msg for t in TARGETS), msg


@pytest.mark.parametrize("spec, K", [({"a": [0, 0, 0]}, 3), ({"a": "first:1"}, 5), ({"a": "0:1"}, 5),
                                     ({"a": "last:1"}, 5), ({"all": "all"}, 1), ({"a": [2, -1]}, 3)])
def test_a_window_of_one_checkpoint_is_refused(spec, K):
    """VoG over one checkpoint is 0 for every example (the std of one value): such a window would
    rank every split in id order. Duplicates count once ([0, 0, 0] is one checkpoint)."""
    name = next(iter(spec))
    with pytest.raises(ValueError, match=rf"window '{name}' = .* covers 1 checkpoint .*at least 2 distinct"):
        resolve_windows(spec, K)
    assert resolve_windows({"a": [0, 1]}, 2) == {"a": [0, 1]}
