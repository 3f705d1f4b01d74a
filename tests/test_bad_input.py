"""Bad input is refused clearly or rejected row by row; no row is ever lost (issue "Reliability
and security", item 2).

Row-level problems — ONE audit (real Ray, local Parquet) holding all of them at once; each bad row
lands in ``rejected.parquet`` with its reason, and ``rows_in = rows_scored + rows_rejected``
holds for the whole audit and for every split (from the manifest):

* corrupt image bytes, a truncated PNG, empty bytes, a null image;
* the wrong image size (9×9) and the wrong channel count (RGB for a 1-channel model);
* labels out of range (10 and -7 for a 10-class model), and a null label;
* NaN / +inf / -inf pixels and a raw array of the wrong length (raw-array Parquet);
* an empty split (a Parquet file with the schema and 0 rows) — DOCUMENTED CHOICE: an empty split
  is not an error; the manifest reports it with ``rows_in = rows_scored = rows_rejected = 0``
  (an audit whose splits are ALL empty fails: "no row could be scored");
* a class with one example: its z is 0 (the class std is 0), never NaN.

Audit-level problems — each a clear error naming the file, row (id) or key:

* a truncated Parquet file (names the file), duplicate ids (names the id and split; real Ray),
  a checkpoint of another architecture (names the file and the keys), a checkpoint that pickles an
  arbitrary object (refused by ``weights_only=True``; its payload never runs), a missing checkpoint
  URL, an unknown config key (names the key and the file; exit code 2 from the CLI), an output URL
  that cannot be written (names the URL) — these fail before any data is scored.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# the bad rows of the "train" split: id -> (image bytes, label, expected reason prefix)
def _bad_train_rows(imgs: np.ndarray) -> dict[str, tuple[Any, Any, str]]:
    good = _png(imgs[0])
    rgb = np.repeat(imgs[1][:, :, None], 3, axis=2)
    big = np.zeros((9, 9), np.uint8)
    big[:8, :8] = imgs[2]
    return {
        "bad-corrupt-bytes": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8, 1, "decode_error"),
        "bad-truncated-png": (good[: len(good) // 2], 1, "decode_error"),
        "bad-empty-bytes": (b"", 1, "decode_error"),
        "bad-null-image": (None, 1, "missing_image"),
        "bad-size-9x9": (_png(big), 2, "bad_shape: (1,9,9) != (1,8,8)"),
        "bad-rgb-channels": (_png(rgb), 1, "bad_shape: (3,8,8) != (1,8,8)"),
        "bad-label-10": (good, 10, "label_out_of_range: 10 not in [0, 10)"),
        "bad-label-minus7": (good, -7, "label_out_of_range: -7 not in [0, 10)"),
        "bad-label-null": (good, None, "missing_label"),
    }


def _bad_raw_rows(imgs: np.ndarray) -> dict[str, tuple[Any, Any, str]]:
    base = imgs[3].astype(np.float32).ravel()
    nan, pinf, ninf = base.copy(), base.copy(), base.copy()
    nan[5], pinf[17], ninf[40] = np.nan, np.inf, -np.inf
    return {
        "raw-nan": (nan, 3, "non_finite_pixels"),
        "raw-pos-inf": (pinf, 3, "non_finite_pixels"),
        "raw-neg-inf": (ninf, 3, "non_finite_pixels"),
        "raw-65-values": (np.concatenate([base, [0.0]]).astype(np.float32), 3, "bad_shape: (65) != (1,8,8)"),
    }


@pytest.fixture(scope="module")
def env(tiny_digits, shared_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    imgs, labels = tiny_digits.imgs, tiny_digits.labels
    # "train": 140 good digits in which class 9 keeps ONE example, then the bad rows
    keep = [i for i in range(200) if labels[i] != 9][:139] + [int(np.flatnonzero(labels[:200] == 9)[0])]
    rows = [(f"ok-{i:04d}", _png(imgs[i]), int(labels[i])) for i in keep]
    bad = _bad_train_rows(imgs)
    rows[60:60] = [(k, v[0], v[1]) for k, v in bad.items()]  # not among the first rows (shape inference)
    (root / "train").mkdir()
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.table({"key": [r[0] for r in part], "image": pa.array([r[1] for r in part], pa.binary()),
                                 "label": pa.array([r[2] for r in part], pa.int64())}),
                       root / "train" / f"part-{n}.parquet", row_group_size=32)
    # "raw": float arrays (list<float32>), 40 good + the bad ones
    raw_bad = _bad_raw_rows(imgs)
    raw_rows = [(f"raw-ok-{i}", imgs[600 + i].astype(np.float32).ravel(), int(labels[600 + i])) for i in range(40)]
    raw_rows[20:20] = [(k, v[0], v[1]) for k, v in raw_bad.items()]
    (root / "raw").mkdir()
    pq.write_table(pa.table({"key": [r[0] for r in raw_rows],
                             "image": pa.array([r[1].tolist() for r in raw_rows], pa.list_(pa.float32())),
                             "label": pa.array([r[2] for r in raw_rows], pa.int64())}), root / "raw" / "part-0.parquet")
    # "empty": a Parquet file with the schema and no row
    (root / "empty").mkdir()
    pq.write_table(pa.table({"key": pa.array([], pa.string()), "image": pa.array([], pa.binary()),
                             "label": pa.array([], pa.int64())}), root / "empty" / "part-0.parquet")
    splits = {
        "train": {"format": "parquet", "url": str(root / "train"), "id_column": "key"},
        "raw": {"format": "parquet", "url": str(root / "raw"), "id_column": "key", "image_shape": [8, 8]},
        "empty": {"format": "parquet", "url": str(root / "empty"), "id_column": "key"},
    }
    expected = {("train", k): v[2] for k, v in bad.items()} | {("raw", k): v[2] for k, v in raw_bad.items()}
    return {"root": root, "tiny": tiny_digits, "splits": splits, "expected": expected,
            "rows_in": {"train": len(rows), "raw": len(raw_rows), "empty": 0},
            "ids": {"train": [r[0] for r in rows], "raw": [r[0] for r in raw_rows]}}


def _run(cfg: dict):
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit

    return run_audit(validate(cfg), report=False)


# ----------------------------------------------------------------------------------------------
# row-level: one audit


def test_bad_rows_are_rejected_with_reasons_and_nothing_is_lost(env):
    from vog_ray.runs import open_run

    tiny = env["tiny"]
    res = _run(tiny.config(env["splits"], str(env["root"] / "out")))
    m = res.manifest
    run = open_run(res.run_url)
    # rows in = scored + rejected: the whole audit and every split
    rows = m["rows"]
    assert rows["in"] == sum(env["rows_in"].values()) == rows["scored"] + rows["rejected"], rows
    for split, n in env["rows_in"].items():
        s = m["splits"][split]
        assert s["rows_in"] == n == s["rows_scored"] + s["rows_rejected"], (split, s)
    # the empty split is reported with 0 rows
    assert m["splits"]["empty"] == {"rows_in": 0, "rows_scored": 0, "rows_rejected": 0}
    # every bad row is rejected with its reason; nothing else is
    rej = run.rejected()
    got = {(s, i): r for s, i, r in zip(rej["split"].to_pylist(), rej["id"].to_pylist(), rej["reason"].to_pylist())}
    assert set(got) == set(env["expected"]), sorted(set(got) ^ set(env["expected"]))
    for key, want in env["expected"].items():
        assert got[key].startswith(want), (key, got[key], want)
    # every input row is in exactly one of the tables (no row lost, none duplicated)
    scores = run.scores()
    for split, ids in env["ids"].items():
        scored = [i for s, i in zip(scores["split"].to_pylist(), scores["id"].to_pylist()) if s == split]
        rejected = [i for (s, i) in got if s == split]
        assert sorted(scored + rejected) == sorted(ids), split
    # no NaN score anywhere; the class with one example has z = 0
    z = np.asarray(scores["score"].to_pylist(), float)
    assert np.isfinite(z).all()
    classes = run.classes()
    nine = [r for r in classes.to_pylist() if r["split"] == "train" and r["class"] == 9]
    assert len(nine) == 1 and nine[0]["count"] == 1 and nine[0]["std_all_logit"] == 0.0
    assert nine[0]["degenerate_all_logit"]
    one = [r for r in scores.to_pylist() if r["split"] == "train" and r["target_label"] == 9]
    assert len(one) == 1 and one[0]["score"] == 0.0 and one[0]["z_all_logit"] == 0.0


# ----------------------------------------------------------------------------------------------
# audit-level: clear errors, before any scoring


def test_duplicate_ids_are_an_error_naming_the_id(env, tmp_path):
    tiny = env["tiny"]
    d = tmp_path / "dups"
    d.mkdir()
    imgs, labels = tiny.imgs, tiny.labels
    for n, ids in enumerate((["a-0", "dup-x", "a-2", "a-3"], ["b-0", "dup-x", "b-2", "dup-y", "dup-y", "dup-y"])):
        pq.write_table(pa.table({"key": ids, "image": pa.array([_png(imgs[i]) for i in range(len(ids))], pa.binary()),
                                 "label": pa.array(labels[: len(ids)], pa.int64())}), d / f"part-{n}.parquet")
    splits = {"train": {"format": "parquet", "url": str(d), "id_column": "key"}}
    with pytest.raises(ValueError) as ei:
        _run(tiny.config(splits, str(tmp_path / "out")))
    msg = str(ei.value)
    assert "duplicate example ids" in msg and "'dup-x' in split 'train'" in msg, msg
    assert "'dup-y' in split 'train' (3 rows)" in msg, msg
    from vog_ray.runs import list_runs

    assert list_runs(str(tmp_path / "out")) == []


def test_duplicates_across_sorted_blocks_are_found(env):
    """The duplicate check works on a multi-block dataset (repeats inside and across blocks)."""
    import ray.data

    from vog_ray.distributed.reduce import check_unique_ids

    ids = [f"id-{i:03d}" for i in range(300)]
    blocks = [pa.table({"split": ["s"] * 100, "id": ids[a:a + 100]}) for a in range(0, 300, 100)]
    blocks.append(pa.table({"split": ["s", "t"], "id": ["id-100", "id-100"]}))  # a repeat in s only
    check_unique_ids(ray.data.from_arrow(blocks[:3] + [pa.table({"split": ["t"], "id": ["id-100"]})]), 301)
    with pytest.raises(ValueError, match=r"'id-100' in split 's'") as ei:
        check_unique_ids(ray.data.from_arrow(blocks), 302)
    assert "split 't'" not in str(ei.value)


def test_truncated_parquet_names_the_file(env, tmp_path):
    tiny = env["tiny"]
    d = tmp_path / "trunc"
    d.mkdir()
    src = Path(env["splits"]["train"]["url"]) / "part-0.parquet"
    (d / "part-0.parquet").write_bytes(src.read_bytes())
    data = (Path(env["splits"]["train"]["url"]) / "part-1.parquet").read_bytes()
    (d / "part-1.parquet").write_bytes(data[: len(data) // 2])
    splits = {"train": {"format": "parquet", "url": str(d), "id_column": "key"}}
    with pytest.raises(ValueError, match=r"part-1\.parquet.*not a readable Parquet file"):
        _run(tiny.config(splits, str(tmp_path / "out")))


def _mlp_checkpoints(tmp_path: Path) -> str:
    import torch

    from vog_ray.models import build_model

    d = tmp_path / "mlp"
    d.mkdir()
    m = build_model({"name": "mlp", "in_features": 64, "num_classes": 10})
    for i in range(3):
        torch.save(m.state_dict(), d / f"epoch_{i + 1}.pt")
    return str(d / "epoch_*.pt")


class _Payload:
    """Unpickling this runs ``os.system`` — a checkpoint must never be unpickled like that."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoints(tmp_path: Path, tiny) -> tuple[str, Path]:
    import shutil

    import torch

    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "PAYLOAD_RAN"
    for p in sorted(Path(tiny.ckpt_dir).glob("epoch_*.pt")):
        shutil.copy(p, d / p.name)
    sd = torch.load(d / "epoch_2.pt", weights_only=True)
    torch.save({"state_dict": sd, "extra": _Payload(str(marker))}, d / "epoch_2.pt")
    return str(d / "epoch_*.pt"), marker


