"""Readers, decode stage and image fetches — the shared local Ray, a real S3 API on 127.0.0.1 (moto)
of this module's own: the workers' env names the session's endpoint, not this one, so every read
proves that the filesystem object carries the endpoint and the credentials."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vog_ray.config import AuditConfig, SplitSpec, TransformSpec
from vog_ray.data.cifar import CifarPickleError, load_cifar_batch
from vog_ray.data.dataset import dataset_from_config, read_split
from vog_ray.data.datasource import Piece, SplitDatasource, balanced_groups
from vog_ray.data.decode import decode, decode_batch, decode_row
from vog_ray.data.fetch import fetch_images
from vog_ray.data.listing import SourceFile, list_classes, split_files
from vog_ray.data.metadata import count_rows, count_split_rows, infer_input_shape
from vog_ray.storage import resolve
from vog_ray.testing.writers import write_cifar_batches, write_image_folder, write_npz_split, write_parquet_split

pytestmark = pytest.mark.integration

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, size=(30, 8, 8), dtype=np.uint8)           # parquet PNG, 3 files x 10
GRAY_LABELS = np.arange(30) % 10
NOISY = (np.arange(30) % 7 == 0)
RAW = RNG.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)            # parquet raw list<uint8>
RGB = RNG.integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)          # image folder
CIFAR = RNG.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)     # 2 train batches + test
CIFAR_LABELS = np.arange(12) % 10
NPZ = RNG.integers(0, 256, size=(7, 8, 8), dtype=np.uint8)
CLASSES = ["bird", "cat", "dog"]
T = TransformSpec()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def private_s3():
    """An S3 endpoint that the shared Ray's workers do not know (not the session's)."""
    from tests.s3 import s3_endpoint

    with s3_endpoint() as s3:
        yield s3


@pytest.fixture(scope="module")
def data(shared_ray, private_s3):
    """All test splits written to this module's S3 endpoint once."""
    s3 = private_s3
    st = s3.storage
    write_parquet_split(s3.url("png"), GRAY, GRAY_LABELS, {"is_noisy": NOISY}, st,
                        rows_per_file=10, row_group_size=3)
    # a fourth file with bad rows: corrupt PNG, an RGB image in a gray split, label 12
    fs, root = resolve(s3.url("png"), st)
    bad = pa.table({"image": pa.array([b"\x89PNG\r\n not really", _png(RGB[0]), _png(GRAY[0])], pa.binary()),
                    "label": pa.array([1, 2, 12], pa.int64()),
                    "is_noisy": pa.array([False, False, True])})
    with fs.open(f"{root}/part-00003.parquet", "wb") as fh:
        pq.write_table(bad, fh)
    fs.pipe_file(f"{root}/_SUCCESS", b"")                      # ignored: not a parquet file

    write_parquet_split(s3.url("raw"), RAW, np.arange(12) % 10, None, st, encode="raw", rows_per_file=6)
    # float raw arrays with a NaN pixel, as list<float> (reshaped with image_shape)
    flt = RAW[:3].astype(np.float32) / 255.0
    flt[1, 2, 3] = np.nan
    fs2, r2 = resolve(s3.url("rawf/f.parquet"), st)
    with fs2.open(r2, "wb") as fh:
        pq.write_table(pa.table({"pixels": pa.array([a.reshape(-1) for a in flt], pa.list_(pa.float32())),
                                 "y": pa.array([0, 1, 2], pa.int64()), "uid": ["a", "b", "c"]}), fh)

    folder_ids = write_image_folder(s3.url("folder"), RGB, np.arange(9) % 3, CLASSES, st)
    fs.pipe_file(f"{root.rsplit('/', 1)[0]}/folder/cat/zz_corrupt.png", b"garbage bytes")
    fs.pipe_file(f"{root.rsplit('/', 1)[0]}/folder/notes.txt", b"not a class")

    write_cifar_batches(s3.url("cifar"), CIFAR[:8], CIFAR_LABELS[:8], storage=st,
                        names=("data_batch_1", "data_batch_2"))
    write_cifar_batches(s3.url("cifar"), CIFAR[8:], CIFAR_LABELS[8:], storage=st, names=("test_batch",))
    fs.pipe_file(f"{root.rsplit('/', 1)[0]}/cifar/batches.meta", b"not read")

    write_npz_split(s3.url("npz/ood.npz"), NPZ, np.arange(7) % 10, st, tag=np.arange(7) * 10)
    return {"s3": s3, "storage": st, "folder_ids": folder_ids}


