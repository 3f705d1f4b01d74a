"""The shard formats big datasets come in — WebDataset tar shards, manifests of image URIs, the
Hugging Face Parquet layout — read by real local Ray from the S3 test server (moto on 127.0.0.1)
and from local disk. Expected values come from the arrays the files were written from."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vog_ray.config import AuditConfig, SplitSpec, TransformSpec
from vog_ray.data.dataset import read_split
from vog_ray.data.decode import decode_batch
from vog_ray.data.fetch import fetch_images
from vog_ray.data.listing import split_files
from vog_ray.data.metadata import count_split_rows, declared_class_names, infer_input_shape
from vog_ray.storage import resolve
from vog_ray.testing.writers import write_manifest_split, write_webdataset_split

# own_ray: its Ray's workers must not see the session's S3 env (runs after the shared-Ray modules)
pytestmark = [pytest.mark.integration, pytest.mark.own_ray]

RNG = np.random.default_rng(7)
IMGS = RNG.integers(0, 256, size=(24, 8, 8), dtype=np.uint8)
LABELS = np.arange(24) % 10
T = TransformSpec()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def ray_s3(s3_server_module):
    """A local 2-CPU Ray started after the S3 server (its workers never see the AWS_* env: reads
    prove that the filesystem object carries the endpoint)."""
    import ray

    from tests.rayenv import start_test_ray

    start_test_ray()
    yield s3_server_module
    ray.shutdown()


def _decoded(ds, input_shape=(1, 8, 8), num_classes=10) -> dict[str, dict]:
    out = ds.map_batches(decode_batch, batch_format="numpy", batch_size=8,
                         fn_kwargs=dict(transform=T, input_shape=input_shape, num_classes=num_classes))
    return {r["id"]: r for r in out.take_all()}


# ---- WebDataset ------------------------------------------------------------------------------


def test_webdataset_same_rows_sorted_or_not_and_counts_from_headers(ray_s3):
    """Members of a sample that are not contiguous (Ray issue 44068) give the same rows as sorted
    shards: every sample whole, none doubled; counts come from a header pass."""
    s3, st = ray_s3, ray_s3.storage
    ids = write_webdataset_split(s3.url("wds/sorted"), IMGS, LABELS, st, samples_per_shard=10,
                                 json_fields={"tag": np.arange(24) * 3})
    ids2 = write_webdataset_split(s3.url("wds/mixed"), IMGS, LABELS, st, samples_per_shard=10, interleave=True,
                                  json_fields={"tag": np.arange(24) * 3})
    assert ids == ids2 and ids[13] == "shard-00001.tar:sample000013"
    fs, root = resolve(s3.url("wds/mixed/shard-00001.tar"), st)
    names = tarfile.open(fileobj=io.BytesIO(fs.cat_file(root))).getnames()
    assert names[:2] == ["sample000010.png", "sample000011.png"] and names[10] == "sample000010.cls"  # really mixed
    rows = {}
    for which in ("sorted", "mixed"):
        spec = SplitSpec(format="webdataset", url=s3.url(f"wds/{which}"), keep_columns=["tag"])
        assert count_split_rows(spec, st) == 24
        got = read_split("train", spec, st, override_num_blocks=2).take_all()
        assert len(got) == 24
        rows[which] = {r["id"]: (r["label"], bytes(r["image"]), r["tag"], r["split"]) for r in got}
    assert rows["sorted"] == rows["mixed"]
    for i in (0, 13, 23):
        lab, img, tag, split = rows["mixed"][ids[i]]
        assert (lab, tag, split) == (LABELS[i], 3 * i, "train")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(img))), IMGS[i])
    spec = SplitSpec(format="webdataset", url=s3.url("wds/mixed/shard-0000[12].tar"))
    dec = _decoded(read_split("train", spec, st))
    assert sorted(dec) == ids[10:] and {r["status"] for r in dec.values()} == {"ok"}
    np.testing.assert_allclose(dec[ids[17]]["x"][0], IMGS[17] / 255.0, rtol=1e-6)
    got = fetch_images(spec, [ids[11], ids[22]], st)                   # report grids
    assert np.array_equal(got[ids[11]], IMGS[11]) and np.array_equal(got[ids[22]], IMGS[22])
    cfg = AuditConfig.model_validate({"data": {"splits": {"w": {"format": "webdataset", "url": s3.url("wds/mixed")}}},
                                      "model": "mlp", "checkpoints": "x", "output": {"url": "/tmp/unused"}})
    assert infer_input_shape(cfg, st) == (1, 8, 8)


def test_webdataset_bad_samples_and_truncated_shards_become_rejected_rows(ray_s3, tmp_path):
    """Every sample read is a row: bad ones with their reason; a cut shard keeps its whole samples."""
    good = [(f"s{i}.png", _png(IMGS[i])) for i in range(3)] + [(f"s{i}.cls", str(LABELS[i]).encode()) for i in range(3)]
    good.sort()  # sorted by key
    bad = [("a.png", b"\x89PNG\r\n\x1a\n not a png"), ("a.cls", b"1"),     # undecodable image
           ("b.cls", b"2"), ("b.txt", b"no image member"),                  # no image at all
           ("c.png", _png(IMGS[4])), ("c.cls", b"seven"),                   # label is not a number
           ("d.png", _png(IMGS[5])), ("d.png", _png(IMGS[6])), ("d.cls", b"3"),  # a member twice
           ("e.png", _png(IMGS[7])), ("e.cls", b"12"),                      # label out of range
           ("f.png", _png(IMGS[8])), ("f.cls", b"4")]                       # fine
    d = tmp_path / "wds"
    d.mkdir()
    (d / "bad.tar").write_bytes(_tar(bad))
    whole = _tar(good)
    offsets = {ti.name: (ti.offset_data, ti.size) for ti in tarfile.open(fileobj=io.BytesIO(whole)).getmembers()}
    end = offsets["s2.png"][0] + offsets["s2.png"][1]
    (d / "cut-sorted.tar").write_bytes(whole[:end - 5])                     # inside the last member's data
    (d / "cut-marker.tar").write_bytes(whole[:-(-end // 512) * 512])        # after it: no end-of-archive marker
    mixed = _tar([m for m in good if m[0].endswith(".png")] + [m for m in good if m[0].endswith(".cls")])
    cut_at = {ti.name: ti.offset_data for ti in tarfile.open(fileobj=io.BytesIO(mixed)).getmembers()}["s1.cls"]
    (d / "cut-mixed.tar").write_bytes(mixed[:cut_at])                       # inside s1.cls; s2.cls lost
    spec = SplitSpec(format="webdataset", url=str(d))
    assert count_split_rows(spec) == 6 + 3 + 3 + 3                          # the header pass sees every sample
    dec = _decoded(read_split("w", spec, None, override_num_blocks=3))
    st = {k: v["status"] for k, v in dec.items()}
    assert len(st) == 15
    assert st["bad.tar:a"] == "decode_error: cannot identify image file"
    assert st["bad.tar:b"].startswith("missing_image: no member with extension jpg|jpeg|png|webp|npy (members: cls, txt)")
    assert st["bad.tar:c"] == "bad_label: c.cls holds 'seven', not an integer"
    assert st["bad.tar:d"] == "duplicate_member: d.png appears twice in the shard"
    assert st["bad.tar:e"] == "label_out_of_range: 12 not in [0, 10)"
    assert st["bad.tar:f"] == "ok" and dec["bad.tar:f"]["label"] == 4
    # a sorted shard cut in its last sample: the two before it are whole
    assert [st[f"cut-sorted.tar:s{i}"] for i in range(2)] == ["ok", "ok"]
    assert st["cut-sorted.tar:s2"].startswith("truncated_shard: cut-sorted.tar ends inside s2.png")
    np.testing.assert_allclose(dec["cut-sorted.tar:s1"]["x"][0], IMGS[1] / 255.0, rtol=1e-6)
    assert [st[f"cut-marker.tar:s{i}"] for i in range(2)] == ["ok", "ok"]
    assert st["cut-marker.tar:s2"].startswith("truncated_shard: cut-marker.tar has no end-of-archive marker after s2")
    # members not grouped by key and the shard cut: any sample may have lost a member — all rejected
    assert all(st[f"cut-mixed.tar:s{i}"].startswith("truncated_shard: cut-mixed.tar ends inside s1.cls (0 of 1 bytes)")
               for i in range(3)), st
    (d / "notes.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ValueError, match="notes.tar: not a tar archive"):
        count_split_rows(spec)


def test_webdataset_json_label_and_image_keys(ray_s3, tmp_path):
    arr = IMGS[:3].astype(np.float32) / 255.0
    members = []
    for i in range(3):
        buf = io.BytesIO()
        np.save(buf, arr[i][None], allow_pickle=False)
        members += [(f"k{i}.npy", buf.getvalue()), (f"k{i}.png", _png(IMGS[20 + i])),
                    (f"k{i}.json", json.dumps({"y": int(LABELS[i] + 1), "src": f"cam{i}"}).encode())]
    (tmp_path / "j.tar").write_bytes(_tar(members))
    spec = SplitSpec(format="webdataset", url=str(tmp_path / "j.tar"), keep_columns=["src"],
                     webdataset={"image_keys": ["npy", "png"], "label_key": "json:y"})
    rows = {r["id"]: r for r in read_split("j", spec, None).take_all()}
    assert [rows[f"j.tar:k{i}"]["label"] for i in range(3)] == list(LABELS[:3] + 1)
    assert [rows[f"j.tar:k{i}"]["src"] for i in range(3)] == ["cam0", "cam1", "cam2"]
    dec = _decoded(read_split("j", spec, None))
    np.testing.assert_allclose(dec["j.tar:k2"]["x"][0], arr[2] / 255.0, rtol=1e-6)   # the npy member, scaled
    with pytest.raises(ValueError, match="no id_column"):
        SplitSpec(format="webdataset", url="x", id_column="k")
    with pytest.raises(ValueError, match="webdataset options are for format: webdataset"):
        SplitSpec(format="parquet", url="x", webdataset={})


# ---- manifests -------------------------------------------------------------------------------


class _Recorder:
    """A FaultProxy rule that faults nothing and records every request."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, n: int):
        with self.lock:
            self.requests.append((method, path))
        return None

    def listings(self, key: str) -> list[str]:
        """Requests that list a part of the bucket holding ``key`` (``GET /<bucket>?list-type=2&
        prefix=<a prefix of key>``, or no prefix at all)."""
        from urllib.parse import parse_qs

        out = []
        for m, p in self.requests:
            path, _, query = p.partition("?")
            q = parse_qs(query, keep_blank_values=True)
            if m == "GET" and path.strip("/").count("/") == 0 and ("list-type" in q or "prefix" in q
                                                                  or "delimiter" in q or "marker" in q):
                if key.startswith(q.get("prefix", [""])[0]):
                    out.append(p)
        return out


