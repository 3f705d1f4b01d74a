"""compare_runs: rank agreement of two runs, joined by (split, id), with expected numbers by hand."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import runfactory as rf
from vog_ray.report import ReportError, compare_runs


def _run(root, vog, *, ids=None, run_id="a", extra_splits=None, windows=None, extra_keys=None):
    rows = {"train": {"label": [0] * len(vog), "vog_late_logit": vog}}
    if ids is not None:
        rows["train"]["id"] = ids
    for k, v in (extra_keys or {}).items():
        rows["train"][f"vog_{k}"] = v
    rows.update(extra_splits or {})
    return rf.synthetic_run(str(root), rows, run_id=run_id, windows=windows)


def test_identical_and_reversed_by_hand(tmp_path):
    v = np.arange(100.0)
    a = _run(tmp_path / "a", v)
    same = compare_runs(a, _run(tmp_path / "b", v.copy()))
    d = same["splits"]["train"]["keys"]["late_logit"]
    assert d["spearman"] == pytest.approx(1) and d["kendall"] == pytest.approx(1)
    assert d["top_1pct"] == {"k": 1, "overlap": 1.0, "shared": 1}
    assert d["top_10pct"] == {"k": 10, "overlap": 1.0, "shared": 10}
    assert d["mean_abs_dz"] == pytest.approx(0)

    rev = compare_runs(a, _run(tmp_path / "c", 100.0 - v))
    d = rev["splits"]["train"]["keys"]["late_logit"]
    assert d["spearman"] == pytest.approx(-1) and d["kendall"] == pytest.approx(-1)
    assert d["top_1pct"]["overlap"] == 0.0 and d["top_10pct"]["overlap"] == 0.0
    # z = (i - 49.5) / sqrt((n^2 - 1) / 12); mean |z| = 25 / that; z_B = -z_A
    assert d["mean_abs_dz"] == pytest.approx(50 / math.sqrt((100 ** 2 - 1) / 12))


def test_one_adjacent_swap_by_hand(tmp_path):
    v = np.arange(10.0)
    w = v.copy()
    w[[8, 9]] = w[[9, 8]]            # the two highest swap places
    res = compare_runs(_run(tmp_path / "a", v), _run(tmp_path / "b", w))
    d = res["splits"]["train"]["keys"]["late_logit"]
    assert d["kendall"] == pytest.approx(1 - 2 * 1 / 45)                 # one discordant pair of 45
    assert d["spearman"] == pytest.approx(1 - 6 * 2 / (10 * (10 ** 2 - 1)))
    assert d["top_10pct"] == {"k": 1, "overlap": 0.0, "shared": 0}
    assert d["mean_abs_dz"] == pytest.approx(2 * (1 / math.sqrt(99 / 12)) / 10)


def test_join_by_id_partial_overlap_and_output(tmp_path):
    n = 50
    ids_a = [f"x{i:03d}" for i in range(n)]
    ids_b = ids_a[5:] + ["y1", "y2"]           # 5 only in A, 2 only in B; B's rows in another order
    va = np.arange(float(n))
    vb = np.r_[va[5:], [3.0, 4.0]]
    perm = np.random.default_rng(0).permutation(len(ids_b))
    a = _run(tmp_path / "a", va, ids=ids_a, run_id="A", windows={"late": [1, 2], "early": [0, 1]},
             extra_keys={"early_logit": va[::-1].copy()},
             extra_splits={"test": {"label": [0, 1, 0, 1], "vog_late_logit": [1.0, 2.0, 3.0, 4.0],
                                    "vog_early_logit": [1.0, 2.0, 3.0, 4.0]}})
    b = _run(tmp_path / "b", vb[perm], ids=[ids_b[i] for i in perm], run_id="B")
    out = str(tmp_path / "cmp" / "compare.json")
    res = compare_runs(a, b, out=out)
    e = res["splits"]["train"]
    assert e["n_a"] == 50 and e["n_b"] == 47 and e["n_joined"] == 45
    assert e["only_in_a"] == 5 and e["only_in_b"] == 2
    assert res["keys"] == ["late_logit"] and res["keys_only_in_a"] == ["early_logit"]
    assert res["splits_only_in_a"] == ["test"] and "test" not in res["splits"]
    # joined by id, not by row position: the shared rows keep their order -> rho = 1
    assert e["keys"]["late_logit"]["spearman"] == pytest.approx(1.0)
    assert e["keys"]["late_logit"]["top_10pct"]["k"] == 5
    with open(out) as f:
        on_disk = json.load(f)
    assert on_disk["splits"] == res["splits"] and res["file"] == out
    text = res["text"]
    assert "spearman" in text and "late_logit" in text and "train" in text
    assert "keys only in a: early_logit" in text and "5 ids only in A" in text
    assert not [f for f in os.listdir(tmp_path / "cmp") if f.startswith(".tmp")]


def test_bad_input(tmp_path):
    a = _run(tmp_path / "a", np.arange(10.0))
    unpublished = rf.synthetic_run(str(tmp_path / "u"), {"train": {"label": [0] * 4, "vog_late_logit": [1, 2, 3, 4]}},
                                   published=False)
    with pytest.raises(ReportError, match="_SUCCESS"):
        compare_runs(a, unpublished)
    other = rf.synthetic_run(str(tmp_path / "o"), {"train": {"label": [0] * 4, "vog_early_logit": [1, 2, 3, 4]}},
                             windows={"early": [0, 1]})
    with pytest.raises(ReportError, match="share no VoG key"):
        compare_runs(a, other)
    disjoint = _run(tmp_path / "d", np.arange(10.0), ids=[f"q{i}" for i in range(10)])
    with pytest.raises(ReportError, match="share no example"):
        compare_runs(a, disjoint)


def test_two_trained_runs_agree_partly(tmp_path):
    """Two digits audits that differ only in the training seed: related, not identical."""
    a = rf.digits_run(str(tmp_path / "a"), noise=0.0, targets=("softmax",), epochs=30, ckpt_seed=0)
    b = rf.digits_run(str(tmp_path / "b"), noise=0.0, targets=("softmax",), epochs=30, ckpt_seed=1)
    res = compare_runs(a, b)
    for s in ("train", "test"):
        d = res["splits"][s]["keys"]["late_softmax"]
        assert res["splits"][s]["n_joined"] == res["splits"][s]["n_a"]
        assert 0.0 < d["spearman"] < 0.99 and abs(d["kendall"]) < abs(d["spearman"]) + 1e-9
        assert 0.0 <= d["top_10pct"]["overlap"] <= 1.0 and d["mean_abs_dz"] > 0