def _spec(data, fmt: str, path: str, **kw) -> SplitSpec:
    return SplitSpec(format=fmt, url=data["s3"].url(path), **kw)


def _rows(ds) -> list[dict]:
    return ds.take_all()


def _decoded(ds, transform=T, input_shape=None, **kw) -> dict[str, np.ndarray]:
    out = ds.map_batches(decode_batch, batch_format="numpy", batch_size=8,
                         fn_kwargs=dict(transform=transform, input_shape=input_shape, **kw))
    rows = out.take_all()
    return {k: np.stack([r[k] for r in rows]) if k == "x" else np.array([r[k] for r in rows], dtype=object)
            for k in rows[0]}


# ---------------------------------------------------------------------------------------------


def test_parquet_png_ids_stable_and_statuses(data):
    import ray

    # the workers' env names another endpoint (or none): the filesystem object carries this one
    assert ray.get(ray.remote(lambda: os.environ.get("AWS_ENDPOINT_URL")).remote()) != data["s3"].endpoint
    spec = _spec(data, "parquet", "png", keep_columns=["is_noisy"])
    fs, _, files = split_files(spec, data["storage"])
    assert [f.rel for f in files] == [f"part-0000{i}.parquet" for i in range(4)]     # _SUCCESS skipped
    assert len(SplitDatasource("train", spec, fs, files).get_read_tasks(7)) == 7     # row-group pieces
    a = _rows(read_split("train", spec, data["storage"], override_num_blocks=1))
    b = _rows(read_split("train", spec, data["storage"], override_num_blocks=7))  # splits row groups
    assert len(a) == len(b) == 33
    ids_a = [r["id"] for r in a]
    assert len(set(ids_a)) == 33
    key = lambda rows: {r["id"]: (r["label"], bytes(r["image"]), r["is_noisy"], r["split"]) for r in rows}  # noqa: E731
    assert key(a) == key(b)
    ka = key(a)
    for i in (0, 17, 29):
        f, row = divmod(i, 10)
        lab, img, noisy, split = ka[f"part-{f:05d}.parquet:{row}"]
        assert (lab, noisy, split) == (GRAY_LABELS[i], NOISY[i], "train")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(img))), GRAY[i])

    dec = _decoded(read_split("train", spec, data["storage"], override_num_blocks=3),
                   input_shape=(1, 8, 8), num_classes=10)
    st = dict(zip(dec["id"], dec["status"]))
    assert st["part-00003.parquet:0"] == "decode_error: cannot identify image file"
    assert st["part-00003.parquet:1"] == "bad_shape: (3,8,8) != (1,8,8)"
    assert st["part-00003.parquet:2"] == "label_out_of_range: 12 not in [0, 10)"
    assert sum(s == "ok" for s in st.values()) == 30           # rows_in == ok + rejected
    assert dec["x"].shape == (33, 1, 8, 8) and dec["x"].dtype == np.float32
    i = list(dec["id"]).index("part-00001.parquet:7")
    np.testing.assert_allclose(dec["x"][i, 0], GRAY[17] / 255.0, rtol=1e-6)
    assert not dec["x"][list(dec["id"]).index("part-00003.parquet:0")].any()   # zero x when rejected