def test_checkpoint_errors_name_the_file(env, tmp_path):
    from vog_ray.models.checkpoints import CheckpointError

    tiny = env["tiny"]
    splits = {"train": env["splits"]["train"]}
    out = str(tmp_path / "out")
    # another architecture
    with pytest.raises(CheckpointError, match=r"epoch_1\.pt' does not fit the model: missing keys \[.*features"):
        _run(tiny.config(splits, out, checkpoints=_mlp_checkpoints(tmp_path)))
    # an arbitrary pickled object: refused by weights_only, the payload never runs
    evil, marker = _evil_checkpoints(tmp_path, tiny)
    with pytest.raises(CheckpointError, match=r"epoch_2\.pt' cannot be loaded with weights_only=True"):
        _run(tiny.config(splits, out, checkpoints=evil))
    assert not marker.exists(), "the pickled payload ran"
    # a missing checkpoint URL / a glob that matches nothing
    with pytest.raises(FileNotFoundError, match=r"no such file: '.*epoch_99\.pt'"):
        _run(tiny.config(splits, out, checkpoints=[tiny.ckpt_dir + "/epoch_1.pt", tiny.ckpt_dir + "/epoch_99.pt"]))
    with pytest.raises(FileNotFoundError, match=r"no file matches '.*nothing_\*\.pt'"):
        _run(tiny.config(splits, out, checkpoints=tiny.ckpt_dir + "/nothing_*.pt"))
    assert not (tmp_path / "out" / "runs").exists()


