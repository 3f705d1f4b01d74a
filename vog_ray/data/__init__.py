"""The audited data: listing a split's files, reading every format into the same rows (Ray
Data), the decode stage, row counts and the model input shape from metadata, and image fetches
for reports. Every split becomes rows with the same columns, whatever its format:

=========  =========================================================================
``id``     string, stable across runs and independent of the block layout (below)
``split``  the split name
``label``  int64; ``-1`` when the split has no label column (or the label is null)
``image``  binary: the encoded file (PNG/JPEG/…) or, for raw arrays, ``.npy`` bytes
``…``      the split's ``keep_columns``
=========  =========================================================================

One binary ``image`` column for every format keeps the schema of a union of splits uniform
(encoded and raw splits mix), lets raw images of any shape travel, and leaves *all* decoding to
:func:`~vog_ray.data.decode.decode_batch`, where a bad row becomes a ``status`` reason instead of
a failed task.

Ids (what :func:`~vog_ray.data.fetch.fetch_images` reads back):

* ``parquet`` — the ``id_column`` when given, else ``"<file>:<row>"``: the file's path relative to
  the split's base directory and the row index within that file (``"part-00000.parquet:17"``);
* ``image_folder`` — the image's path relative to the root (``"cat/0001.png"``; a symlink inside
  the root keeps its own path as id, and is read as its target);
* ``cifar`` — ``"<batch file>:<row>"`` (``"data_batch_1:123"``), or the ``id_column`` (e.g. ``filenames``);
* ``npz`` — ``"<file>:<row>"`` (``"ood.npz:5"``), or the ``id_column`` array.

The base directory of a split is the directory a URL names, the parent of a single file, the
fixed prefix of a glob, and the common directory of those for a list of URLs.

Readers never drop a row: every row read leaves ``decode_batch`` either with ``status == "ok"``
or with a reason, so ``rows_in == rows_scored + rows_rejected``; ``count_rows`` gives ``rows_in``
per split from metadata, without a Ray job.

The pipeline: ``decode.decode(dataset_from_config(cfg, storage), cfg)`` → rows with ``id``,
``split``, ``label``, ``x`` (float32), ``status`` and the keep columns. Names are re-exported
lazily: importing this package imports neither Ray nor torch. The decode stage itself is
``vog_ray.data.decode.decode`` (``vog_ray.data.decode`` is its module).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SourceFile": "listing", "list_split_files": "listing", "split_files": "listing", "list_classes": "listing",
    "IMAGE_EXTENSIONS": "listing", "PARQUET_EXTENSIONS": "listing",
    "ROW_COLUMNS": "rows", "NPY_MAGIC": "rows", "OK": "rows",
    "load_cifar_batch": "cifar", "CifarPickleError": "cifar",
    "read_split": "dataset", "dataset_from_config": "dataset",
    "decode_batch": "decode",
    "count_rows": "metadata", "count_split_rows": "metadata", "infer_input_shape": "metadata",
    "scan_splits": "metadata", "check_output_apart": "metadata",
    "split_inputs": "identity", "inputs_identity": "identity",
    "fetch_images": "fetch",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vog_ray.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
