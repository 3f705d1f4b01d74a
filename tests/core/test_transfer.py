"""Overlapped host-to-device transfers, exercised on the CPU: the stager's copies are the batch's own
float32 tensors (never views of Ray's read-only buffers), batch i+1 is staged in the background
thread before the caller gets batch i, and ``GradientEngine.run_batches`` gives what ``run`` gives
batch by batch, to the bit. The CUDA side (pinned buffers, side stream, events) runs in
bench/gpu.py, which times it against plain copies on a GPU."""

from __future__ import annotations

import threading

import numpy as np
import torch

from vog_ray.core.engine import BatchResult, GradientEngine
from vog_ray.core.transfer import Stager
from vog_ray.models import build_model


def test_stage_makes_an_own_float32_tensor():
    src = np.arange(12, dtype=np.float64).reshape(3, 4)
    src.setflags(write=False)  # Ray's batches are read-only
    t = Stager(torch.device("cpu")).stage(src).tensor()
    assert t.dtype == torch.float32 and t.shape == (3, 4)
    assert np.array_equal(t.numpy(), src.astype(np.float32))
    t[0, 0] = -1  # its own memory: the source is untouched
    assert src[0, 0] == 0
    dev = torch.ones(2, 2)
    assert Stager(torch.device("cpu")).stage(dev).tensor() is dev  # already on the device


class RecordingStager(Stager):
    def __init__(self, log):
        super().__init__(torch.device("cpu"))
        self.log = log

    def stage(self, x):
        out = super().stage(x)
        self.log.append(("stage", int(x[0, 0]), threading.current_thread().name))
        return out


def test_prefetch_stages_the_next_batch_before_the_caller_works_on_this_one():
    log = []

    def batches():
        for i in range(4):
            log.append(("pull", i))
            yield np.full((2, 3), i, np.float32), i

    s = RecordingStager(log)
    for staged, y in s.prefetch(batches()):
        log.append(("use", y))
        assert staged.tensor()[0, 0] == y
    s.close()
    pos = {e[:2]: i for i, e in enumerate(log)}
    for b in range(3):  # batch b+1 is pulled and handed to the stager before batch b is used
        assert pos[("pull", b + 1)] < pos[("use", b)]
    assert pos[("use", 3)] > pos[("pull", 3)]
    # every staging ran in the stager's thread, not in the caller's
    assert {e[2] for e in log if e[0] == "stage"} == {"vog-stager_0"}
    assert [e[1] for e in log if e[0] == "use"] == [0, 1, 2, 3]


def test_run_batches_equals_run_batch_by_batch():
    sds = []
    for s in (1, 2, 3):
        torch.manual_seed(s)
        sds.append(build_model("lenet").state_dict())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 50)
    eng = GradientEngine(build_model("lenet"), sds, windows={"all": [0, 1, 2], "late": [1, 2]},
                         targets=["logit", "softmax"])
    parts = [(x[a:a + 16], y[a:a + 16]) for a in range(0, 50, 16)]
    one_by_one = BatchResult.concat([eng.run(b, c, emit="both") for b, c in parts])
    overlapped = BatchResult.concat(list(eng.run_batches(parts, emit="both")))
    for k in one_by_one.vog:
        assert np.array_equal(one_by_one.vog[k], overlapped.vog[k])
        assert np.array_equal(one_by_one.moments[k].m2, overlapped.moments[k].m2)
    for s in one_by_one.signals:
        assert np.array_equal(one_by_one.signals[s], overlapped.signals[s])
    assert len(overlapped.status) == 50
