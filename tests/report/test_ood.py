"""OoD evaluation (paper Table 1 layout): metrics checked against numbers computed by hand,
score orientation (energy sign!), groups, bad input, and a real predicted-label digits run."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

import runfactory as rf
from vog_ray.report import ReportError, build_report, fpr_at_tpr, ood_metrics


@pytest.fixture(autouse=True)
def _no_tiles(monkeypatch):
    # image grids are the HTML test's business; here they are skipped (with a warning)
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", None)


# ---------------------------------------------------------------- metrics by hand

def test_metrics_by_hand():
    # ID 0.1 .. 0.5, OoD 0.45 0.6 0.7 (higher = more OoD)
    m = ood_metrics([0.1, 0.2, 0.3, 0.4, 0.5], [0.45, 0.6, 0.7])
    # AUROC: 0.45 beats 4 of 5 ID, 0.6 and 0.7 beat all 5 -> 14 / 15
    assert m["auroc"] == pytest.approx(14 / 15)
    # AUPR-Out (OoD positive), ranked by score: O O I O -> precisions at hits 1, 1, 3/4
    assert m["aupr_out"] == pytest.approx((1 + 1 + 0.75) / 3)
    # AUPR-In (ID positive, score negated), ranked ascending: I I I I O I -> 1,1,1,1,5/6
    assert m["aupr_in"] == pytest.approx((4 + 5 / 6) / 5)
    # FPR@95: all 3 OoD must be flagged -> threshold 0.45 -> ID >= 0.45: {0.5} -> 1/5
    assert m["fpr_at_95_tpr"] == pytest.approx(0.2)
    assert m["n_in"] == 5 and m["n_ood"] == 3


def test_metrics_with_ties_by_hand():
    m = ood_metrics([0.0, 1.0], [1.0, 2.0])
    assert m["auroc"] == pytest.approx(3.5 / 4)           # the tie counts one half
    assert m["aupr_out"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert m["aupr_in"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert m["fpr_at_95_tpr"] == pytest.approx(0.5)


def test_fpr_at_exactly_95_percent():
    # 20 OoD at 1..20: threshold 2 flags 19/20 = 95% exactly; ID >= 2: 2.5, 10.5, 30 -> 3/5
    y = np.r_[np.zeros(5), np.ones(20)]
    s = np.r_[[0.5, 1.5, 2.5, 10.5, 30.0], np.arange(1.0, 21.0)]
    assert fpr_at_tpr(y, s, 0.95) == pytest.approx(0.6)
    m = ood_metrics(s[:5], s[5:])
    assert m["fpr_at_95_tpr"] == pytest.approx(0.6)


def test_non_finite_scores_are_left_out():
    m = ood_metrics([0.1, np.nan, 0.2], [0.9, np.inf])
    assert m["n_in"] == 2 and m["n_ood"] == 1 and m["n_dropped_non_finite"] == 2
    assert m["auroc"] == 1.0


# ---------------------------------------------------------------- orientation on a run

def _signals(logits: np.ndarray, K: int = 3) -> dict[str, np.ndarray]:
    """Per-checkpoint signals of fixed logits, computed the way the engine does."""
    lg = np.asarray(logits, np.float64)
    lse = np.log(np.exp(lg).sum(axis=1))
    prob = np.exp(lg - lse[:, None])
    p = lg.argmax(axis=1)
    rep = lambda v: np.repeat(np.asarray(v, np.float64)[:, None], K, axis=1)  # noqa: E731
    other = np.where(np.eye(lg.shape[1], dtype=bool)[p], -np.inf, lg).max(axis=1)
    return {"pred": p, "sig_max_prob": rep(prob.max(axis=1)), "sig_max_logit": rep(lg.max(axis=1)),
            "sig_energy": rep(-lse), "sig_label_prob": rep(prob.max(axis=1)),
            "sig_label_logit": rep(lg.max(axis=1)), "sig_loss": rep(-np.log(prob.max(axis=1))),
            "sig_margin": rep(lg.max(axis=1) - other)}


def test_orientation_of_baselines(tmp_path):
    """Confident in-distribution logits vs flat OoD logits: every baseline must give AUROC 1
    (0 would mean a flipped sign)."""
    id_logits = np.array([[10.0, 0, 0], [0, 8, 1], [7, 0, 0.5], [0, 0.5, 9]])
    ood_logits = np.array([[1.0, 1, 1], [2, 1.5, 1], [0.5, 0.4, 0.6]])
    # energy = -logsumexp: ID ~ -10, OoD ~ -2.1 -> higher energy = more OoD
    assert (-np.log(np.exp(ood_logits).sum(1))).min() > (-np.log(np.exp(id_logits).sum(1))).max()
    si, so = _signals(id_logits), _signals(ood_logits)
    rows = {
        "test": {"label": [-1] * 4, "vog_late_logit": [0.1, 0.2, 0.3, 0.4], **si},
        "ood": {"label": [-1] * 3, "vog_late_logit": [0.5, 0.6, 0.7], **so},
    }
    url = rf.synthetic_run(str(tmp_path), rows, label_mode="predicted",
                           report={"ood": {"in_distribution": "test", "ood_splits": ["ood"]}})
    r = build_report(url)
    o = r["ood"]
    assert o["group_names"] == ["ood"] and o["n_in"] == 4 and o["n_ood"] == {"ood": 3}
    g = o["groups"]["ood"]
    for name in ("max_softmax", "max_logit", "energy", "loss", "label_prob", "label_logit", "margin",
                 "vog_late_logit"):
        assert g[name]["auroc"] == 1.0, name
        assert g[name]["fpr_at_95_tpr"] == 0.0 and g[name]["aupr_out"] == 1.0 and g[name]["aupr_in"] == 1.0
    assert "z_late_logit" in g
    assert "energy as stored" in o["scores"]["energy"] and "negated" in o["scores"]["max_softmax"]
    assert o["summary"]["energy"]["auroc"]["mean"] == 1.0 and o["summary"]["energy"]["auroc"]["std"] is None
    assert not any("label_mode" in w for w in r["warnings"])


def test_group_column_and_mean_std_by_hand(tmp_path):
    rows = {
        "test": {"label": [0, 1, 0, 1], "vog_late_logit": [1.0, 2.0, 3.0, 4.0]},
        "mixed": {"label": [0, 1, 0, 1, 0, 1], "vog_late_logit": [2.5, 5.0, 6.0, 5.0, 6.0, 7.0],
                  "corruption": ["blur", "blur", "blur", "noise", "noise", "noise"]},
    }
    url = rf.synthetic_run(str(tmp_path), rows, report={
        "ood": {"in_distribution": "test", "ood_splits": ["mixed"], "group_column": "corruption"}})
    r = build_report(url)
    o = r["ood"]
    assert o["group_names"] == ["blur", "noise"]
    # blur: 2.5 beats 1, 2 (2 of 4); 5 and 6 beat all 4 -> 10/12; noise: all beat all -> 1
    assert o["groups"]["blur"]["vog_late_logit"]["auroc"] == pytest.approx(10 / 12)
    assert o["groups"]["noise"]["vog_late_logit"]["auroc"] == 1.0
    s = o["summary"]["vog_late_logit"]["auroc"]
    assert s["mean"] == pytest.approx((10 / 12 + 1) / 2)
    assert s["std"] == pytest.approx((1 - 10 / 12) / math.sqrt(2))   # sample std (ddof = 1)
    # true labels on an OoD audit: said plainly
    assert any("label_mode" in w for w in r["warnings"])


def test_split_group_names_merge_splits(tmp_path):
    rows = {
        "test": {"label": [0, 1, 0, 1], "vog_late_logit": [1.0, 2.0, 3.0, 4.0]},
        "noise_a": {"label": [0, 1], "vog_late_logit": [5.0, 6.0]},
        "noise_b": {"label": [0, 1], "vog_late_logit": [0.0, 7.0]},
        "blur": {"label": [0, 1], "vog_late_logit": [0.5, 0.6]},
    }
    url = rf.synthetic_run(str(tmp_path), rows, split_specs={"noise_a": {"group": "noise"},
                                                               "noise_b": {"group": "noise"}},
                           report={"ood": {"in_distribution": "test",
                                           "ood_splits": ["noise_a", "noise_b", "blur"]}})
    o = build_report(url)["ood"]
    assert o["group_names"] == ["noise", "blur"] and o["n_ood"] == {"noise": 4, "blur": 2}
    # noise: 5, 6, 7 beat all 4 ID (12); 0 beats none -> 12/16
    assert o["groups"]["noise"]["vog_late_logit"]["auroc"] == pytest.approx(12 / 16)
    assert o["groups"]["blur"]["vog_late_logit"]["auroc"] == 0.0


def test_missing_ood_split_is_an_error(tmp_path):
    rows = {"test": {"label": [0, 1, 0, 1], "vog_late_logit": [1.0, 2.0, 3.0, 4.0]}}
    url = rf.synthetic_run(str(tmp_path), rows,
                           report={"ood": {"in_distribution": "test", "ood_splits": ["ood_rotate"]}})
    with pytest.raises(ReportError, match="ood_rotate"):
        build_report(url)
    assert not os.path.exists(os.path.join(url, "report.json"))
    with pytest.raises(ReportError, match="'val'"):
        build_report(url, spec={"ood": {"in_distribution": "val", "ood_splits": ["test"]}})
    with pytest.raises(ReportError, match="ood_splits and/or group_column"):
        build_report(url, spec={"ood": {"in_distribution": "test"}})
    with pytest.raises(ReportError, match="group column 'corr'"):
        build_report(url, spec={"ood": {"in_distribution": "test", "ood_splits": [], "group_column": "corr"}})


# ---------------------------------------------------------------- a real predicted-label run

def test_digits_ood_run(tmp_path):
    url = rf.digits_run(str(tmp_path), label_mode="predicted", ood=True, targets=("softmax",),
                        report={"bootstrap": 0,
                                "ood": {"in_distribution": "test", "ood_splits": ["ood_noise", "ood_invert"]}})
    r = build_report(url)
    o = r["ood"]
    assert o["group_names"] == ["ood_noise", "ood_invert"]
    assert o["n_in"] == 497 and o["n_ood"] == {"ood_noise": 497, "ood_invert": 497}
    names = set(o["summary"])
    assert {"vog_late_softmax", "z_late_softmax", "vog_early_softmax", "max_softmax", "max_logit",
            "energy"} <= names
    for g in o["group_names"]:
        for n in names:
            for met in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"):
                assert 0.0 <= o["groups"][g][n][met] <= 1.0
    for n in names:
        v = [o["groups"][g][n]["auroc"] for g in o["group_names"]]
        assert o["summary"][n]["auroc"]["mean"] == pytest.approx(np.mean(v))
        assert o["summary"][n]["auroc"]["std"] == pytest.approx(np.std(v, ddof=1))
    # the OoD splits have no labels: no error analysis there, said so
    assert r["error_by_vog"]["ood_noise"]["keys"] == {}
    assert "no labels" in r["error_by_vog"]["ood_noise"]["note"]
    assert not any("label_mode" in w for w in r["warnings"])
