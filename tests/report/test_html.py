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


TILE = re.compile(r'<figure class="tile( marked)?" data-id="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,')


def test_page_loads_in_chromium(report, tmp_path):
    url, rep = report
    page = os.path.join(url, "report.html")
    shot = tmp_path / "report.png"
    p = _chromium(tmp_path, "file://" + page, "--dump-dom", f"--screenshot={shot}", "--window-size=1280,2000")
    assert p.returncode == 0, p.stderr[-2000:]
    assert _console_messages(p.stderr) == []
    dom = p.stdout
    assert "VoG audit report" in dom
    tiles = [t[1] for t in TILE.findall(dom)]
    # train and test: lowest + highest globally, and for classes 3 and 9
    assert len(tiles) == 2 * (2 + 2 * 2) * 25
    # the page opens with the hardest examples of each split; the other grids follow in <details>
    hardest = [g for g in rep["grids"] if g["which"] == "highest" and g["class"] is None]
    rest = [g for g in rep["grids"] if g not in hardest]
    assert sorted(g["split"] for g in hardest) == ["test", "train"]
    assert tiles == [i for g in hardest + rest for i in g["ids"]]
    assert all(t.startswith(("train-", "test-")) for t in tiles)
    # the class named <script>… is text, never an element
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script" not in dom.lower()
    assert shot.exists() and shot.stat().st_size > 20_000
    shutil.copy(shot, os.path.join(os.path.dirname(url), "report-screenshot.png"))  # for a human look


def test_findings_hardest_examples_and_classes_come_first(report):
    url, rep = report
    with open(os.path.join(url, "report.html"), encoding="utf-8") as f:
        html = f.read()
    at = [html.index(x) for x in ("<h2 id='findings'>", "<h2 id='hardest'>", "<h2 id='per-class'>",
                                  "<details class='sec' id='league'>", "<details class='sec' id='flip'>",
                                  "<details class='sec' id='error'>", "<details class='sec' id='ood'>")]
    assert at == sorted(at)
    findings = html[at[0]:at[1]]
    assert findings.count("<li") == len(rep["findings"]) > 0
    for f in rep["findings"]:   # every sentence with its key, escaped
        assert f"<code class=\"note\">{f['key']}</code>" in findings
    assert "does not reproduce the paper" in findings or all(f["reproduces"] is not False for f in rep["findings"])
    # the hardest-examples grid marks exactly the flagged rows and the rows whose label differs from the prediction
    from vog_ray.runs import open_run

    t = open_run(url).scores(columns=["id", "label", "pred", "is_noisy"]).to_pandas().set_index("id")
    for g in rep["grids"]:
        want = {i: [m for m, on in (("is_noisy", t.loc[i, "is_noisy"] is True or t.loc[i, "is_noisy"] == 1),
                                    ("label≠pred", t.loc[i, "label"] != t.loc[i, "pred"])) if on]
                for i in g["ids"]}
        assert g["marks"] == {i: m for i, m in want.items() if m}, g["title"]
    marked = {m[1] for m in TILE.findall(html[at[1]:at[2]]) if m[0]}
    first = [g for g in rep["grids"] if g["which"] == "highest" and g["class"] is None]
    assert marked == {i for g in first for i in g["marks"]} and marked
    # the per-class table and the flip figure are there
    assert rep["class_summary"]["train"]["classes"] and "share in the top decile" in html[at[2]:at[3]]
    assert "figures/flip_train.png" in rep["figures"] and 'alt="train: flagged vs rest' in html


def _images_decoded(tmp_path, page: str) -> tuple[int, int]:
    """(images, images decoded) of ``page`` in Chromium: a wrapper page (scripts allowed there, never
    in the report) loads it in a frame and, at its load event, counts the images that are complete
    with a width — those inside closed <details> included."""
    wrapper = tmp_path / "wrapper.html"
    wrapper.write_text(
        "<!DOCTYPE html><html><body><pre id='out'>pending</pre>"
        f"<iframe id='f' src='file://{page}' width='1200' height='800'></iframe>"
        "<script>const f = document.getElementById('f'); f.addEventListener('load', () => {"
        " const imgs = [...f.contentDocument.images];"
        " const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);"
        " document.getElementById('out').textContent = 'images ' + imgs.length + ' decoded ' + ok.length; });"
        "</script></body></html>")
    p = _chromium(tmp_path, wrapper.as_uri(), "--allow-file-access-from-files", "--virtual-time-budget=30000",
                  "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r"images (\d+) decoded (\d+)", p.stdout)
    assert m, p.stdout[:2000]
    return int(m.group(1)), int(m.group(2))


def test_every_image_decodes_in_chromium(report, tmp_path):
    url, rep = report
    # grids (and heat-map grids) show their tiles on the page, not their figure files
    n_figs = len([r for r in rep["figures"] if not r.startswith(("figures/grid_", "figures/heatmap_"))])
    n_heat = sum(len(g["ids"]) for g in rep["heatmap_grids"])
    page = os.path.join(url, "report.html")
    assert _images_decoded(tmp_path, page) == (n_figs + 2 * (2 + 2 * 2) * 25 + n_heat,) * 2
    # the check sees a broken image: one PNG of a copy corrupted
    with open(page, encoding="utf-8") as f:
        html = f.read()
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace('src="data:image/png;base64,iVBOR', 'src="data:image/png;base64,XXXXX', 1))
    n, ok = _images_decoded(tmp_path, str(broken))
    assert ok == n - 1


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
    heat = [r for r in rep["figures"] if r.startswith("figures/heatmap_")]
    assert len(grids) == 2 * (2 + 2 * 2) and len(heat) == 2
    assert html.count('<figure class="fig">') == len(rep["figures"]) - len(grids) - len(heat)  # grids: as tiles
    for rel in rep["figures"]:
        assert os.path.exists(os.path.join(url, rel))
    assert rep["warnings"] == []


def test_heatmap_grids(report):
    """The highest-VoG examples of each split with their VoG heat maps: the grid holds the same
    ids as the image grid, and each map's pixel mean is the example's raw VoG in the table."""
    url, rep = report
    from vog_ray.runs import open_run

    t = open_run(url).scores().to_pandas().set_index("id")
    key = rep["summary"]["primary"]
    assert sorted(g["split"] for g in rep["heatmap_grids"]) == ["test", "train"]
    for g in rep["heatmap_grids"]:
        same = [x for x in rep["grids"] if x["split"] == g["split"] and x["which"] == "highest" and x["class"] is None]
        assert g["key"] == key and g["ids"] == same[0]["ids"] and len(g["ids"]) == 25
        for i, mean in zip(g["ids"], g["map_means"]):
            assert abs(mean - t.loc[i, f"vog_{key}"]) <= 1e-5 * t.loc[i, f"vog_{key}"]
    with open(os.path.join(url, "report.html"), encoding="utf-8") as f:
        html = f.read()
    assert html.count('<figure class="tile heat"') == 2 * 25


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
                           split_specs={"train": {"id_column": "id", "keep_columns": ["flag<u>"]}},
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
