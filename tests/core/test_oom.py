"""Out-of-memory-safe batches: a batch whose forward raises ``torch.cuda.OutOfMemoryError`` is split in
two and retried; the result equals the unsplit batch's bit for bit on the CPU with one torch thread
(the scorer actors' CPU layout) and parts of at least 4 examples. Below that, and with several
threads, MKL's matrix product takes another kernel or another split by the matrix's size (measured
on LeNet's first Linear layer: parts of 1-3 rows, or 2 threads, differ by 1e-7 on its outputs), so
the parts agree to float rounding only. The size that fits is logged and used for the batches after it; one example that does not fit is an error naming
``compute.batch_size`` and the model. The error is injected by a LeNet whose forward raises it
above a batch size (what CUDA does when the activations do not fit)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vog_ray.core.engine import DeviceMemoryError, GradientEngine
from vog_ray.models import build_model
from vog_ray.models.registry import LeNet


class LimitedLeNet(LeNet):
    """LeNet that runs out of "device memory" on batches larger than ``limit`` (class-wide, so the
    engine's copies share it); counts the refusals."""

    limit = 10**9
    refusals = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > LimitedLeNet.limit:
            LimitedLeNet.refusals += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} examples")
        return super().forward(x)


@pytest.fixture
def limited():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LimitedLeNet
    torch.set_num_threads(threads)
    LimitedLeNet.limit, LimitedLeNet.refusals = 10**9, 0


def sds(seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append({k: v.detach().clone() for k, v in build_model("lenet").state_dict().items()})
    return out


def assert_same(a, b):
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.target_label, b.target_label)
    np.testing.assert_array_equal(a.pred, b.pred)
    assert a.vog.keys() == b.vog.keys() and a.moments.keys() == b.moments.keys()
    for k in a.vog:
        assert np.array_equal(a.vog[k], b.vog[k], equal_nan=True), k
    for k in a.moments:
        assert a.moments[k].n == b.moments[k].n
        assert np.array_equal(a.moments[k].mean, b.moments[k].mean) and np.array_equal(a.moments[k].m2, b.moments[k].m2)
    for s in a.signals:
        assert np.array_equal(a.signals[s], b.signals[s]), s


@pytest.mark.parametrize("label_mode,stacked", [("true", False), ("predicted", False), ("true", True)])
def test_out_of_memory_splits_the_batch_bit_identically(limited, caplog, label_mode, stacked):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 28, 28)).astype(np.float32)
    x[25, 0, 3, 3] = np.nan  # a rejected row keeps its place and status through the split
    y = rng.integers(0, 10, 40)
    kw = dict(windows={"all": [0, 1, 2], "late": [1, 2]}, targets=["logit", "softmax"], label_mode=label_mode,
              stacked=stacked, name="limited-lenet")
    ckpts = sds([1, 2, 3])
    whole = GradientEngine(LimitedLeNet(), ckpts, **kw).run(x, y, emit="both")
    eng = GradientEngine(LimitedLeNet(), ckpts, **kw)
    eng.run(x[:1], y[:1])  # channels_last verified (one example) before the limit applies
    limited.limit = 12
    with caplog.at_level(logging.WARNING, logger="vog_ray"):
        split = eng.run(x, y, emit="both")
    assert_same(split, whole)
    # 40 -> 20 + 20 -> 10 + 10 + 10 + 10: parts of at most 10 from now on
    assert eng.max_rows == 10
    msgs = [r.getMessage() for r in caplog.records]
    assert any("out of cpu memory on a batch of 40 examples" in m for m in msgs)
    assert any("batches of 10 examples fit" in m and "compute.batch_size: 10" in m for m in msgs)
    refused = limited.refusals
    again = eng.run(x, y, emit="both")  # the next batch is split up front: no more refusals
    assert limited.refusals == refused
    assert_same(again, whole)


def test_tiny_parts_agree_to_float_rounding(limited):
    """Parts of 1-3 examples (MKL's small-matrix kernel): equal to float rounding, not to the bit."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 7)
    kw = dict(windows={"all": [0, 1, 2]}, targets=["logit", "softmax"])
    ckpts = sds([4, 5, 6])
    whole = GradientEngine(LimitedLeNet(), ckpts, **kw).run(x, y)
    limited.limit = 2
    split = GradientEngine(LimitedLeNet(), ckpts, **kw).run(x, y)
    for k in whole.vog:
        np.testing.assert_allclose(split.vog[k], whole.vog[k], rtol=1e-5)


def test_one_example_that_does_not_fit_is_a_clear_error(limited):
    eng = GradientEngine(LimitedLeNet(), sds([1, 2]), windows={"all": [0, 1]}, name="limited-lenet",
                         channels_last=False)
    limited.limit = 0
    x = np.zeros((3, 1, 28, 28), np.float32)
    with pytest.raises(DeviceMemoryError, match="compute.batch_size") as e:
        eng.run(x, [1, 2, 3])
    assert "limited-lenet" in str(e.value) and "(1, 28, 28)" in str(e.value)
    assert isinstance(e.value.__cause__, torch.cuda.OutOfMemoryError)