def test_parquet_raw_arrays_and_nan(data):
    spec = _spec(data, "parquet", "raw", image_shape=[1, 8, 8])
    dec = _decoded(read_split("raw", spec, data["storage"]), input_shape=(1, 8, 8), num_classes=10)
    assert sorted(dec["id"]) == sorted(f"part-0000{f}.parquet:{r}" for f in range(2) for r in range(6))
    assert set(dec["status"]) == {"ok"}
    i = list(dec["id"]).index("part-00001.parquet:4")
    np.testing.assert_allclose(dec["x"][i, 0], RAW[10] / 255.0, rtol=1e-6)
    assert dec["label"][i] == 10 % 10

    spec = _spec(data, "parquet", "rawf/*.parquet", image_column="pixels", label_column="y",
                 id_column="uid", image_shape=[8, 8])
    dec = _decoded(read_split("rawf", spec, data["storage"]), transform=TransformSpec(scale=1.0, flatten=True),
                   input_shape=(64,))
    st = dict(zip(dec["id"], dec["status"]))
    assert st == {"a": "ok", "b": "non_finite_pixels", "c": "ok"}
    assert dec["x"].shape == (3, 64)
    np.testing.assert_allclose(dec["x"][list(dec["id"]).index("c")], RAW[2].reshape(-1) / 255.0, rtol=1e-6)


