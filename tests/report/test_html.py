"""report.html: self-contained, escaped, and loads in headless Chromium without a console error;
report writing on S3 (moto on loopback)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import runfactory as rf
from vog_ray.report import build_report

EVIL = "<script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(digits_report):
    """The session's published digits run with its report (conftest ``digits_report``; class 9
    is named ``EVIL``, the grids show classes 3 and 9)."""
    assert rf.SCRIPT_CLASS == EVIL
    return digits_report


def _chromium(tmp, url: str, *args: str) -> subprocess.CompletedProcess:
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is missing: install Debian's 'chromium' package (make browser)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp}/profile", "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    """Console output of the page (Chromium logs each message as INFO:CONSOLE …) and uncaught
    exceptions. The report page is designed to log nothing at all."""
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


def test_console_check_detects_errors(tmp_path):
    """The detector itself: a page that logs and throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('oops');"
                   "throw new Error('kaboom');</script></body></html>")
    p = _chromium(tmp_path, bad.as_uri(), "--dump-dom")
    msgs = _console_messages(p.stderr)
    assert any("oops" in m for m in msgs) and any("Uncaught Error: kaboom" in m for m in msgs)


def test_page_loads_in_chromium(report, tmp_path):
    url, rep = report
    page = os.path.join(url, "report.html")
    shot = tmp_path / "report.png"
    p = _chromium(tmp_path, "file://" + page, "--dump-dom", f"--screenshot={shot}", "--window-size=1280,2000")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _console_messages(p.stderr) == []
    dom = p.stdout
    assert "VoG audit report" in dom
    tiles = re.findall(r'<figure class="tile" data-id="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,', dom)
    # train and test: lowest + highest globally, and for classes 3 and 9
    assert len(tiles) == 2 * (2 + 2 * 2) * 25
    ids_in_json = [i for g in rep["grids"] for i in g["ids"]]
    assert tiles == ids_in_json and all(t.startswith(("train-", "test-")) for t in tiles)
    # the class named <script>… is text, never an element
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script" not in dom.lower()
    assert shot.exists() and shot.stat().st_size > 20_000
    shutil.copy(shot, os.path.join(os.path.dirname(url), "report-screenshot.png"))  # for a human look


def test_page_is_self_contained_and_escaped(report):
    url, rep = report
    with open(os.path.join(url, "report.html"), encoding="utf-8") as f:
        html = f.read()
    assert "<script" not in html.lower()
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith("data:") for s in srcs)
    assert "http://" not in html and "https://" not in html
    # every figure of report.json is embedded
    grids = [r for r in rep["figures"] if r.startswith("figures/grid_")]
    assert len(grids) == 2 * (2 + 2 * 2)
    assert html.count('<figure class="fig">') == len(rep["figures"]) - len(grids)  # grids: as tiles
    for rel in rep["figures"]:
        assert os.path.exists(os.path.join(url, rel))
    assert rep["warnings"] == []


def test_every_string_is_escaped(tmp_path, monkeypatch):
    """Ids, class names, carried flag names and config values with markup stay text."""
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", rf.fake_readers())
    evil_id = '"><img src=x onerror=alert(2)>'
    n = 20
    ids = [f"r{i}" for i in range(n - 1)] + [evil_id]
    rows = {"train": {"label": [0, 1] * (n // 2), "vog_late_logit": np.arange(float(n)), "id": ids,
                      "flag<u>": [True, False] * (n // 2)}}
    root = tmp_path / "run"
    images = np.zeros((n, 4, 4), np.uint8)
    os.makedirs(root / "data")
    np.savez(root / "data" / "train.npz", image=images, id=np.array(ids), label=np.array(rows["train"]["label"]))
    url = rf.synthetic_run(str(root), rows, class_names=["<i>zero</i>", EVIL],
                           split_specs={"train": {"id_column": "id"}},
                           report={"flag_columns": ["flag<u>"], "classes_to_show": [1]})
    rep = build_report(url)
    with open(os.path.join(url, "report.html"), encoding="utf-8") as f:
        html = f.read()
    assert "<script" not in html.lower() and "<i>zero" not in html and "<u>" not in html
    assert "onerror=alert(2)>" not in html.replace("&gt;", "")  # only in escaped form
    assert html.count('src="data:') >= 2 * 25 * 0 + 20             # the tiles are there
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in html
    assert "flag&lt;u&gt;" in html
    assert rep["grids"][0]["ids"][0] == evil_id or evil_id in rep["grids"][1]["ids"]


def test_missing_image_reader_skips_grids(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", None)
    url = rf.synthetic_run(str(tmp_path), {"train": {"label": [0, 1] * 5, "vog_late_logit": np.arange(10.0)}})
    rep = build_report(url)
    assert any("image grids skipped" in w for w in rep["warnings"])
    with open(os.path.join(url, "report.html"), encoding="utf-8") as f:
        html = f.read()
    assert "image grids skipped" in html and '<figure class="tile"' not in html
    assert len(rep["grids"]) == 2 and len(rep["grids"][0]["ids"]) == 10   # ids still listed


def test_report_on_s3(s3_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "vog_ray.data.fetch", None)
    root = s3_server.url("audits")
    rows = {"train": {"label": [0, 1] * 10, "vog_late_logit": np.arange(20.0)}}
    url = rf.synthetic_run(root, rows, storage=s3_server.storage)
    rep = build_report(url, storage=s3_server.storage)
    keys = s3_server.list("audits/runs/run1/")
    assert "audits/runs/run1/report.json" in keys and "audits/runs/run1/report.html" in keys
    assert all(f"audits/runs/run1/{r}" in keys for r in rep["figures"])
    assert not [k for k in keys if "/.tmp-" in k]
    assert rep["files"]["report_html"] == url + "/report.html"
