"""``vog-ray export`` and ``vog-ray explore`` as a user runs them (the venv's console script in a
subprocess) on the explorer's test run: the selections against pandas on the run's Parquet, every
format, the Label Studio tasks and labeling config, exit 2 naming the option for bad input, and
the explorer serving on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.explorerun import CLASS_NAMES, EVIL_CLASS
from tests.s3 import free_port
from vog_ray.runs import open_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _vog_ray() -> list[str]:
    exe = Path(sys.executable).parent / "vog-ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vog_ray.cli"]


def _run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*_vog_ray(), *args], cwd=cwd, capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def table(explore_run) -> pd.DataFrame:
    return open_run(explore_run.url).scores().to_pandas()


def _top(df: pd.DataFrame, n: int | None = None) -> pd.DataFrame:
    df = df.sort_values(["score", "split", "id"], ascending=[False, True, True], kind="mergesort")
    return df if n is None else df.head(n)


def test_export_csv_where_top(explore_run, table, tmp_path):
    p = _run("export", explore_run.url, "--where", "label <> pred AND percentile >= 50", "--top", "7", "--to", "csv",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    got = pd.read_csv(io.BytesIO(p.stdout))
    want = _top(table[(table.label != table.pred) & (table.percentile >= 50)], 7)
    assert got.id.tolist() == want.id.tolist()
    assert list(got.columns[:7]) == ["id", "split", "label", "pred", "z", "percentile", "rank"]
    np.testing.assert_allclose(got.z, want.score)
    assert b"7 rows written" in p.stderr


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_export_flagged_split(explore_run, table, tmp_path, fmt):
    out = tmp_path / f"x.{fmt}"
    p = _run("export", explore_run.url, "--flagged", "--split", "test", "--to", fmt, "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    got = pq.read_table(out).to_pandas() if fmt == "parquet" else pd.read_json(out, lines=True)
    want = _top(table[(table.split == "test") & table.flagged])
    assert len(want) > 0 and got.id.tolist() == want.id.tolist()
    assert got.label_name.tolist() == [CLASS_NAMES[c] for c in want.label]


def test_export_label_studio(explore_run, table, tmp_path):
    out = tmp_path / "tasks.json"
    p = _run("export", explore_run.url, "--top", "5", "--split", "train", "--to", "labelstudio", "--out", str(out),
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    tasks = json.loads(out.read_text())
    want = _top(table[table.split == "train"], 5)
    assert [t["data"]["id"] for t in tasks] == want.id.tolist()
    for t, (_, row) in zip(tasks, want.iterrows()):
        assert t["data"]["image"].startswith("data:image/png;base64,")
        assert t["data"]["z"] == pytest.approx(row.score) and t["data"]["percentile"] == pytest.approx(row.percentile)
        pre = t["predictions"][0]["result"][0]
        assert (pre["from_name"], pre["to_name"], pre["type"]) == ("label", "image", "choices")
        assert pre["value"]["choices"] == [CLASS_NAMES[row.label]]      # the current label
    xml = (tmp_path / "tasks.label_config.xml").read_text()
    assert '<Choices name="label" toName="image"' in xml and '<Image name="image" value="$image"/>' in xml
    assert EVIL_CLASS not in xml and "&lt;script&gt;alert(1)&lt;/script&gt;" in xml


@pytest.mark.parametrize("args, needle", [
    (["--where", "labl <> pred", "--to", "csv"], "--where"),
    (["--where", "id IN (SELECT * FROM read_csv('/etc/passwd'))", "--to", "csv"], "disabled by configuration"),
    (["--to", "parquet"], "--out"),
    (["--split", "nope", "--to", "csv"], "--split"),
    (["--top", "0", "--to", "csv"], "--top"),
])
def test_export_errors_exit_2(explore_run, tmp_path, args, needle):
    p = _run("export", explore_run.url, *args, cwd=tmp_path)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.startswith("error:") and needle in err, err


def test_export_flagged_needs_flags(tmp_path):
    import runfactory as rf

    url = rf.synthetic_run(str(tmp_path / "r"), {"train": {"label": [0, 1] * 3, "vog_late_logit": np.arange(6.0)}})
    p = _run("export", url, "--flagged", "--to", "csv", cwd=tmp_path)
    assert p.returncode == 2 and b"flags" in p.stderr


def test_explore_serves_on_loopback(explore_run, tmp_path):
    port = free_port()
    proc = subprocess.Popen([*_vog_ray(), "explore", explore_run.url, "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/?split=test", timeout=30) as r:
                    body = r.read()
            except OSError:
                time.sleep(0.5)
        assert body is not None and b"Ranked examples" in body
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode()
    assert f"http://127.0.0.1:{port}/" in out