def test_image_folder(data):
    spec = _spec(data, "image_folder", "folder", keep_columns=["class_name"])
    assert list_classes(spec, data["storage"]) == CLASSES
    assert count_split_rows(spec, data["storage"]) == 10           # notes.txt at the root is not an image
    rows = _rows(read_split("folder", spec, data["storage"], override_num_blocks=2))
    ids = sorted(r["id"] for r in rows)
    assert ids == sorted(data["folder_ids"] + ["cat/zz_corrupt.png"])
    by_id = {r["id"]: r for r in rows}
    assert by_id["dog/000002.png"]["label"] == 2 and by_id["dog/000002.png"]["class_name"] == "dog"
    assert by_id["bird/000003.png"]["label"] == 0
    # explicit class names keep indices when a split holds a subset of the classes
    rows2 = _rows(read_split("f2", spec, data["storage"], class_names=["ant", "bird", "cat", "dog"]))
    assert {r["id"]: r["label"] for r in rows2}["dog/000002.png"] == 3

    dec = _decoded(read_split("folder", spec, data["storage"]),
                   transform=TransformSpec(resize=4, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
                   input_shape=(3, 4, 4), num_classes=3)
    st = dict(zip(dec["id"], dec["status"]))
    assert st.pop("cat/zz_corrupt.png") == "decode_error: cannot identify image file"
    assert set(st.values()) == {"ok"}
    i = list(dec["id"]).index("dog/000005.png")
    want = np.asarray(Image.fromarray(RGB[5]).resize((4, 4), Image.BILINEAR)).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(dec["x"][i], (want - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_cifar_batches(data):
    spec = _spec(data, "cifar", "cifar", cifar_batches="train", keep_columns=["filenames"])
    a = _rows(read_split("train", spec, data["storage"], override_num_blocks=1))
    b = _rows(read_split("train", spec, data["storage"], override_num_blocks=4))
    assert sorted(r["id"] for r in a) == sorted(r["id"] for r in b) == \
        sorted(f"data_batch_{f}:{r}" for f in (1, 2) for r in range(4))
    dec = _decoded(read_split("train", spec, data["storage"]), input_shape=(3, 32, 32), num_classes=10)
    i = list(dec["id"]).index("data_batch_2:1")
    assert dec["label"][i] == CIFAR_LABELS[5] and dec["filenames"][i] == "img_000005.png"
    np.testing.assert_allclose(dec["x"][i], CIFAR[5].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert count_split_rows(spec, data["storage"]) == 8
    assert count_split_rows(_spec(data, "parquet", "png"), data["storage"]) == 33
    test = _rows(read_split("test", _spec(data, "cifar", "cifar", cifar_batches="test"), data["storage"]))
    assert sorted(r["id"] for r in test) == [f"test_batch:{r}" for r in range(4)]


def test_npz_and_union(data):
    cfg = AuditConfig.model_validate({
        "data": {"splits": {
            "train": {"format": "parquet", "url": data["s3"].url("png/part-0000[0-2].parquet"),
                      "keep_columns": ["is_noisy"]},
            "ood": {"format": "npz", "url": data["s3"].url("npz/ood.npz"), "keep_columns": ["tag"]},
        }},
        "model": "mlp", "checkpoints": "x", "output": {"url": "/tmp/unused"},
        "storage": {"endpoint_url": data["s3"].endpoint},
    })
    assert count_rows(cfg, data["storage"]) == {"train": 30, "ood": 7}
    assert infer_input_shape(cfg, data["storage"]) == (1, 8, 8)
    rows = decode(dataset_from_config(cfg, data["storage"]), cfg).take_all()
    dec = {k: np.stack([r[k] for r in rows]) if k == "x" else np.array([r[k] for r in rows], dtype=object)
           for k in rows[0]}
    assert set(dec) == {"id", "split", "label", "x", "status", "is_noisy", "tag"}
    assert len(dec["id"]) == 37 and set(dec["status"]) == {"ok"}
    assert len({(s, i) for s, i in zip(dec["split"], dec["id"])}) == 37
    j = [k for k, (s, i) in enumerate(zip(dec["split"], dec["id"])) if s == "ood" and i == "ood.npz:5"][0]
    assert dec["tag"][j] == 50 and dec["is_noisy"][j] is None and dec["label"][j] == 5
    np.testing.assert_allclose(dec["x"][j, 0], NPZ[5] / 255.0, rtol=1e-6)


def test_fetch_images_same_pixels(data):
    st = data["storage"]
    got = fetch_images(_spec(data, "parquet", "png"), ["part-00002.parquet:9", "part-00000.parquet:4"], st)
    assert np.array_equal(got["part-00002.parquet:9"], GRAY[29])
    assert np.array_equal(got["part-00000.parquet:4"], GRAY[4])
    got = fetch_images(_spec(data, "parquet", "raw", image_shape=[8, 8]), ["part-00001.parquet:0"], st)
    assert np.array_equal(got["part-00001.parquet:0"], RAW[6])
    got = fetch_images(_spec(data, "image_folder", "folder"), ["cat/000004.png"], st)
    assert np.array_equal(got["cat/000004.png"], RGB[4])
    got = fetch_images(_spec(data, "cifar", "cifar"), ["data_batch_2:3", "test_batch:0"], st)
    assert np.array_equal(got["data_batch_2:3"], CIFAR[7]) and np.array_equal(got["test_batch:0"], CIFAR[8])
    got = fetch_images(_spec(data, "npz", "npz/ood.npz"), ["ood.npz:6"], st)
    assert np.array_equal(got["ood.npz:6"], NPZ[6])
    got = fetch_images(_spec(data, "parquet", "rawf", image_column="pixels", id_column="uid",
                             image_shape=[8, 8]), ["c"], st)
    assert np.array_equal(got["c"], RAW[2])
    with pytest.raises(KeyError, match="not found|no file"):
        fetch_images(_spec(data, "parquet", "png"), ["part-00009.parquet:0"], st)
    assert fetch_images(_spec(data, "image_folder", "folder"), ["cat/zz_corrupt.png", "cat/nope.png"], st,
                        on_error="skip") == {}


def test_malicious_cifar_pickle_refused(data, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [Evil()]}, protocol=4)
    with pytest.raises(CifarPickleError, match=r"data_batch_9: refusing to unpickle (posix|os)\.system"):
        load_cifar_batch(payload, "data_batch_9")
    assert not marker.exists()

    fs, root = resolve(data["s3"].url("evil"), data["storage"])
    fs.pipe_file(f"{root}/data_batch_1", payload)
    with pytest.raises(Exception, match="data_batch_1: refusing to unpickle"):
        read_split("evil", _spec(data, "cifar", "evil"), data["storage"]).take_all()
    assert not marker.exists()


# ---- decode without Ray ---------------------------------------------------------------------


def _batch(payloads, labels=None):
    n = len(payloads)
    img = np.empty(n, dtype=object)
    img[:] = payloads
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "split": np.array(["s"] * n, dtype=object),
            "label": np.asarray(labels if labels is not None else [0] * n, np.int64), "image": img}


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def test_decode_transforms_and_reasons():
    rgb = RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    b = _batch([_png(rgb), _png(rgb[:, :, 0]), _npy(rgb.transpose(2, 0, 1)), b"junk", None,
                _npy(np.full((4, 5), 2.0))], labels=[0, 1, 2, 3, 4, -1])
    t = TransformSpec(channels=1, resize=8, center_crop=6, scale=1 / 255)
    out = decode_batch(b, t, (1, 6, 6), num_classes=4, allow_unlabeled=True)
    assert list(out["status"][:3]) == ["ok"] * 3
    assert out["status"][3] == "decode_error: cannot identify image file"
    assert out["status"][4] == "missing_image"
    assert out["status"][5] == "ok"                                   # 4x5 gray: resize 8 → 8x10, crop 6
    assert "image" not in out and out["x"].shape == (6, 1, 6, 6)
    # gray from RGB via PIL "L" and from raw CHW via luma agree to rounding
    np.testing.assert_allclose(out["x"][0], out["x"][2], atol=2 / 255)

    out = decode_batch(b, TransformSpec(), (3, 10, 12), num_classes=3)
    assert list(out["status"]) == ["ok", "bad_shape: (1,10,12) != (3,10,12)", "ok",
                                   "decode_error: cannot identify image file", "missing_image",
                                   "bad_shape: (1,4,5) != (3,10,12)"]
    out = decode_batch(_batch([_png(rgb)], labels=[3]), TransformSpec(), None, num_classes=3)
    assert out["status"][0] == "label_out_of_range: 3 not in [0, 3)"
    keep = np.asarray(out["status"]) == "ok"
    ok = {k: np.asarray(v)[keep] for k, v in out.items()}
    rej = {k: np.asarray(v)[~keep] for k, v in out.items() if k != "x"}
    assert len(ok["id"]) == 0 and list(rej["status"]) == ["label_out_of_range: 3 not in [0, 3)"]
    assert "x" not in rej and ok["x"].shape == (0, 3, 10, 12)

    inf = np.zeros((1, 4, 4), np.float32)
    inf[0, 0, 0] = np.inf
    out = decode_batch(_batch([_npy(inf), _npy(np.ones((1, 4, 4), np.float32))]),
                       TransformSpec(scale=1.0, flatten=True), (16,))
    assert list(out["status"]) == ["non_finite_pixels", "ok"] and out["x"].shape == (2, 16)
    with pytest.raises(ValueError, match="mean has 3 values but the images have 1 channels"):
        decode_batch(_batch([_npy(np.ones((1, 4, 4)))]), TransformSpec(mean=[0, 0, 0]), (1, 4, 4))


def test_decode_batch_mixed_pixel_types_match_a_float32_loop():
    """decode_batch stacks 8-bit rows as uint8 and converts the batch once: every row must equal
    the naive per-row float32 reference (PIL → numpy → float32, × scale, (x - mean) / std), bit for
    bit, whatever else shares its batch (16-bit PNG, float64 / int16 / bool arrays, RGB → L)."""
    gray = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
    deep = RNG.integers(0, 65536, (6, 7)).astype(np.uint16)
    rgb = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    f64 = RNG.normal(0, 100, (6, 7))
    i16 = RNG.integers(-30000, 30000, (6, 7)).astype(np.int16)
    flags = RNG.integers(0, 2, (6, 7)).astype(bool)
    payloads = [_png(gray), _png(deep), _png(rgb), _npy(f64), _npy(i16), _npy(flags), _npy(gray)]

    def naive(payload) -> np.ndarray:
        if payload.startswith(b"\x93NUMPY"):
            a = np.load(io.BytesIO(payload))
            a = a.astype(np.uint8) if a.dtype == bool else a
            return a.astype(np.float32)
        img = Image.open(io.BytesIO(payload))
        if img.mode.startswith("I;16"):
            return np.asarray(img, dtype=np.float32) / np.float32(257.0)
        return np.asarray(img.convert("L") if img.mode == "RGB" else img).astype(np.float32)

    t = TransformSpec(channels=1, mean=[0.25], std=[0.5])
    out = decode_batch(_batch(payloads), t, (1, 6, 7))
    assert list(out["status"]) == ["ok"] * len(payloads) and out["x"].dtype == np.float32
    for i, p in enumerate(payloads):
        ref = (naive(p) * np.float32(t.scale) - np.float32(0.25)) / np.float32(0.5)
        np.testing.assert_array_equal(out["x"][i, 0], ref, err_msg=f"row {i}")
    # the same rows alone, and as the one-row public decode_row, give the same bits
    for i, p in enumerate(payloads):
        np.testing.assert_array_equal(decode_batch(_batch([p]), t, (1, 6, 7))["x"][0], out["x"][i])
        assert decode_row(p, t).dtype == np.float32 and decode_row(p, t).flags.c_contiguous


def test_cifar100_style_and_restricted_globals(tmp_path):
    imgs = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_cifar_batches(str(tmp_path / "c100"), imgs, [5, 6, 7, 8], names=("train",), label_key="fine_labels",
                        extra={"coarse_labels": [0, 1, 0, 1]})
    raw = (tmp_path / "c100" / "train").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw       # the Python 2 names CIFAR ships with
    d = load_cifar_batch(raw, "train")
    assert d["fine_labels"] == [5, 6, 7, 8] and d["data"].shape == (4, 3072)
    got = fetch_images(SplitSpec(format="cifar", url=str(tmp_path / "c100"), cifar_batches="train"), ["train:2"],
                       None)
    assert np.array_equal(got["train:2"], imgs[2])
    # protocol 5 pickles of numpy arrays use numpy._core.numeric._frombuffer: accepted too
    d5 = load_cifar_batch(pickle.dumps({b"data": imgs.reshape(4, -1), b"labels": [1, 2, 3, 4]}, protocol=5), "p5")
    assert np.array_equal(d5["data"], imgs.reshape(4, -1))
    with pytest.raises(CifarPickleError, match="refusing to unpickle builtins.eval"):
        load_cifar_batch(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "x")
    with pytest.raises(CifarPickleError, match="not a readable CIFAR batch"):
        load_cifar_batch(raw[:100], "truncated")


def test_balanced_groups_contiguous():
    pieces = [Piece(SourceFile(f"f{i}", f"f{i}", size)) for i, size in enumerate([5, 0, 1, 100, 3, 3, 0, 7])]
    for k in range(1, 11):
        groups = balanced_groups(pieces, k, lambda p: p.file.size)
        assert len(groups) == min(k, len(pieces)) and all(groups)
        assert [p for g in groups for p in g] == pieces


def test_fetch_never_reads_a_file_outside_the_split(tmp_path):
    """An id that names a file outside the split's directory (``../x.parquet:0``, an absolute path,
    a URL) — what a tampered or hand-written run could hold — is never read: an error, or left out
    with ``on_error="skip"``; the split's own ids still are."""
    from vog_ray.testing.writers import write_parquet_split

    imgs = (np.arange(4 * 8 * 8) % 256).astype(np.uint8).reshape(4, 8, 8)
    write_parquet_split(str(tmp_path / "split"), imgs, [0, 1, 2, 3])
    write_parquet_split(str(tmp_path / "secret"), imgs[::-1], [0, 1, 2, 3])
    spec = SplitSpec(format="parquet", url=str(tmp_path / "split"))
    outside = ["../secret/part-00000.parquet:0", str(tmp_path / "secret" / "part-00000.parquet") + ":0",
               "file:///etc/part.parquet:0"]
    for i in outside:
        with pytest.raises(KeyError, match="outside the split's directory"):
            fetch_images(spec, [i])
    got = fetch_images(spec, outside + ["part-00000.parquet:1"], on_error="skip")
    assert list(got) == ["part-00000.parquet:1"] and np.array_equal(got["part-00000.parquet:1"], imgs[1])
