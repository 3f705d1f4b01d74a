"""The scorer actor (called directly, no Ray) keeps carried columns exactly: Arrow in, Arrow out —
a nullable int64 above 2**53 keeps its type and every value, with nulls anywhere (also only in
the last rows of a batch, which a numpy batch turned into "Integer value … not in range"), in
scored and in rejected rows alike; a row whose VoG is not finite is rejected with its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from vog_ray.distributed.scorer import ScorerActor
from vog_ray.models import build_model

BIG = 2 ** 53 + 1


def _batch(n: int, carried: dict[str, pa.Array]) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    rng = np.random.default_rng(0)
    status = ["ok"] * n
    status[2] = "decode_error: broken"  # a rejected row carries its values too
    return pa.table({"id": [f"r{i}" for i in range(n)], "split": ["train"] * n,
                     "label": pa.array(rng.integers(0, 10, n), pa.int64()), **carried, "status": status,
                     "x": ArrowTensorArray.from_numpy(rng.random((n, 1, 28, 28)).astype(np.float32))})


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    urls = []
    for i in range(3):
        torch.save(build_model("lenet").state_dict(), d / f"c_{i}.pt")
        urls.append(str(d / f"c_{i}.pt"))
    return ScorerActor(model="lenet", checkpoints=urls, indices=[0, 1, 2], num_checkpoints=3,
                       vog={"windows": {"all": "all"}, "targets": ["logit"]}, device="cpu", storage={}, threads=1)


@pytest.mark.parametrize("nulls", ["every 3rd", "last rows only", "none", "all"])
def test_carried_int64_above_2_53_round_trips_exactly(scorer, nulls):
    n = 9
    null = {"every 3rd": lambda i: i % 3 == 0, "last rows only": lambda i: i >= n - 2,
            "none": lambda i: False, "all": lambda i: True}[nulls]
    big = pa.array([None if null(i) else BIG + 2 * i for i in range(n)], pa.int64())
    lst = pa.array([[i, BIG] if i % 2 else None for i in range(n)], pa.list_(pa.int64()))
    out = scorer(_batch(n, {"big": big, "lst": lst}))
    assert out.schema.field("big").type == pa.int64() and out.schema.field("lst").type == pa.list_(pa.int64())
    got = dict(zip(out["id"].to_pylist(), out["big"].to_pylist()))
    assert got == {f"r{i}": v for i, v in enumerate(big.to_pylist())}
    assert dict(zip(out["id"].to_pylist(), out["lst"].to_pylist())) == \
        {f"r{i}": v for i, v in enumerate(lst.to_pylist())}
    status = dict(zip(out["id"].to_pylist(), out["status"].to_pylist()))
    assert status["r2"] == "decode_error: broken" and sum(s == "ok" for s in status.values()) == n - 1


def test_non_finite_vog_becomes_a_rejected_row():
    from vog_ray.core.table import non_finite_status

    vog = {"all_logit": np.array([0.1, np.nan, np.inf, 0.2]), "all_softmax": np.array([0.1, 0.1, 0.1, -np.inf])}
    status = ["ok", "ok", "decode_error: x", "ok"]
    assert non_finite_status(status, vog, ["all_logit", "all_softmax"]) == [
        "ok", "non_finite_vog: all_logit", "decode_error: x", "non_finite_vog: all_softmax"]
