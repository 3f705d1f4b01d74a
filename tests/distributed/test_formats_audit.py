"""The new formats through the whole Ray audit: WebDataset shards (members not sorted by key), a
manifest of image URIs and the Hugging Face Parquet layout give the same raw VoG and z as
``vog_ray.score`` on the same arrays — from a local directory and from the S3 test server — with
their bad rows rejected with reasons and ``rows in = scored + rejected``.

Real parts: a local 2-CPU Ray, moto's S3 server on 127.0.0.1, sklearn's 8×8 digits and the tiny
CNN of ``tiny_digits`` (K = 3 checkpoints of a real training)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from vog_ray.testing.writers import write_manifest_split

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

WDS, MAN, HF = np.arange(700, 730), np.arange(730, 750), np.arange(750, 770)   # digits audited per split
RTOL = 1e-6


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_splits(tiny, url, storage) -> dict:
    """The three splits under ``url``, each with bad rows; returns the split specs and what to expect."""
    import tarfile

    from vog_ray.storage import join, resolve
    from vog_ray.testing.writers import write_manifest_split, write_webdataset_split

    imgs, labels = tiny.imgs, tiny.labels
    wds_ids = write_webdataset_split(join(url, "wds"), imgs[WDS], labels[WDS], storage, samples_per_shard=12,
                                     interleave=True, json_fields={"source": [f"cam{i % 3}" for i in WDS]})
    fs, root = resolve(join(url, "wds"), storage)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("x1.png", b"\x89PNG\r\n\x1a\n broken"), ("x1.cls", b"3"), ("x2.cls", b"4")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    fs.pipe_file(f"{root}/zz-bad.tar", buf.getvalue())
    man_uris = write_manifest_split(join(url, "man/train.parquet"), imgs[MAN], labels[MAN], storage)
    fs.rm(resolve(join(url, "man", man_uris[4]), storage)[1])             # a missing object
    hf_root = resolve(join(url, "hf"), storage)[1]
    fs.makedirs(f"{hf_root}/img", exist_ok=True)
    for j in range(10, 20):                                                # half the images only by path
        fs.pipe_file(f"{hf_root}/img/{j}.png", _png(imgs[HF[j]]))
    structs = [{"bytes": _png(imgs[HF[j]]), "path": None} for j in range(10)] \
        + [{"bytes": None, "path": f"img/{j}.png"} for j in range(10, 20)]
    names = [f"digit-{k}" for k in range(10)]
    meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}).encode()}
    t = pa.table({"image": pa.array(structs, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "label": pa.array(labels[HF], pa.int64())})
    with fs.open(f"{hf_root}/train-00000.parquet", "wb") as fh:
        pq.write_table(t.replace_schema_metadata(meta), fh)
    return {
        "splits": {
            "wds": {"format": "webdataset", "url": join(url, "wds"), "keep_columns": ["source"]},
            "man": {"format": "manifest", "url": join(url, "man/train.parquet"), "image_column": "uri",
                    "manifest": {"rows_per_task": 7}},
            "hf": {"format": "parquet", "url": join(url, "hf")},
        },
        "ids": {"wds": wds_ids, "man": man_uris, "hf": [f"train-00000.parquet:{j}" for j in range(20)]},
        "rejected": {("wds", "zz-bad.tar:x1"): "decode_error", ("wds", "zz-bad.tar:x2"): "missing_image",
                     ("man", man_uris[4]): "fetch_error: FileNotFoundError"},
        "class_names": names,
    }


def check_against_score(tiny, res, layout, storage) -> float:
    """Raw VoG and z of every scored row equal ``vog_ray.score`` on the same digits (per split:
    class statistics are per split); bad rows rejected with their reasons. Returns the max rel. error."""
    import vog_ray
    from vog_ray.runs import open_run

    m = res.manifest
    assert m["rows"]["in"] == m["rows"]["scored"] + m["rows"]["rejected"] == 30 + 2 + 20 + 20
    assert m["rows"]["rejected"] == 3
    for s, sp in m["splits"].items():
        assert sp["rows_in"] == sp["rows_scored"] + sp["rows_rejected"], (s, sp)
    assert m["config"]["data"]["class_names"] == layout["class_names"]      # from the HF metadata
    run = open_run(res.run_url, storage)
    rej = {(r["split"], r["id"]): r["reason"] for r in run.rejected().to_pylist()}
    assert set(rej) == set(layout["rejected"])
    for k, prefix in layout["rejected"].items():
        assert rej[k].startswith(prefix), (k, rej[k])
    scores = run.scores()
    worst = 0.0
    for split, idx in (("wds", WDS), ("man", MAN), ("hf", HF)):
        ids = layout["ids"][split]
        good = [j for j, i in enumerate(ids) if (split, i) not in rej]
        ref = vog_ray.score(tiny.imgs[idx[good]][:, None].astype(np.float32) * np.float32(1 / 255),
                            tiny.labels[idx[good]], model=tiny.MODEL, checkpoints=tiny.ckpt_glob, device="cpu",
                            ids=[ids[j] for j in good])
        want = {r["id"]: r for r in ref.to_pylist()}
        got = {r["id"]: r for r in scores.filter(pc.equal(scores["split"], split)).to_pylist()}
        assert set(got) == set(want), split
        for i, r in got.items():
            assert r["label"] == want[i]["label"]
            for col in ("vog_all_logit", "z_all_logit"):
                err = abs(r[col] - want[i][col]) / max(abs(want[i][col]), 1e-12)
                worst = max(worst, err)
                assert err < RTOL, (split, i, col, r[col], want[i][col])
        if split == "wds":
            assert {r["source"] for r in got.values()} == {"cam0", "cam1", "cam2"}
    return worst


def _audit(tiny, layout, out_url, storage_cfg=None):
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit

    cfg = tiny.config(layout["splits"], out_url, **({"storage": storage_cfg} if storage_cfg else {}))
    return run_audit(validate(cfg), report=False)


def test_new_formats_audit_equals_score_local_and_s3(tiny_digits, tmp_path, s3_server, shared_ray):
    s3 = s3_server
    # the shared Ray's workers carry the session's S3 endpoint and credentials
    local = write_splits(tiny_digits, str(tmp_path / "data"), None)
    res = _audit(tiny_digits, local, str(tmp_path / "out"))
    worst_local = check_against_score(tiny_digits, res, local, None)
    # a manifest that lists an image twice: its ids (the URIs) collide — an error naming the id
    import pyarrow.parquet as pq_

    dup = tmp_path / "dup"
    write_manifest_split(str(dup / "m.parquet"), tiny_digits.imgs[:3], tiny_digits.labels[:3])
    t = pq_.read_table(dup / "m.parquet")
    pq_.write_table(pa.concat_tables([t, t.slice(1, 1)]), dup / "m.parquet")
    with pytest.raises(ValueError, match=r"duplicate example ids: 'images/000001.png' in split 'm'"):
        _audit(tiny_digits, {"splits": {"m": {"format": "manifest", "url": str(dup / "m.parquet"),
                                              "image_column": "uri"}}}, str(tmp_path / "out-dup"))
    remote = write_splits(tiny_digits, s3.url("data"), s3.storage)
    res = _audit(tiny_digits, remote, s3.url("out"), {"endpoint_url": s3.endpoint})
    worst_s3 = check_against_score(tiny_digits, res, remote, s3.storage)
    print(f"new formats vs vog_ray.score: max relative error local {worst_local:.2g}, S3 {worst_s3:.2g}")
