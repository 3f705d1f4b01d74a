"""Writers of small splits in every input format (parquet, image folder, npz, CIFAR batches,
WebDataset shards, manifests of image files), for tests, benches and the demo — not part of the
audited data path."""

from __future__ import annotations

import io
import pickle
import posixpath
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ..storage import StorageOptions, resolve

__all__ = ["write_parquet_split", "write_image_folder", "write_npz_split", "write_cifar_batches",
           "write_webdataset_split", "write_manifest_split"]


def _encode_image(img: np.ndarray, encode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(img)
    if encode == "png":
        im.save(buf, format="PNG", compress_level=1)
    elif encode in ("jpeg", "jpg"):
        im.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"unknown encoding {encode!r} (png, jpeg or raw)")
    return buf.getvalue()


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))):
        raise ValueError(f"images must be uint8 [N,H,W] or [N,H,W,3], got {images.dtype} {images.shape}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    return images


def write_parquet_split(url: str, images: np.ndarray, labels: Sequence[int] | np.ndarray | None = None,
                        extra_columns: dict[str, Any] | None = None, storage: StorageOptions | None = None, *,
                        encode: str = "png", rows_per_file: int = 10000,
                        row_group_size: int | None = None, image_column: str = "image",
                        label_column: str = "label") -> list[str]:
    """Write images (uint8 ``[N,H,W]``/``[N,H,W,3]``) as ``part-00000.parquet``… under ``url``.

    ``encode``: ``"png"``/``"jpeg"`` (binary column) or ``"raw"`` (a flat ``list<uint8>`` column:
    set ``image_shape`` to ``[H, W]`` / ``[H, W, 3]`` in the split spec). Earlier ``part-*.parquet``
    files under ``url`` are removed first. Returns the URLs written.
    """
    import pyarrow.parquet as pq

    from ..storage import unstrip

    images = _check_images(images)
    n = len(images)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    for k, v in (extra_columns or {}).items():
        if len(v) != n:
            raise ValueError(f"extra column {k!r} has {len(v)} values for {n} images")
    fs, root = resolve(url, storage)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    for old in fs.glob(posixpath.join(root, "part-*.parquet")):
        fs.rm(old)
    rows_per_file = max(1, int(rows_per_file))
    written = []
    for fi, s in enumerate(range(0, max(n, 1), rows_per_file)):
        e = min(n, s + rows_per_file)
        chunk = images[s:e]
        if encode == "raw":
            flat = pa.array(chunk.reshape(-1), pa.uint8())
            col = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(images.shape[1:])))
        else:
            col = pa.array([_encode_image(im, encode) for im in chunk], pa.binary())
        cols: dict[str, Any] = {image_column: col}
        if labels is not None:
            cols[label_column] = pa.array(np.asarray(labels[s:e], np.int64))
        for k, v in (extra_columns or {}).items():
            cols[k] = pa.array(np.asarray(v)[s:e]) if not isinstance(v, pa.Array) else v.slice(s, e - s)
        path = posixpath.join(root, f"part-{fi:05d}.parquet")
        with fs.open(path, "wb") as fh:
            pq.write_table(pa.table(cols), fh, row_group_size=row_group_size or max(1, e - s))
        written.append(unstrip(fs, path))
    return written


def write_image_folder(url: str, images: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                       storage: StorageOptions | None = None, *, encode: str = "png") -> list[str]:
    """ImageNet layout: ``<url>/<class>/<i:06d>.png``. Returns the ids (relative paths)."""
    images = _check_images(images)
    fs, root = resolve(url, storage)
    root = root.rstrip("/")
    ext = "png" if encode == "png" else "jpg"
    ids = []
    for i, (im, y) in enumerate(zip(images, labels)):
        rel = f"{class_names[int(y)]}/{i:06d}.{ext}"
        p = posixpath.join(root, rel)
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        fs.pipe_file(p, _encode_image(im, encode))
        ids.append(rel)
    return ids


def write_npz_split(url: str, x: np.ndarray, y: np.ndarray | None = None,
                    storage: StorageOptions | None = None, **extra: np.ndarray) -> str:
    """One ``.npz`` file with ``x`` (and ``y``, extra arrays); written without pickle."""
    fs, path = resolve(url, storage)
    buf = io.BytesIO()
    arrays = {"x": np.asarray(x), **({"y": np.asarray(y)} if y is not None else {}),
              **{k: np.asarray(v) for k, v in extra.items()}}
    for k, v in arrays.items():
        if v.dtype == object:
            raise ValueError(f"array {k!r} has dtype object; npz splits are read without pickle")
    np.savez(buf, **arrays)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
    return url


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes ``bytes`` as protocol-2 ``BINSTRING`` like the Python 2 pickles CIFAR ships."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_bytes(self, obj: bytes) -> None:
        import struct

        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes


