"""The distributed audit with real parts: the shared local Ray, the session's S3 API on 127.0.0.1
(moto's server) holding the data, the checkpoints AND the outputs, real images (sklearn's 8×8
digits) and a real model trained for a few epochs (K = 4 checkpoints on S3) — the shared audit of
``tests/modes.py`` (fixture ``digits_audit``).

What is checked here (issue "Distributed audit", item 7); the equality of the execution modes
(single process, fused, checkpoint-sharded, incremental) is ``test_modes.py``'s:

1. results do not depend on the number of actors, of read blocks, or on the batch size;
2. checkpoint-sharded with 3 groups, float64 accumulation and ``label: predicted`` equals the
   fused computation of the same;
3. every reader (Parquet PNG / raw arrays, image folder, CIFAR batches, npz) from S3, with the
   bad rows in ``rejected.parquet``;
4. the published run: ``_SUCCESS``, the manifest (no credentials anywhere), checkpoint hashes,
   and a re-run that makes a new run without touching the old one.

Audits are memoised per config name (``digits_audit.audit``), so a test that needs an audit
another test (or module) already ran reuses it; each config has its own output URL, so no audit
resumes another's work.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.digits import MODEL, K, to_input
from tests.modes import KEYS, RTOL, ROWS, TARGETS, WINDOWS, Scores, assert_same_scores, col, parquet_ids, record
from tests.s3 import DUMMY_SECRET

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(420)]  # a hang fails

# the secret key this process and the workers sign with: it must appear in no output
SECRET = DUMMY_SECRET
VARIANT = {"actors": {"min": 1, "max": 2}, "read_blocks": 6, "batch_size": 32}


def _scores(digits_audit, result) -> Scores:
    return Scores.of_run(result.run_url, digits_audit.storage)


def test_normalize_against_train_in_the_reduce(digits_audit):
    """``vog.normalize_against: train`` changes only the reduce: with ``output.keep_work``, the audit
    of the same config with the setting reuses stage 1 (the same work key) and reduces again.
    Train's own z is the plain run's bit for bit; test's z is (raw − train class mean) / train
    class std from a naive float64 computation on the published raw VoG; and the single-process
    ``vog_ray.score`` with the same setting agrees."""
    import vog_ray
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit

    digits_audit.ray.ensure()
    cfg = digits_audit.config("keep_work")
    cfg["output"]["keep_work"] = True
    fused = run_audit(validate(cfg))
    cfg["vog"]["normalize_against"] = "train"
    res = run_audit(validate(cfg))
    assert res.manifest["resumed_from_work"] is True and res.manifest["work"] == fused.manifest["work"]
    m = res.manifest
    assert m["normalize_against"] == "train" and m["rows_without_reference"] == {}
    assert m["config"]["vog"]["normalize_against"] == "train"
    base, got = _scores(digits_audit, fused).tables, _scores(digits_audit, res).tables
    for k in KEYS:
        assert got["train"][f"z_{k}"].equals(base["train"][f"z_{k}"]), k
        assert got["test"][f"vog_{k}"].equals(base["test"][f"vog_{k}"]), k
        v_tr, c_tr = col(got["train"], f"vog_{k}"), np.asarray(got["train"]["target_label"].to_pylist())
        v_te, c_te = col(got["test"], f"vog_{k}"), np.asarray(got["test"]["target_label"].to_pylist())
        want = np.empty(len(v_te))
        for i, (v, c) in enumerate(zip(v_te, c_te)):
            members = [float(x) for x, y in zip(v_tr, c_tr) if y == c]
            mean = sum(members) / len(members)
            want[i] = (v - mean) / (sum((x - mean) ** 2 for x in members) / len(members)) ** 0.5
        err = record("normalize_against: z vs naive float64, abs", float(np.max(np.abs(col(got["test"], f"z_{k}") - want))))
        assert err <= 1e-9, (k, err)
        assert not np.allclose(col(got["test"], f"z_{k}"), col(base["test"], f"z_{k}"))   # really another z
    idx = np.r_[ROWS["train"], ROWS["test"]]
    single = vog_ray.score(to_input(digits_audit.imgs[idx]), digits_audit.labels[idx], model=dict(MODEL),
                           checkpoints=digits_audit.ckpt_glob, storage=digits_audit.storage, windows=WINDOWS,
                           targets=TARGETS, device="cpu", batch_size=64,
                           ids=parquet_ids(len(ROWS["train"])) + parquet_ids(len(ROWS["test"])),
                           split=["train"] * len(ROWS["train"]) + ["test"] * len(ROWS["test"]),
                           normalize_against="train")
    ref = Scores({s: single.filter(pc.equal(single["split"], s)).sort_by("id") for s in ("train", "test")}, {})
    assert_same_scores(ref, _scores(digits_audit, res), "normalize_against: ray vs score")


# ----------------------------------------------------------------------------------------------
# 1. independent of actors, read blocks, batch size


def test_read_blocks_reach_the_reader(digits_audit, shared_ray):
    """``compute.read_blocks`` is the number of read tasks of every split."""
    from vog_ray.config import validate
    from vog_ray.data.dataset import dataset_from_config

    for blocks in (1, 6):
        cfg = validate(digits_audit.config("blocks", compute={"read_blocks": blocks}))
        ds = dataset_from_config(cfg, cfg.storage.options()).materialize()
        assert ds.count() == len(ROWS["train"]) + len(ROWS["test"])
        assert ds.num_blocks() == 2 * blocks, blocks  # two splits


def test_results_independent_of_actors_blocks_batch(digits_audit):
    """1 actor / Ray's read blocks / batch 64 (fused) vs up to 2 actors / 6 blocks per split /
    batch 32. (Batch 100 with a single read block: the sharded mode of test_modes.py, compared
    with the fused one there.)"""
    base = digits_audit.audit("fused")
    variant = "actors2_blocks6_batch32"
    res = digits_audit.audit(variant, compute=VARIANT)
    assert res.manifest["resumed_from_work"] is False
    for k, v in VARIANT.items():  # the variant really ran with other settings
        got, was = res.manifest["config"]["compute"][k], base.manifest["config"]["compute"][k]
        if isinstance(v, dict):
            got, was = {n: got[n] for n in v}, {n: was[n] for n in v}
        assert got == v != was, k
    assert_same_scores(_scores(digits_audit, base), _scores(digits_audit, res), f"{variant} vs fused")


# ----------------------------------------------------------------------------------------------
# 2. checkpoint-sharded, float64, predicted labels == fused


def test_sharded_three_groups_float64_predicted_equals_fused(digits_audit):
    """Float64 accumulation: raw VoG, z and ranks agree with the fused computation; with
    ``label: predicted`` every group targets the LAST checkpoint's prediction (groups 0 and 1 do
    not hold it and load it on the side). The fused reference is ``vog_ray.score`` (which the
    fused Ray audit equals, test_modes.py).

    Why z is compared relative to its scale and not as a plain 1e-6 absolute difference: the
    fused actor folds all K maps in float32 on the device while the sharded ones fold K/2 each
    and a reduce merges the partial moments in float64, so raw VoG differs by float32 rounding
    (~2e-8 relative measured), and z = (VoG - m_c) / s_c amplifies a relative error e of VoG into
    an absolute error e·VoG/s_c of z (VoG/s_c is ~3–10 here). A larger source of the same size
    class is the engine's ``stacked="auto"`` path choice (vmapped vs one checkpoint after the
    other: ~1.4e-7 relative in raw VoG), which each actor makes by timing its first batch."""
    res = digits_audit.audit("sharded3_f64_predicted", compute={"checkpoint_groups": 3},
                             vog={"accum_dtype": "float64", "label": "predicted"})
    m = res.manifest
    assert m["mode"] == "checkpoint-sharded" and m["checkpoint_groups"] == [[0], [1, 2], [3]]
    assert m["label_mode"] == "predicted"
    ref = digits_audit.reference("float64", "predicted")
    got = _scores(digits_audit, res)
    assert_same_scores(ref, got, "sharded3 f64 predicted vs fused f64")
    for s in ("train", "test"):
        t = got.tables[s]
        last_pred = [row[-1] for row in t["sig_pred"].to_pylist()]
        assert t["target_label"].to_pylist() == t["pred"].to_pylist() == last_pred
    # and the target really differs from the label somewhere (the test means something)
    assert any(a != b for s in ("train", "test")
               for a, b in zip(got.tables[s]["target_label"].to_pylist(), got.tables[s]["label"].to_pylist()))


# ----------------------------------------------------------------------------------------------
# 3. every reader from S3, bad rows rejected with reasons


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_every_reader_from_s3(digits_audit, shared_ray):
    from vog_ray.testing import writers
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit
    from vog_ray.runs import open_run
    from vog_ray.storage import resolve

    import vog_ray

    s3, st = digits_audit.s3, digits_audit.storage
    imgs, labels = digits_audit.imgs, digits_audit.labels
    same = np.arange(1000, 1030)              # the same 30 digits as raw Parquet and as npz
    png_idx, folder_idx, cifar_idx = np.arange(1100, 1140), np.arange(1200, 1230), np.arange(1300, 1320)
    writers.write_parquet_split(s3.url("r/png"), imgs[png_idx], labels[png_idx], storage=st, rows_per_file=20)
    fs, root = resolve(s3.url("r/png"), st)
    with fs.open(f"{root}/part-00002.parquet", "wb") as fh:   # a corrupt PNG and a label out of range
        pq.write_table(pa.table({"image": pa.array([b"\x89PNG\r\n\x1a\n truncated", _png(imgs[0])], pa.binary()),
                                 "label": pa.array([3, 12], pa.int64())}), fh)
    writers.write_parquet_split(s3.url("r/raw"), imgs[same], labels[same], storage=st, encode="raw",
                                rows_per_file=16)
    names = [str(i) for i in range(10)]
    folder_ids = writers.write_image_folder(s3.url("r/folder"), imgs[folder_idx], labels[folder_idx], names, st)
    big = np.repeat(np.repeat(imgs[cifar_idx], 4, axis=1), 4, axis=2)            # 32×32
    writers.write_cifar_batches(s3.url("r/cifar"), np.stack([big] * 3, axis=-1), labels[cifar_idx], storage=st,
                                names=("data_batch_1", "data_batch_2"))
    writers.write_npz_split(s3.url("r/npz/digits.npz"), imgs[same], labels[same], st)
    splits = {
        "png": {"format": "parquet", "url": s3.url("r/png")},
        "raw": {"format": "parquet", "url": s3.url("r/raw"), "image_shape": [8, 8]},
        "folder": {"format": "image_folder", "url": s3.url("r/folder")},
        "cifar": {"format": "cifar", "url": s3.url("r/cifar"), "cifar_batches": "train"},
        "npz": {"format": "npz", "url": s3.url("r/npz/digits.npz")},
    }
    cfg = validate(digits_audit.config("readers", splits=splits,
                                       data={"transform": {"channels": 1, "resize": 8}, "class_names": names}))
    res = run_audit(cfg)
    m = res.manifest
    expected_in = {"png": 42, "raw": 30, "folder": 30, "cifar": 20, "npz": 30}
    assert m["rows"] == {"in": 152, "scored": 150, "rejected": 2}
    assert m["rows"]["in"] == m["rows"]["scored"] + m["rows"]["rejected"]
    for s, n in expected_in.items():
        sp = m["splits"][s]
        assert sp["rows_in"] == n and sp["rows_in"] == sp["rows_scored"] + sp["rows_rejected"], (s, sp)
    run = open_run(res.run_url, st)
    rej = run.rejected().sort_by("id").to_pylist()
    assert [(r["split"], r["id"], r["label"]) for r in rej] == [("png", "part-00002.parquet:0", 3),
                                                               ("png", "part-00002.parquet:1", 12)]
    assert rej[0]["reason"].startswith("decode_error"), rej[0]
    assert rej[1]["reason"] == "label_out_of_range: 12 not in [0, 10)", rej[1]
    t = run.scores()
    by = {s: t.filter(pc.equal(t["split"], s)).sort_by("id") for s in splits}
    assert sorted(by["folder"]["id"].to_pylist()) == sorted(folder_ids)
    assert set(by["cifar"]["id"].to_pylist()) == {f"data_batch_{b}:{i}" for b in (1, 2) for i in range(10)}
    assert by["npz"]["id"].to_pylist() == sorted(f"digits.npz:{i}" for i in range(30))
    for s, idx in (("folder", folder_idx), ("png", png_idx[:40])):
        lab = dict(zip(by[s]["id"].to_pylist(), by[s]["label"].to_pylist()))
        assert sorted(lab.values()) == sorted(labels[idx].tolist()), s
    # raw Parquet, npz and the in-memory reference decode the same images to the same numbers
    ref = vog_ray.score(to_input(imgs[same]), labels[same], model=MODEL, checkpoints=digits_audit.ckpt_glob, storage=st,
                        windows=WINDOWS, targets=TARGETS, device="cpu", ids=[str(i) for i in range(30)])
    ref_vog = {int(r["id"]): r["vog_late_logit"] for r in ref.to_pylist()}
    raw_rows = by["raw"].to_pylist()
    raw_vog = {int(r["id"].split(":")[0][5:10]) * 16 + int(r["id"].split(":")[1]): r["vog_late_logit"]
               for r in raw_rows}
    npz_vog = {int(r["id"].split(":")[1]): r["vog_late_logit"] for r in by["npz"].to_pylist()}
    for i in range(30):
        assert raw_vog[i] == pytest.approx(ref_vog[i], rel=RTOL)
        assert npz_vog[i] == pytest.approx(ref_vog[i], rel=RTOL)
    for s in splits:
        assert np.all(np.isfinite(col(by[s], "vog_late_logit"))) and np.all(col(by[s], "vog_late_logit") > 0)
        assert sorted(by[s]["rank"].to_pylist()) == list(range(1, by[s].num_rows + 1))


# ----------------------------------------------------------------------------------------------
# 4. the published run


def test_published_run_manifest_and_no_secrets(digits_audit):
    from vog_ray.config import redact, validate

    res = digits_audit.audit("fused")
    s3 = digits_audit.s3
    prefix = f"out/fused/runs/{res.run_id}/"
    keys = s3.list(prefix)
    assert prefix + "_SUCCESS" in keys and prefix + "manifest.json" in keys
    assert any(k.startswith(prefix + "scores/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith(prefix + "rejected.parquet/") for k in keys)   # present even when empty
    assert prefix + "classes.parquet" in keys
    client = s3.client()
    m = json.loads(client.get_object(Bucket=s3.bucket, Key=prefix + "manifest.json")["Body"].read())
    assert m == json.loads(json.dumps(res.manifest, default=str))
    cfg = validate(digits_audit.config("fused"))
    assert m["config"] == redact(cfg.to_dict())
    assert m["config"]["storage"]["endpoint_url"] == s3.endpoint and m["config"]["model"] == MODEL
    # checkpoints: URL, size and sha256 of the bytes on S3, in training order
    ck = m["checkpoints"]
    assert [c["url"] for c in ck] == [s3.url(f"ckpt/epoch_{i}.pt") for i in range(1, K + 1)]
    for c in ck:
        data = client.get_object(Bucket=s3.bucket, Key=c["url"].split(s3.bucket + "/", 1)[1])["Body"].read()
        assert c["size"] == len(data) and c["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(m["versions"]) >= {"vog_ray", "ray", "torch", "numpy", "pyarrow", "python"}
    import ray
    assert m["versions"]["ray"] == ray.__version__
    n = len(ROWS["train"]) + len(ROWS["test"])
    assert m["rows"] == {"in": n, "scored": n, "rejected": 0}
    assert m["splits"] == {"train": {"rows_in": 240, "rows_scored": 240, "rows_rejected": 0},
                           "test": {"rows_in": 160, "rows_scored": 160, "rows_rejected": 0}}
    assert 0 < m["score_wall_time_s"] <= m["wall_time_s"]
    tp = m["throughput"]
    assert tp["examples_per_s"] == pytest.approx(n / m["score_wall_time_s"])
    assert tp["example_checkpoints_per_s"] == pytest.approx(n * K / m["score_wall_time_s"])
    # no credentials anywhere: not in the manifest, not in any object the audits wrote
    everything = s3.list("out/")
    assert everything
    for key in everything:
        body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        assert SECRET.encode() not in body, key
        assert b"aws_secret_access_key" not in body.lower(), key


def test_rerun_makes_a_new_run_and_never_appends(digits_audit):
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit
    from vog_ray.runs import list_runs, open_run

    first = digits_audit.audit("fused")
    s3, st = digits_audit.s3, digits_audit.storage
    out_url = s3.url("out/fused")
    old = open_run(first.run_url, st).scores()
    old_keys = s3.list(f"out/fused/runs/{first.run_id}/")
    second = run_audit(validate(digits_audit.config("fused")))
    assert second.run_id != first.run_id and second.run_url != first.run_url
    assert second.manifest["resumed_from_work"] is False    # the first run's work was removed once published
    assert not s3.list("out/fused/_work/")
    assert list_runs(out_url, st) == sorted([first.run_id, second.run_id])
    assert open_run(out_url, st).run_id == second.run_id   # LATEST
    assert s3.list(f"out/fused/runs/{first.run_id}/") == old_keys
    again = open_run(first.run_url, st).scores()
    assert again.equals(old)
    new = open_run(second.run_url, st).scores()
    assert new.num_rows == old.num_rows == len(ROWS["train"]) + len(ROWS["test"])
    assert second.manifest["rows"] == first.manifest["rows"]
    assert new.select(["id", "split", "rank", "score"]).equals(old.select(["id", "split", "rank", "score"]))
