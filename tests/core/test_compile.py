"""``compute.compile``: each checkpoint's forward through ``torch.compile`` (inductor, on the CPU here)
gives the eager engine's numbers to float rounding (fused kernels sum in another order), for both
targets and every window, through the input-gradient backward. Slow: inductor compiles for tens of
seconds on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vog_ray.core.engine import GradientEngine
from vog_ray.models import build_model

SPEC = {"name": "small_cnn", "size": 8, "width": 4, "num_classes": 10}


@pytest.mark.slow
def test_compiled_forward_gives_the_eager_numbers():
    sds = []
    for s in (1, 2, 3):
        torch.manual_seed(s)
        sds.append(build_model(SPEC).state_dict())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 24)
    kw = dict(windows={"all": [0, 1, 2], "late": [1, 2]}, targets=["logit", "softmax"])
    eager = GradientEngine(build_model(SPEC), sds, **kw).run(x, y)
    eng = GradientEngine(build_model(SPEC), sds, compile=True, **kw)
    assert eng.compiled and eng._use_stacked is False
    comp = eng.run(x, y)
    for k in eager.vog:
        np.testing.assert_allclose(comp.vog[k], eager.vog[k], rtol=1e-5)
    np.testing.assert_allclose(comp.signals["label_logit"], eager.signals["label_logit"], rtol=1e-5, atol=1e-6)
    # the checkpoints' weights stay their own (one compiled code, K parameter sets)
    assert not np.array_equal(comp.signals["label_logit"][:, 0], comp.signals["label_logit"][:, 1])
    again = eng.run(x[:10], y[:10])  # another batch size: recompiled or dynamic, the same numbers
    for k in eager.vog:
        np.testing.assert_allclose(again.vog[k], eager.vog[k][:10], rtol=1e-5)
    with pytest.raises(ValueError, match="stacked"):
        GradientEngine(build_model(SPEC), sds, compile=True, stacked=True, **kw)
