"""A small real run for the explorer's tests: a Ray audit of sklearn's 8×8 digits with the tiny
CNN of ``TinyDigits`` (3 checkpoints), built once per session (``explore_run`` in conftest).

Its strings are hostile on purpose: a class named ``<script>alert(1)</script>``, an id
``"><img src=x onerror=alert(2)>``, a keep column named ``<b>grp</b>`` whose values hold markup,
so every page and export can be checked for escaping. Splits: ``train`` (PNG Parquet, ids from
an ``id_column``, keep columns ``is_noisy`` and ``<b>grp</b>``, one undecodable row that ends up
rejected) and ``test`` (PNG Parquet, ids ``<file>:<row>``, which name files). The config has a
``flags`` section (top 10%, ``is_noisy`` as the ground truth; ``test``: top 20% and label ≠
prediction).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EVIL_CLASS = "<script>alert(1)</script>"
EVIL_ID = '"><img src=x onerror=alert(2)>'
EVIL_COLUMN = "<b>grp</b>"
EVIL_VALUE = "<i>tilted</i>"
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", EVIL_CLASS]
N_TRAIN, N_TEST = 240, 100
BAD_ID = "bad-bytes"


@dataclass
class ExploreRun:
    url: str                 # the published run
    root: Path
    splits: dict             # the config's data.splits
    images: dict             # split -> id -> uint8 image as stored


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def build(tiny, root: Path) -> ExploreRun:
    """Write the splits, run the audit on the test Ray (the caller's: the suite's shared Ray)."""
    from vog_ray.config import validate
    from vog_ray.distributed.audit import run_audit

    rng = np.random.default_rng(7)
    imgs, labels = tiny.imgs, tiny.labels
    ids = [f"d-{i:04d}" for i in range(N_TRAIN)]
    ids[17] = EVIL_ID
    noisy = rng.random(N_TRAIN) < 0.2
    y = labels[:N_TRAIN].copy()
    y[noisy] = (y[noisy] + rng.integers(1, 10, int(noisy.sum()))) % 10
    grp = np.where(rng.random(N_TRAIN) < 0.5, EVIL_VALUE, "plain")
    (root / "train").mkdir(parents=True)
    payloads = [png(imgs[i]) for i in range(N_TRAIN)] + [b"\x89PNG\r\n\x1a\n not an image"]
    pq.write_table(pa.table({"key": ids + [BAD_ID], "image": pa.array(payloads, pa.binary()),
                             "label": pa.array(list(y) + [1], pa.int64()),
                             "is_noisy": pa.array(list(noisy) + [False]), EVIL_COLUMN: list(grp) + ["plain"]}),
                   root / "train" / "part-0.parquet", row_group_size=64)
    (root / "test").mkdir()
    test_idx = range(600, 600 + N_TEST)
    for part, chunk in enumerate((list(test_idx)[:50], list(test_idx)[50:])):
        pq.write_table(pa.table({"image": pa.array([png(imgs[i]) for i in chunk], pa.binary()),
                                 "label": pa.array(labels[chunk], pa.int64())}),
                       root / "test" / f"part-{part}.parquet")
    splits = {
        "train": {"format": "parquet", "url": str(root / "train"), "id_column": "key",
                  "keep_columns": ["is_noisy", EVIL_COLUMN]},
        "test": {"format": "parquet", "url": str(root / "test")},
    }
    cfg = tiny.config(splits, str(root / "out"), data={"splits": splits, "class_names": CLASS_NAMES},
                      vog={"windows": {"early": "first:2", "late": "last:2", "all": "all"},
                           "targets": ["logit", "softmax"]},
                      flags={"top_percent": 10, "ground_truth": "is_noisy",
                             "splits": {"test": {"top_percent": 20, "label_mismatch": True}}})
    res = run_audit(validate(cfg), report=False)
    images = {"train": {i: imgs[k] for k, i in enumerate(ids)},
              "test": {f"part-{p}.parquet:{r}": imgs[600 + 50 * p + r] for p in (0, 1) for r in range(50)}}
    return ExploreRun(res.run_url, root, splits, images)
