"""The report's flags section: rules, counts, and precision and recall of the ``flagged`` column
against the ground-truth column, by hand; escaped in the page; absent for a run without flags."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import runfactory as rf
from vog_ray.report import build_report


def _run(tmp_path, flags: dict | None) -> str:
    #            rank by vog: 9 8 7 6 5 4 3 2 1 0 (row 0 lowest)
    rows = {"train": {"label": [0, 1] * 5, "vog_late_logit": np.arange(10.0),
                      "flagged": [False, False, False, False, False, False, True, True, True, True],
                      "is_noisy": [False, True, False, False, True, False, True, False, True, True]},
            "test": {"label": [0, 1] * 3, "vog_late_logit": np.arange(6.0),
                     "flagged": [False, False, False, False, True, True]}}
    url = rf.synthetic_run(str(tmp_path), rows, report={"bootstrap": 0, "heatmaps": False})
    if flags is not None:
        p = os.path.join(url, "manifest.json")
        with open(p) as f:
            man = json.load(f)
        man["flags"] = flags
        with open(p, "w") as f:
            json.dump(man, f)
    return url


def test_precision_and_recall_by_hand(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", None)
    rules = {"train": {"top_percent": 40, "z_above": None, "label_mismatch": False},
             "test": {"top_percent": 34, "z_above": None, "label_mismatch": False}}
    url = _run(tmp_path, {"rules": rules, "ground_truth": "is_noisy", "flagged_by_split": {"train": 4, "test": 2}})
    rep = build_report(url)
    fq = rep["flag_quality"]
    assert fq["ground_truth"] == "is_noisy"
    train = fq["splits"]["train"]
    # flagged rows 6..9; noisy rows 1, 4, 6, 8, 9 → TP = 6, 8, 9
    assert train["n"] == 10 and train["n_flagged"] == 4 and train["rule"] == rules["train"]
    pr = train["against_ground_truth"]
    assert (pr["n_true"], pr["true_positives"]) == (5, 3)
    assert pr["precision"] == pytest.approx(3 / 4) and pr["recall"] == pytest.approx(3 / 5)
    assert pr["base_rate"] == pytest.approx(5 / 10)
    # no ground truth in test (the column is missing there): counts only
    assert fq["splits"]["test"]["n_flagged"] == 2 and "against_ground_truth" not in fq["splits"]["test"]
    with open(os.path.join(url, "report.html"), encoding="utf-8") as f:
        html = f.read()
    assert "top 40%" in html and "0.750" in html and "0.600" in html


def test_run_without_flags(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", None)
    rep = build_report(_run(tmp_path, None))
    assert rep["flag_quality"] is None
    with open(os.path.join(rep["files"]["report_html"]), encoding="utf-8") as f:
        assert "No flags configured" in f.read()


def test_ground_truth_must_be_boolean(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", None)
    rows = {"train": {"label": [0, 1] * 3, "vog_late_logit": np.arange(6.0), "flagged": [False] * 4 + [True] * 2,
                      "note": ["yes", "no", "False", "True", "x", "y"]}}
    url = rf.synthetic_run(str(tmp_path), rows, report={"bootstrap": 0, "heatmaps": False})
    p = os.path.join(url, "manifest.json")
    with open(p) as f:
        man = json.load(f)
    man["flags"] = {"rules": {"train": {"top_percent": 34}}, "ground_truth": "note"}
    with open(p, "w") as f:
        json.dump(man, f)
    rep = build_report(url)
    assert "against_ground_truth" not in rep["flag_quality"]["splits"]["train"]
    assert any("not a boolean one" in w for w in rep["warnings"])
