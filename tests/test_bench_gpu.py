"""bench/gpu.py before any GPU: its peak table and section guard, and the whole script in its CPU mode
(``--device cpu --quick``), so that its first run on a GPU is not its first run. The FLOP counts are
checked against the published figures (ResNet-50 at 224×224: 4.1 G multiply-adds forward, so ≈ 16.4
GFLOP for forward + input-only backward; ResNet-18/CIFAR at 32×32: 0.56 G → ≈ 2.2 GFLOP)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peaks_by_card_name_and_override():
    g = bench()
    assert g.peaks_for("NVIDIA H200", None) == {"bf16": 989, "tf32": 494, "fp32": 67}
    assert g.peaks_for("NVIDIA A100-SXM4-80GB", None)["bf16"] == 312
    assert g.peaks_for("NVIDIA L40S", None)["bf16"] == 362          # not the L4's
    assert g.peaks_for("NVIDIA L4", None)["tf32"] == 60
    assert g.peaks_for("NVIDIA H100 PCIe", None)["bf16"] == 756     # not the SXM's
    assert g.peaks_for("Some GPU", None) == {"bf16": None, "tf32": None, "fp32": None}
    assert g.peaks_for("NVIDIA H200", "bf16=900,fp32=60")["bf16"] == 900
    assert g.peaks_for("", "123")["bf16"] == 123.0


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    g = bench()
    run = g.Run(budget_s=60, out=str(tmp_path / "r.json"))
    ran = []

    def boom():
        raise RuntimeError("CUDA error: an illegal memory access")

    run.section("first", 1, boom)
    run.section("second", 1, lambda: ran.append(1))
    run.section("third", 10**6, lambda: ran.append(2))  # more than the budget: skipped
    rec = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert rec["first"]["status"] == "failed" and "illegal memory access" in rec["first"]["error"]
    assert rec["second"]["status"] == "ok" and ran == [1]
    assert rec["third"]["status"] == "skipped"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_cpu_quick_run_of_the_whole_script(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "VOG_RAY_TORCH_THREADS": "1"}
    p = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--quick", "--budget-s", "1700",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1750)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == res
    sec = res["sections"]
    assert sec.pop("compile_resnet18_cifar")["status"] == "skipped"  # --quick leaves compile out
    assert {k: v["status"] for k, v in sec.items()} == {k: "ok" for k in sec}, sec
    fl = res["flops"]
    assert 16.0 < fl["resnet50"]["gflop_nominal"] < 16.8
    assert 2.1 < fl["resnet18_cifar"]["gflop_nominal"] < 2.35
    for model in ("resnet50", "resnet18_cifar"):
        for p_ in ("fp32", "tf32", "bf16"):
            r = res["engine"][model][p_]
            assert r["rate_host"] > 0 and r["rate_device"] > 0 and r["tflops"] > 0
            assert r["share_of_peak"] is None  # no peak for a CPU
        assert res["bare"][model]["engine_vs_bare_gpu"] > 0
    assert res["transfer"]["resnet50"]["overlap_gain"] > 0
    d = res["decode"]
    assert d["statuses_equal"] and d["max_pixel_diff_levels"] <= 1.0 and d["device_images_per_s"] > 0
    fid = res["fidelity"]["resnet18_cifar"]["bf16"]
    assert set(fid) == {f"{w}_{t}" for w in ("early", "late", "all") for t in ("logit", "softmax")}
    assert all(-1 <= f["spearman"] <= 1 for f in fid.values())
    pipe = res["pipeline"]
    assert pipe["pipeline_vs_engine_gpu"] > 0 and pipe["pipeline_vs_engine_gpu_decode"] > 0
    assert pipe["cpu_decode"]["precision_check"]["mode"] == "bf16"
    assert res["summary"]["resnet50_bf16_rate"] > 0
