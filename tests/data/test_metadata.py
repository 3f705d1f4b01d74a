"""What planning reads from metadata, without Ray: the Parquet footers (rows, columns present,
one type per column, numeric labels, one type per carried column across splits) and the
image-folder listing with symlinks — the row count and the read list agree, links leaving the
root are refused. Expected values are written out by hand."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vog_ray.config import ConfigError, validate


def _cfg(splits: dict, out: str = "/nonexistent/out") -> object:
    return validate({"data": {"splits": splits}, "model": "lenet", "checkpoints": "c/*.pt",
                     "output": {"url": out}}, "audit.yaml")


def _files(d, *tables) -> str:
    d.mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, d / f"part-{i}.parquet")
    return str(d)


def test_footers_give_rows_and_carried_types(tmp_path):
    from vog_ray.data.metadata import scan_splits

    a = pa.table({"image": pa.array([b"x"] * 3), "label": [1, 2, 3], "k": pa.array([2 ** 53 + 1, None, 3])})
    empty = pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64()),
                      "k": pa.array([], pa.null())})  # an all-null column agrees with any type
    url = _files(tmp_path / "s", a, empty, a.slice(0, 1))
    scan = scan_splits(_cfg({"s": {"format": "parquet", "url": url, "keep_columns": ["k"]}}))
    assert scan.rows_in == {"s": 4} and scan.carried_types == {"k": pa.int64()}


@pytest.mark.parametrize("second, key, text", [
    (pa.table({"image": pa.array([b"x"]), "label": [1.5], "k": [1]}), "label_column",
     "column 'label' is int64 in part-0.parquet but double in part-1.parquet"),
    (pa.table({"image": pa.array([b"x"]), "label": [1], "k": pa.array([True])}), "keep_columns",
     "column 'k' is int64 in part-0.parquet but bool in part-1.parquet"),
    (pa.table({"image": pa.array([b"x"]), "k": [1]}), "label_column",
     "has no column 'label' (set label_column: null for an unlabelled split)"),
    (pa.table({"image": pa.array([b"x"]), "label": ["1"], "k": [1]}), "label_column",
     "column 'label' is int64 in part-0.parquet but string in part-1.parquet"),
    (pa.table({"image": pa.array([1]), "label": [1], "k": [1]}), "image_column",
     "column 'image' is binary in part-0.parquet but int64 in part-1.parquet"),
])
def test_footers_refuse_what_the_reader_cannot_read(tmp_path, second, key, text):
    from vog_ray.data.metadata import scan_splits

    first = pa.table({"image": pa.array([b"x"]), "label": [1], "k": [1]})
    url = _files(tmp_path / "s", first, second)
    cfg = _cfg({"s": {"format": "parquet", "url": url, "keep_columns": ["k"]}})
    with pytest.raises(ConfigError) as e:
        scan_splits(cfg)
    assert f"invalid config audit.yaml:\n  data.splits.s.{key}: " in str(e.value) and text in str(e.value)


def test_splits_must_agree_on_a_carried_columns_type(tmp_path):
    from vog_ray.data.metadata import scan_splits

    a = _files(tmp_path / "a", pa.table({"image": pa.array([b"x"]), "label": [1], "k": [1]}))
    b = _files(tmp_path / "b", pa.table({"image": pa.array([b"x"]), "label": [1], "k": ["one"]}))
    with pytest.raises(ConfigError, match=r"data\.splits\.b\.keep_columns: carried column 'k' is string here but "
                                          r"int64 in split 'a'"):
        scan_splits(_cfg({"a": {"format": "parquet", "url": a, "keep_columns": ["k"]},
                          "b": {"format": "parquet", "url": b, "keep_columns": ["k"]}}))


def test_output_apart_from_the_inputs(tmp_path):
    from vog_ray.data.metadata import check_output_apart

    data = tmp_path / "data"
    splits = {"t": {"format": "parquet", "url": str(data / "train")}}
    check_output_apart(_cfg(splits, str(tmp_path / "vog")))
    check_output_apart(_cfg(splits, str(data / "train2")))  # a sibling that shares a prefix
    with pytest.raises(ConfigError, match=r"output\.url: .* lies inside the input of split 't'"):
        check_output_apart(_cfg(splits, str(data / "train" / "vog")))
    with pytest.raises(ConfigError, match=r"output\.url: .* holds the input of split 't'"):
        check_output_apart(_cfg(splits, str(data)))
    glob = {"t": {"format": "parquet", "url": str(data / "train" / "*.parquet")}}
    with pytest.raises(ConfigError, match="lies inside the input"):
        check_output_apart(_cfg(glob, str(data / "train" / "out")))


def _folder(root, links: dict[str, str]) -> str:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(root / c / f"{i}.png")
    for link, target in links.items():
        os.symlink(target, root / link)
    return str(root)


def test_image_folder_listing_follows_links_inside_the_root(tmp_path):
    from vog_ray.data.listing import folder_sources
    from vog_ray.data.metadata import count_split_rows

    root = tmp_path / "f"
    (root / ".store").mkdir(parents=True)
    url = _folder(root, {})
    (root / ".store" / "x.png").write_bytes((root / "a" / "0.png").read_bytes())
    os.symlink(root / ".store" / "x.png", root / "b" / "link.png")   # a file link inside the root
    os.symlink(root / "a", root / "b" / "dir-link")                   # a directory link: not followed
    spec = _cfg({"f": {"format": "image_folder", "url": url}}).data.splits["f"]
    _, _, files = folder_sources(spec, None)
    assert [f.rel for f in files] == ["a/0.png", "a/1.png", "b/0.png", "b/1.png", "b/link.png"]
    assert count_split_rows(spec) == 5


@pytest.mark.parametrize("link, target, text", [
    ("b/out.png", "{outside}", "outside the split's root"),
    ("b/gone.png", "{root}/missing.png", "which does not exist"),
    ("c", "{outside_dir}", "outside the split's root"),  # a class folder that is a link out of the root
])
def test_image_folder_links_that_leave_the_root_are_refused(tmp_path, link, target, text):
    from vog_ray.data.metadata import scan_splits

    root = tmp_path / "f"
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    (outside_dir / "o.png").write_bytes(b"x")
    url = _folder(root, {link: target.format(outside=outside_dir / "o.png", root=root, outside_dir=outside_dir)})
    with pytest.raises(ConfigError, match=rf"data\.splits\.f\.url: image_folder .*'{link}' is a symlink to .*{text}"):
        scan_splits(_cfg({"f": {"format": "image_folder", "url": url}}))
