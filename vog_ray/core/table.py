"""Score-table rows (one per example): column names, the engine's output as Arrow, and the
one conversion of carried (``keep_columns``) values to Arrow. Imports neither torch nor Ray."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from .options import SIGNALS

if TYPE_CHECKING:  # pragma: no cover
    from .engine import BatchResult

__all__ = ["keep_array", "vog_col", "z_col", "result_to_table", "non_finite_status", "dictionary_columns"]

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


def _strings(values: Any) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.cast(pa.string())
        return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return pa.array([str(v) for v in values], pa.string())


def non_finite_status(status: Sequence[Any], vog: dict[str, np.ndarray], keys: Sequence[str]) -> list[str]:
    """``status`` with every ``ok`` row whose raw VoG is not finite under some key (NaN or inf
    gradients) turned into ``non_finite_vog: <key>``: such a row cannot be normalised or ranked."""
    out = [str(s) for s in status]
    for k in keys:
        bad = ~np.isfinite(np.asarray(vog[k], np.float64))
        for i in np.flatnonzero(bad):
            if out[i] == "ok":
                out[i] = f"non_finite_vog: {k}"
    return out


def result_to_table(res: "BatchResult", *, ids: Any, split: Any,
                    labels: np.ndarray | None, keys: Sequence[str],
                    extra: dict[str, Any] | None = None) -> pa.Table:
    """One batch's engine output as score-table rows (before normalisation and ranks). ``ids`` and
    ``split`` (a sequence, an Arrow array, or one split name) become strings; a row whose VoG is
    not finite gets the status ``non_finite_vog: <key>`` (a rejected row, never a z of 0)."""
    N = len(ids)
    labels = np.full(N, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    pred = res.pred if res.pred is not None else np.full(N, -1, np.int64)
    correct = pa.array(np.where(labels >= 0, pred == labels, False), mask=labels < 0)
    cols: dict[str, Any] = {
        "id": _strings(ids),
        "split": pa.array([split] * N, pa.string()) if isinstance(split, str) else _strings(split),
        "label": pa.array(labels, pa.int64()),
        "target_label": pa.array(res.target_label, pa.int64()),
        "pred": pa.array(pred, pa.int64()),
        "correct": correct,
        "status": pa.array(non_finite_status(res.status, res.vog, keys), pa.string()),
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