def test_manifest_tables_uris_and_fetch_errors(ray_s3):
    """Parquet/CSV/JSONL manifests; relative and absolute URIs; a missing object is a rejected row
    (``fetch_error``); ids are the URIs or an id column; counts from the table's metadata."""
    from tests.faultproxy import FaultProxy

    s3, st = ray_s3, ray_s3.storage
    rel = write_manifest_split(s3.url("man/a/train.parquet"), IMGS[:12], LABELS[:12], st,
                               extra_columns={"key": [f"k{i}" for i in range(12)]})
    write_manifest_split(s3.url("man/b/train.csv"), IMGS[12:18], LABELS[12:18], st, table="csv", absolute=True)
    write_manifest_split(s3.url("man/c/train.jsonl"), IMGS[18:], LABELS[18:], st, table="jsonl")
    fs, root = resolve(s3.url("man/a/images/000005.png"), st)
    fs.rm(root)                                                       # one object is gone
    spec = SplitSpec(format="manifest", url=s3.url("man/a/train.parquet"), image_column="uri",
                     manifest={"rows_per_task": 5, "fetch_retries": 1})
    assert count_split_rows(spec, st) == 12
    dec = _decoded(read_split("m", spec, st))
    assert sorted(dec) == sorted(rel)
    assert dec["images/000005.png"]["status"].startswith("fetch_error: FileNotFoundError")
    assert sum(r["status"] == "ok" for r in dec.values()) == 11
    np.testing.assert_allclose(dec["images/000007.png"]["x"][0], IMGS[7] / 255.0, rtol=1e-6)
    assert dec["images/000007.png"]["label"] == LABELS[7]
    # an id column, several manifest tables of every kind in one split
    both = SplitSpec(format="manifest", url=[s3.url("man/b/train.csv"), s3.url("man/c/train.jsonl")],
                     image_column="uri")
    assert count_split_rows(both, st) == 12
    dec = _decoded(read_split("m", both, st))
    assert len(dec) == 12 and {r["status"] for r in dec.values()} == {"ok"}
    absolute = s3.url("man/b/images/000003.png")
    np.testing.assert_allclose(dec[absolute]["x"][0], IMGS[15] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(dec["images/000004.png"]["x"][0], IMGS[22] / 255.0, rtol=1e-6)  # jsonl, relative
    keyed = SplitSpec(format="manifest", url=s3.url("man/a/train.parquet"), image_column="uri", id_column="key")
    got = fetch_images(keyed, ["k3", "k9"], st)                        # report grids
    assert np.array_equal(got["k3"], IMGS[3]) and np.array_equal(got["k9"], IMGS[9])
    got = fetch_images(both, [absolute, "images/000001.png"], st)
    assert np.array_equal(got[absolute], IMGS[15]) and np.array_equal(got["images/000001.png"], IMGS[19])

    # nothing lists the bucket: every image is read by its key (through a recording proxy)
    rec = _Recorder()
    with FaultProxy(s3.endpoint, rule=rec) as proxy:
        from vog_ray.storage import StorageOptions

        via = StorageOptions(endpoint_url=proxy.url, region=st.region, extra=st.extra)
        rows = read_split("m", SplitSpec(format="manifest", url=s3.url("man/a/train.parquet"), image_column="uri",
                                         manifest={"rows_per_task": 4}), via).take_all()
    assert len(rows) == 12
    gets = {p.rsplit("/", 1)[1] for m, p in rec.requests if m == "GET" and "/man/a/images/" in p}
    assert gets == {f"{i:06d}.png" for i in range(12)} and not rec.listings("man/a/images/000000.png"), rec.listings("man/a/images/000000.png")
    assert rec.listings("man/a/train.parquet/"), "the recorder sees listings (of the manifest's own path)"
    heads = [p for m, p in rec.requests if m == "HEAD" and "/man/a/images/" in p]
    assert not heads, f"one GET per image, no HEAD: {heads[:3]}"


# ---- Hugging Face layout -----------------------------------------------------------------------


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _hf_metadata(names: list[str]) -> dict:
    """The schema metadata `datasets` writes into Parquet files (``Features.to_dict()``)."""
    feats = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    return {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}


def test_huggingface_parquet_layout(ray_s3, tmp_path):
    """``{bytes, path}`` images (embedded, or only a path relative to the Parquet file), class
    names from the ``huggingface`` schema metadata or from ``dataset_info.json``."""
    s3, st = ray_s3, ray_s3.storage
    fs, root = resolve(s3.url("hf/data"), st)
    for i in range(4, 8):
        fs.pipe_file(f"{root.rsplit('/', 1)[0]}/img/{i}.png", _png(IMGS[i]))   # ../img/ from the Parquet file
    images = pa.array([{"bytes": _png(IMGS[i]), "path": f"orig_{i}.png"} for i in range(4)]
                      + [{"bytes": None, "path": f"../img/{i}.png"} for i in range(4, 8)]
                      + [{"bytes": None, "path": "../img/missing.png"}], HF_IMAGE)
    t = pa.table({"image": images, "label": pa.array(list(LABELS[:8]) + [1], pa.int64())})
    with fs.open(f"{root}/train-00000-of-00001.parquet", "wb") as fh:
        pq.write_table(t.replace_schema_metadata(_hf_metadata(NAMES)), fh)
    spec = SplitSpec(format="parquet", url=s3.url("hf/data"))
    dec = _decoded(read_split("hf", spec, st))
    assert len(dec) == 9 and count_split_rows(spec, st) == 9
    for i in range(8):
        r = dec[f"train-00000-of-00001.parquet:{i}"]
        assert r["status"] == "ok" and r["label"] == LABELS[i]
        np.testing.assert_allclose(r["x"][0], IMGS[i] / 255.0, rtol=1e-6)
    assert dec["train-00000-of-00001.parquet:8"]["status"].startswith("fetch_error: FileNotFoundError")
    got = fetch_images(spec, ["train-00000-of-00001.parquet:6"], st)
    assert np.array_equal(got["train-00000-of-00001.parquet:6"], IMGS[6])

    def cfg(url):
        return AuditConfig.model_validate({"data": {"splits": {"hf": {"format": "parquet", "url": url}}},
                                           "model": "mlp", "checkpoints": "x", "output": {"url": "/tmp/unused"}})

    assert declared_class_names(cfg(s3.url("hf/data")), st) == NAMES
    # no schema metadata; `datasets`' dataset_info.json beside the files instead
    d = tmp_path / "saved"
    d.mkdir()
    pq.write_table(t.slice(0, 4), d / "data-00000.parquet")
    assert declared_class_names(cfg(str(d))) is None
    (d / "dataset_info.json").write_text(json.dumps({"features": {
        "image": {"_type": "Image"}, "label": {"names": NAMES[::-1], "_type": "ClassLabel"}}}))
    assert declared_class_names(cfg(str(d))) == NAMES[::-1]
    fs2, _, files = split_files(SplitSpec(format="parquet", url=str(d)), None)
    assert [f.rel for f in files] == ["data-00000.parquet"]           # dataset_info.json is not data
