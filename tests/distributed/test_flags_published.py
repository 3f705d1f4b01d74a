"""The ``flags`` section in a published run (real Ray audit, tests/explorerun.py): the ``flagged``
column of every split follows its rule, recomputed here from the ranks, scores, labels and
predictions; ``flagged.parquet`` holds exactly the flagged rows; the manifest records the rules
and counts. And the same column from the single-process ``vog_ray.score(flags=...)``."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from vog_ray.runs import open_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_flagged_column_follows_the_rules(explore_run):
    run = open_run(explore_run.url)
    t = run.scores().to_pandas()
    for split, rule in (("train", {"top": 10, "mismatch": False}), ("test", {"top": 20, "mismatch": True})):
        part = t[t.split == split]
        n = len(part)
        want = part["rank"] <= n * rule["top"] // 100
        if rule["mismatch"]:
            want &= (part.label >= 0) & (part.label != part.pred)
        assert (part.flagged == want).all(), split
        assert run.manifest["flags"]["flagged_by_split"][split] == int(want.sum())
    assert run.manifest["flags"]["rules"]["test"] == {"top_percent": 20, "z_above": None, "label_mismatch": True}
    assert run.manifest["flags"]["ground_truth"] == "is_noisy"
    flagged = pq.read_table(run.path("flagged.parquet")).to_pandas()
    assert sorted(zip(flagged.split, flagged.id)) == sorted(zip(t[t.flagged].split, t[t.flagged].id))
    assert set(flagged.columns) == set(t.columns)


def test_single_process_flags(tmp_path):
    import runfactory as rf
    from vog_ray import score

    d = rf.digits_data()
    ckpts = rf.train_checkpoints(str(tmp_path / "ck"), d["x_train"][:300], d["y_train"][:300], epochs=6,
                                 num_checkpoints=3)
    t = score(rf.to_input(d["x_test"][:200]), d["y_test"][:200], model=rf.MODEL, checkpoints=ckpts,
              device="cpu", flags={"top_percent": 5, "z_above": 0.5}).to_pandas()
    want = (t["rank"] <= 10) & (t.score > 0.5)
    assert want.sum() > 0 and (t.flagged == want).all()
    assert np.array_equal(np.sort(t[t.flagged]["rank"]), np.arange(1, want.sum() + 1))


def test_flags_do_not_change_the_stage1_work_key():
    """Adding or changing flags re-publishes from the same stage-1 work (nothing is re-scored)."""
    from vog_ray.config import validate
    from vog_ray.distributed.stage import work_key
    from vog_ray.models.checkpoints import CheckpointInfo

    base = {"data": {"splits": {"train": {"format": "npz", "url": "x.npz", "keep_columns": ["is_noisy"]}}},
            "model": "lenet", "checkpoints": "c", "output": {"url": "o"}}
    ck = [CheckpointInfo("c0", 1, "a" * 64)]
    inputs = {"train": {"sha256": "b" * 64}}
    keys = {work_key(validate({**base, **extra}), ck, inputs) for extra in (
        {}, {"flags": {"top_percent": 5}}, {"flags": {"z_above": 2.0, "ground_truth": "is_noisy"}})}
    assert len(keys) == 1
    assert work_key(validate({**base, "vog": {"targets": ["softmax"]}}), ck, inputs) not in keys
