"""Score-table rows (one per example): column names, the engine's output as Arrow, and the
one conversion of carried (``keep_columns``) values to Arrow. Imports neither torch nor Ray."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["keep_array", "vog_col", "z_col"]


def vog_col(key: str) -> str:
    """The raw-VoG column of ``<window>_<target>``."""
    return f"vog_{key}"


def z_col(key: str) -> str:
    """The normalised-VoG column of ``<window>_<target>``."""
    return f"z_{key}"


def keep_array(values: Any) -> pa.Array:
    """A carried column as Arrow: Arrow values as they are; numpy values converted (bytes decoded
    as UTF-8, arrays of rows as lists). A column of only missing values becomes a null-typed
    column, so blocks of splits that lack the column unify with blocks that hold it."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    v = np.asarray(values)
    if v.dtype.kind == "S" or (v.dtype == object and len(v) and isinstance(v.flat[0], bytes)):
        return pa.array([x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v.tolist()])
    if v.ndim > 1:
        return pa.array(list(v))
    if v.dtype == object:
        if all(x is None or (isinstance(x, float) and np.isnan(x)) for x in v):
            return pa.nulls(len(v))
        return pa.array(list(v), from_pandas=True)
    if v.dtype.kind == "f" and len(v) and np.isnan(v).all():
        return pa.nulls(len(v))
    return pa.array(v)
