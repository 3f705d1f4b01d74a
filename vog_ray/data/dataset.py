"""The Ray Datasets of the audited splits: one split's rows (:func:`read_split`) and the union
of a config's splits (:func:`dataset_from_config`). Readers never drop a row: a bad row leaves
the decode stage with a ``status`` reason. Imports Ray only inside the functions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pyarrow as pa

from ..storage import StorageOptions
from .image_folder import read_image_folder
from .listing import split_files

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from ..config import AuditConfig, SplitSpec

__all__ = ["read_split", "dataset_from_config"]


def read_split(name: str, spec: "SplitSpec", storage: StorageOptions | None = None, *,
               override_num_blocks: int | None = None,
               class_names: Sequence[str] | None = None) -> "ray.data.Dataset":
    """A Ray Dataset of one split's rows (``id``, ``split``, ``label``, ``image``, keep columns).

    ``class_names`` (image folders): label = index of the folder name in this list instead of in
    the sorted folder names, so a split whose folders are a subset of the classes keeps the
    training indices; a folder that is not in the list is an error.
    """
    import ray.data

    from .datasource import SplitDatasource

    storage = storage or StorageOptions()
    if spec.format == "image_folder":
        return read_image_folder(name, spec, storage, override_num_blocks=override_num_blocks,
                                 class_names=class_names)
    if spec.format not in ("parquet", "cifar", "npz", "webdataset", "manifest"):
        raise ValueError(f"split {name!r}: unknown format {spec.format!r}")
    fs, _, files = split_files(spec, storage)
    return ray.data.read_datasource(SplitDatasource(name, spec, fs, files, storage=storage),
                                    override_num_blocks=override_num_blocks)


def dataset_from_config(cfg: "AuditConfig", storage: StorageOptions | None = None, *,
                        override_num_blocks: int | None = None,
                        splits: Sequence[str] | None = None,
                        carried_types: dict[str, pa.DataType] | None = None) -> "ray.data.Dataset":
    """The union of the config's splits (or of ``splits``), in config order.

    Splits whose keep columns differ union fine: a column a split lacks is null in its rows, of
    the column's type in ``carried_types`` (``metadata.scan_splits``) when known.
    """
    storage = storage or cfg.storage.options()
    blocks = override_num_blocks or cfg.compute.read_blocks
    names = list(splits) if splits is not None else list(cfg.data.splits)
    unknown = [s for s in names if s not in cfg.data.splits]
    if unknown:
        raise KeyError(f"unknown split(s) {unknown}; the config has {list(cfg.data.splits)}")
    all_keep = list(dict.fromkeys(k for s in names for k in cfg.data.splits[s].keep_columns))
    dss = []
    for s in names:
        spec = cfg.data.splits[s]
        ds = read_split(s, spec, storage, override_num_blocks=blocks, class_names=cfg.data.class_names)
        missing = [k for k in all_keep if k not in spec.keep_columns]
        if missing:
            types = {k: (carried_types or {}).get(k, pa.null()) for k in missing}
            ds = ds.map_batches(_add_null_columns, batch_format="pyarrow", batch_size=None,
                                zero_copy_batch=True, fn_kwargs={"columns": types})
        dss.append(ds)
    return dss[0] if len(dss) == 1 else dss[0].union(*dss[1:])


def _add_null_columns(batch: pa.Table, *, columns: dict[str, pa.DataType]) -> pa.Table:
    """A batch with all-null ``columns`` (name → type) appended (keep columns its split lacks)."""
    for c, t in columns.items():
        batch = batch.append_column(c, pa.nulls(batch.num_rows, t))
    return batch
