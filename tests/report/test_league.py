"""Signal league tables: AUROC / AUPR against hand computations and scikit-learn, the bootstrap
against a naive resampling loop, the orientation of every signal on a published run, and the
OoD table's z against the in-distribution split (and a run normalised against a reference
split) against a naive float64 computation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

import runfactory as rf
from vog_ray.report import build_report
from vog_ray.report.league import _bootstrap, league_table, weighted_auroc_aupr


@pytest.fixture(autouse=True)
def _no_tiles(monkeypatch):
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", None)   # image grids: the HTML test's business


def _rng(name):
    return np.random.default_rng(0)


def test_league_by_hand():
    positive = np.array([False, False, True, True])
    scores = {
        "a": (np.array([0.1, 0.4, 0.35, 0.8]), "a"),      # 3 of 4 (pos, neg) pairs right: 0.75
        "minus_a": (-np.array([0.1, 0.4, 0.35, 0.8]), "-a"),  # 0.25
        "ties": (np.array([0.5, 0.5, 0.5, 0.9]), "t"),    # (0.5 vs 0.5) twice counts 1, 0.9 wins 2: 0.75
        "one_nan": (np.array([np.nan, 0.1, 0.2, 0.3]), "n"),  # the NaN row left out: 1.0
    }
    t = league_table(positive, scores, 0, _rng)
    assert [r["signal"] for r in t["table"]] == ["one_nan", "a", "ties", "minus_a"]
    got = {r["signal"]: r for r in t["table"]}
    assert got["a"]["auroc"] == 0.75 and got["minus_a"]["auroc"] == 0.25 and got["ties"]["auroc"] == 0.75
    assert got["one_nan"]["auroc"] == 1.0 and got["one_nan"]["n_dropped_non_finite"] == 1
    # AUPR of a: from the top 0.8 (pos, precision 1 at recall 1/2), 0.4 (neg), 0.35 (pos, 2/3 at recall 1)
    assert got["a"]["aupr"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert got["a"]["aupr_base_rate"] == 0.5 and [r["place"] for r in t["table"]] == [1, 2, 3, 4]
    assert got["a"]["auroc_ci"] is None and t["resamples"] == 0


def test_weighted_metrics_equal_sklearn_with_sample_weight():
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)            # many ties
    w = rng.integers(0, 4, size=(6, 300))
    a, p = weighted_auroc_aupr(y, s, w)
    for b in range(6):
        assert a[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
        assert p[b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]), abs=1e-12)


def test_bootstrap_equals_a_naive_resampling_loop():
    """The same stratified draws, each resample scored by scikit-learn on the resampled rows."""
    rng = np.random.default_rng(2)
    y = rng.random(120) < 0.25
    s = np.round(rng.normal(size=120) + y, 1)
    B = 40
    a, p = _bootstrap(y, s, B, np.random.default_rng(7))
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    r = np.random.default_rng(7)
    d1 = r.integers(0, len(pos), size=(B, len(pos)))
    d0 = r.integers(0, len(neg), size=(B, len(neg)))
    for b in range(B):
        idx = np.r_[pos[d1[b]], neg[d0[b]]]
        assert a[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
        assert p[b] == pytest.approx(average_precision_score(y[idx], s[idx]), abs=1e-12)


def test_flag_league_of_a_published_run(tmp_path):
    """Every row of the league is scikit-learn on the signal oriented as stated, best first."""
    rng = np.random.default_rng(3)
    n, K = 60, 3
    label = np.arange(n) % 3
    flag = rng.random(n) < 0.3
    vog = rng.gamma(2.0, size=n) + flag
    margin = rng.normal(size=(n, K)) - 0.8 * flag[:, None]
    el2n = rng.random((n, K)) + 0.3 * flag[:, None] * np.array([0, 1, 1])   # late checkpoints only
    url = rf.synthetic_run(str(tmp_path), {"train": {"label": label, "vog_late_logit": vog, "vog_early_logit": -vog,
                                                     "is_noisy": flag, "sig_margin": margin, "sig_el2n": el2n}},
                           windows={"early": [0], "late": [1, 2]}, report={"flag_columns": ["is_noisy"],
                                                                          "bootstrap": 100})
    rep = build_report(url)
    t = rep["signals"]["flags"]["is_noisy"]["train"]
    got = {r["signal"]: r for r in t["table"]}
    assert t["n"] == n and t["n_positive"] == int(flag.sum()) and t["resamples"] == 100
    want = {"vog_late_logit": vog, "vog_early_logit": -vog, "aum": -margin.mean(axis=1), "margin": -margin[:, -1],
            "el2n_late": el2n[:, 1:].mean(axis=1), "el2n_early": el2n[:, 0], "el2n": el2n[:, -1]}
    for name, v in want.items():
        assert got[name]["auroc"] == pytest.approx(roc_auc_score(flag, v), abs=1e-6), name
        assert got[name]["aupr"] == pytest.approx(average_precision_score(flag, v), abs=1e-6), name
        lo, hi = got[name]["auroc_ci"]
        assert 0 <= lo <= hi <= 1
    assert "negated" in got["aum"]["orientation"] and "AUM" in got["aum"]["orientation"]
    assert "window 'late'" in got["el2n_late"]["orientation"]
    aurocs = [r["auroc"] for r in t["table"] if r["auroc"] is not None]
    assert aurocs == sorted(aurocs, reverse=True)
    # deterministic: the same report twice gives the same intervals
    assert build_report(url)["signals"]["flags"]["is_noisy"]["train"] == t


def _naive_z(v_ref, c_ref, v, c):
    """(v - mean of the reference class) / its population std, in float64 one row at a time;
    NaN for a class the reference lacks."""
    out = []
    for x, k in zip(v, c):
        members = [float(a) for a, b in zip(v_ref, c_ref) if b == k]
        if not members:
            out.append(np.nan)
            continue
        m = sum(members) / len(members)
        sd = (sum((a - m) ** 2 for a in members) / len(members)) ** 0.5
        out.append((float(x) - m) / sd)
    return np.array(out)


ROWS = {
    "test": {"label": [0, 1, 2] * 4, "vog_late_logit": np.linspace(1.0, 3.0, 12) ** 1.5},
    "ood": {"label": [0, 1, 3, 0, 1, 3], "vog_late_logit": [0.5, 4.0, 2.0, 3.5, 1.0, 6.0]},   # class 3: not in test
}


def test_ood_z_against_the_in_distribution_split_is_naive_float64(tmp_path):
    url = rf.synthetic_run(str(tmp_path), ROWS, report={"ood": {"in_distribution": "test", "ood_splits": ["ood"]}})
    rep = build_report(url)
    o = rep["ood"]
    t, d = ROWS["test"], ROWS["ood"]
    z_in = _naive_z(t["vog_late_logit"], t["label"], t["vog_late_logit"], t["label"])
    z_ood = _naive_z(t["vog_late_logit"], t["label"], d["vog_late_logit"], d["label"])
    ok = np.isfinite(z_ood)                                # class 3 has no reference: left out
    y = np.r_[np.zeros(12), np.ones(int(ok.sum()))]
    for name, f in (("z_vs_test_late_logit", lambda z: z), ("abs_z_vs_test_late_logit", np.abs)):
        m = o["groups"]["ood"][name]
        assert m["auroc"] == pytest.approx(roc_auc_score(y, f(np.r_[z_in, z_ood[ok]])), abs=1e-12)
        assert m["n_dropped_non_finite"] == 2
    assert "against the class moments of split 'test'" in o["scores"]["z_vs_test_late_logit"]
    assert "per class within each split" in o["scores"]["z_late_logit"]
    assert any("z_vs_test_*" in w for w in rep["warnings"])
    paper = o["groups"]["ood"]["vog_late_logit"]["aupr_out_paper"]
    raw = np.r_[t["vog_late_logit"], d["vog_late_logit"]]
    assert paper == pytest.approx(average_precision_score(np.r_[np.zeros(12), np.ones(6)], -raw))


def test_run_normalised_against_a_reference_split(tmp_path):
    """The stored z is the reference-normalised one; the rows of a class the reference lacks are
    unranked, left out of the report and said so; the OoD table adds the per-split z."""
    url = rf.synthetic_run(str(tmp_path), ROWS, normalize_against="test",
                           report={"ood": {"in_distribution": "test", "ood_splits": ["ood"]}})
    from vog_ray.runs import open_run

    scores = open_run(url).scores().to_pandas().set_index("id")
    t, d = ROWS["test"], ROWS["ood"]
    z_ood = _naive_z(t["vog_late_logit"], t["label"], d["vog_late_logit"], d["label"])
    got = scores.loc[[f"ood-{i:04d}" for i in range(6)]]
    np.testing.assert_allclose(got["z_late_logit"].to_numpy(), z_ood, rtol=1e-12, atol=1e-12)
    assert got["rank"].isna().tolist() == [False, False, True, False, False, True]
    assert sorted(got["rank"].dropna().astype(int)) == [1, 2, 3, 4]
    rep = build_report(url)
    assert rep["summary"]["normalize_against"] == "test"
    assert rep["summary"]["rows_without_reference"] == {"ood": {"3": 2}}
    assert any("2 rows belong to classes" in w for w in rep["warnings"])
    assert rep["summary"]["splits"]["ood"]["rows_in_report"] == 4
    o = rep["ood"]
    assert "z_own_late_logit" in o["scores"] and "z_vs_test_late_logit" not in o["scores"]
    assert "vog.normalize_against" in o["scores"]["z_late_logit"]
    assert rep["findings"][0]["key"] == "summary.normalize_against"
