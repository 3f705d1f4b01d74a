"""Published runs on a local output directory, without Ray: ``LATEST`` is replaced atomically
(a reader sees the old id or the new one, never an empty or partial file, and a write that fails
midway leaves the old one), and reading a run leaves no file open (``/proc/self/fd`` before and
after every reader, and no ``ResourceWarning``)."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileOpener

from vog_ray.runs import list_runs, open_run, publish, write_json, write_table


def _write_run(out: Path, run_id: str, files: int = 3, rows: int = 50) -> str:
    """A small published run: a multi-file score table, classes, rejected rows, manifest, _SUCCESS."""
    url = str(out / "runs" / run_id)
    for i in range(files):
        ranks = np.arange(i * rows + 1, (i + 1) * rows + 1)
        write_table(f"{url}/scores/part-{i}.parquet",
                    pa.table({"id": [f"r{r}" for r in ranks], "split": ["train"] * rows, "rank": ranks}))
    write_table(f"{url}/classes.parquet", pa.table({"split": ["train"], "class": [0], "count": [files * rows]}))
    write_table(f"{url}/rejected.parquet/empty.parquet", pa.table({"id": pa.array([], pa.string())}))
    write_json(f"{url}/manifest.json", {"run_id": run_id})
    publish(url, str(out), run_id)
    return url


def _latest(out: Path) -> str:
    return (out / "LATEST").read_text()


def test_latest_is_replaced_atomically_and_survives_a_failed_write(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write_run(out, "run-a")
    assert _latest(out) == "run-a\n"
    seen_during_write: list[str] = []
    real_write = LocalFileOpener.write

    def write(self, data, fail: bool):
        if "LATEST" in os.path.basename(self.path):
            seen_during_write.append(_latest(out))   # a reader while the new id is being written
            if fail:
                real_write(self, data[: len(data) // 2])
                raise OSError(28, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(LocalFileOpener, "write", lambda self, data: write(self, data, fail=True))
    with pytest.raises(OSError, match="No space left"):
        _write_run(out, "run-b")
    assert _latest(out) == "run-a\n"                          # the old LATEST, whole
    assert open_run(str(out)).run_id == "run-a"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]   # no temporary left
    assert list_runs(str(out)) == ["run-a", "run-b"]          # run-b has _SUCCESS; LATEST was not updated

    monkeypatch.setattr(LocalFileOpener, "write", lambda self, data: write(self, data, fail=False))
    _write_run(out, "run-c")
    assert _latest(out) == "run-c\n"
    assert seen_during_write == ["run-a\n", "run-a\n"]        # never empty, never half an id


def _open_fds(under: Path) -> list[str]:
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)):
            fds.append(target)
    return sorted(fds)


def test_reading_a_run_leaves_no_file_open(tmp_path):
    out = tmp_path / "out"
    _write_run(out, "run-a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        assert _open_fds(tmp_path) == []
        run = open_run(str(out))                               # LATEST, manifest.json
        assert run.scores().num_rows == 150
        assert run.scores(columns=["id", "rank"]).num_rows == 150
        assert run.classes().num_rows == 1 and run.rejected().num_rows == 0
        assert sum(b.num_rows for b in run.iter_scores(batch_size=20)) == 150
        assert _open_fds(tmp_path) == []
        partly = run.iter_scores(batch_size=20)
        next(partly)
        assert len(_open_fds(tmp_path)) == 1                    # the file being streamed, and only it
        partly.close()                                          # a reader that stops early
        assert _open_fds(tmp_path) == []
        del run, partly
        gc.collect()
    assert _open_fds(tmp_path) == []


def test_a_reader_that_fails_on_a_bad_file_leaves_no_file_open(tmp_path):
    """The error (and its traceback, which holds the reader's frames) outlives the read: the files
    must be closed by then, not when the traceback is collected."""
    out = tmp_path / "out"
    url = _write_run(out, "run-a")
    bad = Path(url) / "scores" / "part-1.parquet"
    bad.write_bytes(bad.read_bytes()[:-20])                     # a corrupt footer
    run = open_run(str(out))
    with pytest.raises(Exception) as streamed:
        list(run.iter_scores(batch_size=20))
    assert streamed.value is not None and _open_fds(tmp_path) == []
    with pytest.raises(Exception) as read:
        run.scores()
    assert read.value is not None and _open_fds(tmp_path) == []
