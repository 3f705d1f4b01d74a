"""Work directories and resume that cannot go stale (a local 2-CPU Ray, tiny digits on local files).

1. The resume key covers the input files' identity: a split rewritten in place — the same paths,
   the same ids, new labels — and the same config rerun with ``output.keep_work: true`` publishes
   the new labels and the same numbers as an audit that never saw the old data (the regression of
   issue #17: the old rows' labels and scores were published as a new run).
2. A rerun that reuses finished work says so: nothing scored now, no throughput, the earlier
   rows' count; the published tables are those of the first run.
3. Without ``keep_work`` the work directory is gone after publishing, and a rerun scores again.
4. The manifest records every input file's size and version, and what each scorer actor ran on;
5. an incremental audit refuses to fold new checkpoints into moments of input files that changed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest


pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

N = 40


@pytest.fixture(scope="module")
def ray_local(shared_ray):
    """The suite's shared local Ray."""
    return shared_ray


def _audit(cfg: dict):
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit

    return run_audit(validate(cfg), report=False)


def _scores(res) -> dict[str, tuple]:
    from vog_ray.runs import open_run

    t = open_run(res.run_url).scores(columns=["id", "label", "vog_all_logit", "z_all_logit", "rank"]).to_pylist()
    return {r["id"]: (r["label"], r["vog_all_logit"], r["z_all_logit"], r["rank"]) for r in t}


def test_rewritten_inputs_are_scored_afresh_and_reused_work_says_so(ray_local, tiny_digits, tmp_path):
    from vog_ray.testing.writers import write_parquet_split

    data = tmp_path / "data"
    imgs, labels = tiny_digits.imgs[:N], tiny_digits.labels[:N]
    write_parquet_split(str(data), imgs, labels, rows_per_file=20)
    splits = {"train": {"format": "parquet", "url": str(data)}}
    out = tmp_path / "out"
    kept = tiny_digits.config(splits, str(out), output={"url": str(out), "keep_work": True})

    first = _audit(kept)
    m1 = first.manifest
    assert m1["resumed_from_work"] is False and m1["throughput"]["rows_scored_now"] == N
    work1 = m1["work"]["url"]
    assert m1["work"]["kept"] is True and os.path.isfile(os.path.join(work1, "raw", "_SUCCESS"))
    # the manifest names every input file with its size and version
    listing = m1["inputs"]["train"]["listing"]
    assert [f[0] for f in listing] == ["part-00000.parquet", "part-00001.parquet"]
    for rel, size, version in listing:
        st = os.stat(data / rel)
        assert size == st.st_size and version == f"mtime={round(st.st_mtime * 1e9)},ino={st.st_ino}"
    assert m1["inputs"]["train"]["files"] == 2 and m1["inputs"]["train"]["bytes"] == sum(f[1] for f in listing)
    # what scored: CPU actors on this node, every row counted once
    assert m1["devices"] == {"cpu": N} and sum(s["rows"] for s in m1["scorers"]) == N
    assert all(s["device"] == "cpu" and s["gpus_reserved"] == [] for s in m1["scorers"]) and m1["warnings"] == []

    # 2. the same config again: stage 1 reused whole, and the run says so
    second = _audit(kept)
    m2 = second.manifest
    assert m2["resumed_from_work"] is True and m2["work"]["url"] == work1
    assert m2["throughput"]["rows_scored_now"] == 0 and m2["throughput"]["examples_per_s"] is None
    assert m2["resume"] == {"rows_scored_now": 0, "rows_from_earlier": N, "files_removed": 0}
    text = second.summary()
    assert f"nothing scored now: stage 1 reused whole from {work1} ({N} rows scored by an earlier invocation)" in text
    assert "examples/s" not in text
    assert _scores(second) == _scores(first)

    # 1. the split rewritten in place: same files, same ids, new labels
    new_labels = (labels + 1) % 10
    write_parquet_split(str(data), imgs, new_labels, rows_per_file=20)
    third = _audit(kept)
    m3 = third.manifest
    assert m3["resumed_from_work"] is False and m3["throughput"]["rows_scored_now"] == N
    assert m3["work"]["url"] != work1 and m3["inputs"]["train"]["sha256"] != m1["inputs"]["train"]["sha256"]
    got = _scores(third)
    assert sorted(got) == sorted(_scores(first))  # the same ids ("<file>:<row>")
    by_id = {f"part-{i // 20:05d}.parquet:{i % 20}": int(y) for i, y in enumerate(new_labels)}
    assert {i: v[0] for i, v in got.items()} == by_id

    # 3. the reference: an audit of the rewritten data that never saw the old data (no keep_work)
    fresh_out = tmp_path / "fresh"
    fresh = _audit(tiny_digits.config(splits, str(fresh_out)))
    assert fresh.manifest["work"]["kept"] is False and not (fresh_out / "_work").exists()
    ref = _scores(fresh)
    assert got.keys() == ref.keys()
    for i, (label, vog, z, rank) in got.items():
        r = ref[i]
        assert label == r[0] and rank == r[3]
        np.testing.assert_allclose([vog, z], [r[1], r[2]], rtol=1e-6, atol=1e-9)
    # the old labels' scores differ: had the old work been reused, this would fail
    assert any(abs(got[i][2] - v[2]) > 1e-3 for i, v in _scores(first).items())
    # without keep_work a rerun scores again
    again = _audit(tiny_digits.config(splits, str(fresh_out)))
    assert again.manifest["resumed_from_work"] is False and again.manifest["throughput"]["rows_scored_now"] == N


def test_incremental_refuses_to_fold_into_moments_of_changed_inputs(ray_local, tiny_digits, tmp_path):
    import glob
    import shutil

    from vog_ray.config import validate
    from vog_ray.distributed.incremental import IncrementalError, read_state, run_incremental
    from vog_ray.testing.writers import write_parquet_split

    data, ckpts = tmp_path / "data", tmp_path / "ckpts"
    write_parquet_split(str(data), tiny_digits.imgs[:N], tiny_digits.labels[:N], rows_per_file=20)
    ckpts.mkdir()
    src = sorted(glob.glob(tiny_digits.ckpt_glob))
    for p in src[:2]:
        shutil.copy2(p, ckpts)
    out = tmp_path / "out"
    cfg = validate(tiny_digits.config({"train": {"format": "parquet", "url": str(data)}}, str(out),
                                      checkpoints=str(ckpts / "epoch_*.pt")))
    first = run_incremental(cfg, report=False)
    assert first is not None and first.manifest["generation"] == 1
    state = read_state(str(out / "_incremental"), None)
    assert state["inputs"] == {"train": first.manifest["inputs"]["train"]["sha256"]}
    # the data rewritten in place, then a new checkpoint: folding it in would mix old and new rows
    write_parquet_split(str(data), tiny_digits.imgs[:N], (tiny_digits.labels[:N] + 1) % 10, rows_per_file=20)
    shutil.copy2(src[2], ckpts)
    with pytest.raises(IncrementalError, match=r"the input files of split\(s\) train changed since their moments"):
        run_incremental(cfg, report=False)
    assert read_state(str(out / "_incremental"), None)["generation"] == 1