def test_config_and_output_errors_from_the_cli(env, tmp_path, capsys):
    from vog_ray.cli import main

    tiny = env["tiny"]
    splits = {"train": env["splits"]["train"]}
    # an unknown config key: exit code 2, the message names the key and the file
    cfg = tiny.config(splits, str(tmp_path / "out"))
    cfg["compute"]["batch_sise"] = 8
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["audit", str(path), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "compute.batch_sise: unknown key" in err and str(path) in err, err
    # an output URL that cannot be written (a file is in the way): exit code 1, names the URL
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = tmp_path / "unwritable.yaml"
    path.write_text(yaml.safe_dump(tiny.config(splits, str(blocker / "out"))))
    assert main(["audit", str(path), "--no-report"]) == 1
    err = capsys.readouterr().err
    assert f"output.url '{blocker / 'out'}' cannot be written" in err, err
    # a missing split file
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(tiny.config({"train": {"format": "parquet", "url": str(tmp_path / "nope")}},
                                               str(tmp_path / "out2"))))
    assert main(["audit", str(path), "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "nope" in err, err


def test_a_pool_that_takes_every_cpu_is_refused_naming_the_keys():
    """actors.min × cpus_per_actor must leave one CPU for the read/decode tasks: otherwise nothing
    is read and the audit waits forever (seen with 2 actors × 1 CPU on a 2-CPU Ray)."""
    from vog_ray.config import validate
    from vog_ray.distributed.cluster import check_cpus_left

    def cfg(**compute):
        return validate({"data": {"splits": {"train": {"format": "npz", "url": "x.npz"}}}, "model": "lenet",
                         "checkpoints": "c/*.pt", "output": {"url": "out"}, "compute": compute}).compute

    with pytest.raises(ValueError, match=r"compute\.actors\.min \(2\) × compute\.cpus_per_actor \(1\) = 2 CPUs, "
                                         r"but the Ray cluster has 2"):
        check_cpus_left(cfg(actors={"min": 2, "max": 2}), 2.0, 1)
    with pytest.raises(ValueError, match=r"× 3 checkpoint groups = 3 CPUs"):
        check_cpus_left(cfg(checkpoint_groups=3), 3.0, 3)
    check_cpus_left(cfg(actors={"min": 1, "max": 4}), 2.0, 1)  # one actor, one CPU left: fine
    check_cpus_left(cfg(actors={"min": 2, "max": 2}, cpus_per_actor=0.5), 2.0, 1)
    check_cpus_left(cfg(checkpoint_groups=3, cpus_per_actor=0.25), 2.0, 3)
    # autoscaling clusters: CPU workers from 0 (no CPU yet), or gpu_wait_s declared: not refused
    check_cpus_left(cfg(actors={"min": 2, "max": 2}), 0.0, 1)
    check_cpus_left(cfg(actors={"min": 2, "max": 2}, gpu_wait_s=600), 2.0, 1)


def test_cuda_without_gpu_waits_for_the_autoscaler_then_fails_clearly(env, tmp_path):
    """device cuda on a cluster with no GPU: with compute.gpu_wait_s the audit asks the autoscaler
    for GPU bundles and waits that long (a local Ray never gets one), then fails naming the key;
    device auto falls back to the CPU after the same wait."""
    import time as _time

    from vog_ray.config import validate
    from vog_ray.distributed.cluster import wait_for_gpus

    cfg = validate({"data": {"splits": {"train": {"format": "npz", "url": "x.npz"}}}, "model": "lenet",
                    "checkpoints": "c/*.pt", "output": {"url": str(tmp_path / "out")},
                    "compute": {"device": "cuda", "gpu_wait_s": 3}})
    t = _time.monotonic()
    assert wait_for_gpus(cfg.compute) is False
    assert 2.5 <= _time.monotonic() - t < 30
    assert wait_for_gpus(validate({**cfg.to_dict(), "compute": {"device": "cuda", "gpu_wait_s": 0}}).compute) is False
    # the whole audit: a clear error naming the key, nothing scored
    tiny = env["tiny"]
    c = tiny.config(env["splits"], str(tmp_path / "gpu-out"))
    c["compute"] = {**c.get("compute", {}), "device": "cuda", "gpu_wait_s": 2}
    with pytest.raises(RuntimeError, match=r"compute\.device is 'cuda' but the Ray cluster has no GPU after "
                                           r"waiting 2 s .*compute\.gpu_wait_s"):
        _run(c)