def write_cifar_batches(url: str, images: np.ndarray, labels: Sequence[int], *,
                        storage: StorageOptions | None = None, names: Sequence[str] = ("data_batch_1",),
                        label_key: str = "labels", extra: dict[str, Any] | None = None) -> list[str]:
    """CIFAR-style python batches (``dict`` with ``data`` uint8 ``[N, 3072]`` in CHW order).

    ``images`` uint8 ``[N,32,32,3]`` (HWC) are split evenly over ``names``; written like the
    official Python 2 pickles (protocol 2, ``numpy.core.multiarray._reconstruct``).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError("CIFAR images are uint8 [N, H, W, 3]")
    fs, root = resolve(url, storage)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    chunks = np.array_split(np.arange(len(images)), len(names))
    out = []
    for name, idx in zip(names, chunks):
        d: dict[bytes, Any] = {
            b"batch_label": f"{name} of {len(names)}".encode(),
            label_key.encode(): [int(labels[i]) for i in idx],
            b"data": np.ascontiguousarray(images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1)),
            b"filenames": [f"img_{i:06d}.png".encode() for i in idx],
        }
        for k, v in (extra or {}).items():
            d[k.encode()] = [v[i] for i in idx]
        buf = io.BytesIO()
        _Py2StylePickler(buf, protocol=2).dump(d)
        data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        p = posixpath.join(root, name)
        fs.pipe_file(p, data)
        out.append(p)
    return out


def _tar_member(name: str, data: bytes):
    import tarfile

    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    return ti, io.BytesIO(data)


def write_webdataset_split(url: str, images: np.ndarray, labels: Sequence[int] | None = None,
                           storage: StorageOptions | None = None, *, samples_per_shard: int = 100,
                           encode: str = "png", json_fields: dict[str, Sequence[Any]] | None = None,
                           interleave: bool = False, label_member: str = "cls") -> list[str]:
    """WebDataset shards ``shard-00000.tar``… under ``url``: per sample ``<key>.<png|jpg>``, the
    label as text in ``<key>.<label_member>`` and ``json_fields`` in ``<key>.json``. ``interleave``
    writes every shard's image members first and its label/json members after them (a shard not
    sorted by key, as ``tar`` without ``--sort=name`` makes). Returns the ids ``<shard>:<key>``."""
    import json
    import tarfile

    images = _check_images(images)
    fs, root = resolve(url, storage)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    ids = []
    ext = "png" if encode == "png" else "jpg"
    for si, s in enumerate(range(0, len(images), samples_per_shard)):
        name = f"shard-{si:05d}.tar"
        first, second = [], []
        for i in range(s, min(len(images), s + samples_per_shard)):
            key = f"sample{i:06d}"
            ids.append(f"{name}:{key}")
            first.append(_tar_member(f"{key}.{ext}", _encode_image(images[i], encode)))
            rest = second if interleave else first
            if labels is not None:
                rest.append(_tar_member(f"{key}.{label_member}", str(int(labels[i])).encode()))
            if json_fields:
                doc = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in json_fields.items()}
                rest.append(_tar_member(f"{key}.json", json.dumps(doc).encode()))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for ti, data in first + second:
                tf.addfile(ti, data)
        fs.pipe_file(posixpath.join(root, name), buf.getvalue())
    return ids


def write_manifest_split(url: str, images: np.ndarray, labels: Sequence[int] | None = None,
                         storage: StorageOptions | None = None, *, table: str = "parquet",
                         image_dir: str = "images", absolute: bool = False, encode: str = "png",
                         extra_columns: dict[str, Sequence[Any]] | None = None) -> list[str]:
    """Images as files ``<dir of url>/<image_dir>/<i:06d>.png`` and a manifest at ``url``
    (``table``: parquet, csv or jsonl) with columns ``uri`` (relative to the manifest, or the
    absolute URL with ``absolute``), ``label`` and ``extra_columns``. Returns the URIs."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from ..storage import unstrip

    images = _check_images(images)
    fs, path = resolve(url, storage)
    base = posixpath.dirname(path)
    ext = "png" if encode == "png" else "jpg"
    uris = []
    for i, im in enumerate(images):
        rel = f"{image_dir}/{i:06d}.{ext}"
        p = posixpath.join(base, rel)
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        fs.pipe_file(p, _encode_image(im, encode))
        uris.append(unstrip(fs, p) if absolute else rel)
    cols: dict[str, Any] = {"uri": pa.array(uris, pa.string())}
    if labels is not None:
        cols["label"] = pa.array(np.asarray(labels, np.int64))
    for k, v in (extra_columns or {}).items():
        cols[k] = pa.array(list(v))
    t = pa.table(cols)
    buf = io.BytesIO()
    if table == "parquet":
        pq.write_table(t, buf)
    elif table == "csv":
        pacsv.write_csv(t, buf)
    elif table == "jsonl":
        import json

        buf.write("".join(json.dumps(r) + "\n" for r in t.to_pylist()).encode())
    else:
        raise ValueError(f"unknown manifest table {table!r} (parquet, csv or jsonl)")
    fs.pipe_file(path, buf.getvalue())
    return uris
