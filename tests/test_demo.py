"""A reduced `make demo`, end to end: real MNIST, shuffled labels, MNIST-C OoD, local Ray.

Asserts the paper's qualitative results (Agarwal et al. 2022, §4.1 and Fig. 4) on what the demo
prints: shuffled (memorised) training examples have higher z-VoG than clean ones (Welch's
t-test, p < 0.01, late window), and the test error in the top VoG decile exceeds the error in
the bottom decile. Sizes are reduced so this runs in CI; `make demo` runs the full version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]


def test_reduced_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "vog_ray.demo", "--out", str(out), "--n-train", "800", "--n-test", "300",
           "--n-ood", "40", "--max-epochs", "30", "--corruptions", "rotate", "fog"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**__import__("os").environ, "RAY_ADDRESS": ""})
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # what a newcomer sees
    for needle in ("rows:", "Findings:", "[flags.is_noisy.train.late_softmax]", "Welch t-test", "top decile",
                   "OoD (test vs each group", "Signal league, finding is_noisy in train", "report: ", "config: ",
                   "flags (top 10% VoG) vs shuffled labels, train:"):
        assert needle in proc.stdout, needle
    # it ends with the command that opens the run in the explorer
    last = [ln for ln in proc.stdout.strip().splitlines() if "vog-ray explore" in ln]
    assert last and last[0].split("vog-ray explore ", 1)[1].strip() in proc.stdout.split("report: ", 1)[1]
    run_url = proc.stdout.split("report: ", 1)[1].split()[0].rsplit("/report.html", 1)[0]
    rep = json.loads(Path(run_url, "report.json").read_text())
    man = json.loads(Path(run_url, "manifest.json").read_text())
    assert man["rows"]["in"] == man["rows"]["scored"] + man["rows"]["rejected"] == 800 + 300 + 2 * 40

    # memorisation: shuffled labels have higher z-VoG (late window)
    flags = rep["flags"]["is_noisy"]["train"]
    late = {k: v for k, v in flags.items() if k.startswith("late_")}
    best = min(late.values(), key=lambda r: r["p"] if r["t"] and r["t"] > 0 else 1.0)
    print("shuffled vs clean, late window:", {k: (round(v["t"], 2), v["p"]) for k, v in late.items()})
    assert best["t"] > 0 and best["p"] < 0.01
    assert best["mean_flagged"] > best["mean_rest"]

    # error by VoG decile on the test split: top decile worse than the bottom one
    dec = rep["error_by_vog"]["test"]["keys"][man["primary"]]["deciles"]
    print("test error, bottom vs top decile:", dec[0]["error_rate"], dec[-1]["error_rate"])
    assert dec[-1]["error_rate"] > dec[0]["error_rate"]

    # the OoD table has a row per corruption, VoG and max-softmax side by side
    ood = rep["ood"]
    assert set(ood["group_names"]) == {"rotate", "fog"}
    row = ood["groups"]["fog"]
    assert "max_softmax" in row and any(k.startswith("vog_late_") for k in row)
    assert {"z_vs_test_late_softmax", "abs_z_vs_test_late_softmax", "el2n_late", "aum"} <= set(row)
    # the findings printed are the report's, and the shuffled labels have a league table
    assert [f["text"] for f in rep["findings"]] and all(f["text"] in proc.stdout for f in rep["findings"])
    league = rep["signals"]["flags"]["is_noisy"]["train"]["table"]
    assert {r["signal"] for r in league} >= {"vog_late_softmax", "z_late_softmax", "loss_mean", "aum", "el2n_late"}
    assert Path(run_url, "report.html").exists()
    assert (out / "audit.yaml").exists()

    # the flags: the top 10% of each split, checked against the shuffled labels in the report
    fq = rep["flag_quality"]["splits"]["train"]
    assert fq["n_flagged"] == 800 // 10 and fq["against_ground_truth"]["precision"] > 0.2   # above the base rate
    assert len(rep["heatmap_grids"]) == 3
