"""Score-table rows (one per example): column names, the engine's output as Arrow, and the
one conversion of carried (``keep_columns``) values to Arrow. Imports neither torch nor Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from .options import SIGNALS

if TYPE_CHECKING:  # pragma: no cover
    from .engine import BatchResult

__all__ = ["keep_array", "vog_col", "z_col", "result_to_table", "dictionary_columns"]

# score-table columns whose values are (nearly) all distinct besides the floating-point ones
DISTINCT_COLUMNS = ("id", "rank", "class_rank")


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


def result_to_table(res: "BatchResult", *, ids: Sequence[str], split: Sequence[str] | str,
                    labels: np.ndarray | None, keys: Sequence[str],
                    extra: dict[str, Any] | None = None) -> pa.Table:
    """One batch's engine output as score-table rows (before normalisation and ranks)."""
    N = len(ids)
    labels = np.full(N, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    splits = [split] * N if isinstance(split, str) else list(split)
    pred = res.pred if res.pred is not None else np.full(N, -1, np.int64)
    correct = pa.array(np.where(labels >= 0, pred == labels, False), mask=labels < 0)
    cols: dict[str, Any] = {
        "id": pa.array([str(i) for i in ids], pa.string()),
        "split": pa.array(splits, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "target_label": pa.array(res.target_label, pa.int64()),
        "pred": pa.array(pred, pa.int64()),
        "correct": correct,
        "status": pa.array(list(res.status), pa.string()),
    }
    for k in keys:
        cols[vog_col(k)] = pa.array(res.vog[k], pa.float64())
    for s in SIGNALS:
        v = res.signals[s]
        typ = pa.int64() if s == "pred" else pa.int8() if s == "correct" else pa.float32()
        flat = pa.array(v.reshape(-1).astype(typ.to_pandas_dtype()), typ)
        cols[f"sig_{s}"] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
    for name, vals in (extra or {}).items():
        cols[name] = vals if isinstance(vals, (pa.Array, pa.ChunkedArray)) else keep_array(vals)
    return pa.table(cols)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns of a score table worth Parquet dictionary encoding (``use_dictionary``): all but
    ids, ranks and floating-point values (also lists of them), which are (nearly) all distinct —
    encoding those builds a dictionary per column only to fall back to plain: a 100k-row score
    table writes 6x faster without, and no larger (bench/reduce.py, README "Development")."""
    def floating(t: pa.DataType) -> bool:
        return pa.types.is_floating(t) or (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) \
            and pa.types.is_floating(t.value_type)

    return [f.name for f in schema if f.name not in DISTINCT_COLUMNS and not floating(f.type)]
