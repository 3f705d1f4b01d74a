"""Read the columns a report needs from a published run, streaming, into compact arrays.

The score table is read in record batches (``Run.iter_scores`` with only the needed columns);
the per-checkpoint signal lists are reduced per batch to the few per-example numbers the report
uses (last value, mean, std, forgetting events), so a table of millions of rows with hundreds of
checkpoints never sits in memory as lists. What stays is ``O(rows)`` numbers: ids, split codes,
labels, raw VoG and z per key, and about a dozen reduced signals (float32; EL2N averaged over
each window's checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..runs import Run
from ..storage import resolve
from .common import ReportError

__all__ = ["Frame", "load_frame", "score_schema", "LAST_SIGNALS", "forgetting_events", "data_map"]

# per-checkpoint signals whose LAST value the report uses (OoD baselines and more)
LAST_SIGNALS = ("loss", "label_logit", "label_prob", "margin", "max_prob", "max_logit", "energy",
                "el2n", "entropy")


def score_schema(run: Run) -> pa.Schema:
    """The schema of the score table, read from the first file's footer (no data)."""
    fs, path = resolve(run.path("scores"), run.storage)
    if not fs.exists(path):
        raise ReportError(f"run {run.url!r} has no score table (missing scores/)")
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet")) if fs.isdir(path) else [path]
    if not files:
        raise ReportError(f"run {run.url!r} has an empty score table (no scores/*.parquet)")
    with fs.open(files[0], "rb") as f:
        return pq.read_schema(f)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Count of correct→incorrect transitions between consecutive checkpoints, per row.

    ``correct``: ``[N, K]`` of 1 / 0, with -1 where the label is unknown (→ NaN).
    """
    c = np.asarray(correct)
    out = ((c[:, :-1] == 1) & (c[:, 1:] == 0)).sum(axis=1).astype(np.float32)
    out[(c < 0).any(axis=1)] = np.nan
    return out


def _nanmean_rows(m: np.ndarray) -> np.ndarray:
    """Row means over the finite entries (NaN for a row with none), without warnings."""
    ok = np.isfinite(m)
    cnt = ok.sum(axis=1)
    tot = np.where(ok, m, 0).sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (tot / cnt).astype(np.float32)


def data_map(label_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Data-map coordinates (Swayamdipta et al., 2020): confidence = mean probability at the
    target index across checkpoints, variability = its population std (ddof = 0)."""
    p = np.asarray(label_prob, np.float64)
    return p.mean(axis=1).astype(np.float32), p.std(axis=1).astype(np.float32)


@dataclass
class Frame:
    """The report's view of a score table (rows with a score only)."""

    split_names: list[str]
    split: np.ndarray                      # int32 codes into split_names
    ids: pa.Array                          # string
    label: np.ndarray                      # int64, -1 unknown
    target: np.ndarray                     # int64 (class used for normalisation)
    pred: np.ndarray                       # int64
    correct: np.ndarray                    # float32: 1 correct, 0 wrong, NaN unknown
    rank: np.ndarray                       # int64 (primary key, within split)
    class_rank: np.ndarray                 # int64
    vog: dict[str, np.ndarray] = field(default_factory=dict)    # key -> float64
    z: dict[str, np.ndarray] = field(default_factory=dict)      # key -> float64
    sig: dict[str, np.ndarray] = field(default_factory=dict)    # reduced signals -> float32
    flags: dict[str, np.ndarray] = field(default_factory=dict)  # column -> float32 1/0/NaN
    group: np.ndarray | None = None                             # object (str or None)
    num_checkpoints: int = 0

    @property
    def n(self) -> int:
        return len(self.split)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == self.split_names.index(split))


def _list_matrix(arr: pa.Array, dtype) -> np.ndarray:
    """``[n, K]`` numpy matrix of a per-checkpoint list column; null lists become NaN / -1 rows.

    Accepts fixed-size lists (the score table's type), variable lists of one common length,
    and Ray's tensor extension arrays."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    fill = np.nan if np.issubdtype(dtype, np.floating) else -1
    if isinstance(arr.type, pa.ExtensionType) and hasattr(arr, "to_numpy_ndarray"):
        return np.asarray(arr.to_numpy_ndarray()).reshape(n, -1).astype(dtype, copy=False)
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False) if arr.null_count else None
    if pa.types.is_fixed_size_list(arr.type):
        K = arr.type.list_size
        vals = arr.values.slice(arr.offset * K, n * K)
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        K = int(lens.max()) if n else 0
        if np.any(lens[valid if valid is not None else slice(None)] != K):
            raise ReportError("per-checkpoint signal lists differ in length within the score table")
        if valid is not None:
            arr = pc.if_else(pc.is_valid(arr), arr, pa.scalar([0] * K, arr.type))
        vals = pc.list_flatten(arr)
    else:
        raise ReportError(f"per-checkpoint signal column has type {arr.type}, expected a list")
    if vals.null_count:
        vals = pc.fill_null(vals, 0)
    m = vals.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(n, K)
    if valid is not None:
        m = m.copy()
        m[~valid] = fill
    return m


def _flag_values(col: pa.Array, name: str) -> np.ndarray:
    t = col.type
    if not (pa.types.is_boolean(t) or pa.types.is_integer(t)):
        raise ReportError(f"flag column {name!r} must be boolean (or 0/1 integers), found {t}")
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    v = pc.fill_null(col.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(t) and np.any((v[valid] != 0) & (v[valid] != 1)):
        raise ReportError(f"flag column {name!r} holds values other than 0/1 "
                          f"(e.g. {int(v[valid][(v[valid] != 0) & (v[valid] != 1)][0])})")
    out = v.astype(np.float32)
    out[~valid] = np.nan
    return out


def _frame_columns(run: Run, schema: pa.Schema, keys: Sequence[str], flag_columns: Sequence[str],
                   group_column: str | None) -> tuple[list[str], list[str]]:
    """``(columns to read, signal columns present)``; a column the report needs that the score
    table lacks is a :class:`ReportError` naming it."""
    names = set(schema.names)
    base = ["id", "split", "label", "target_label", "pred", "correct", "rank", "class_rank"]
    need = list(base) + [f"vog_{k}" for k in keys] + [f"z_{k}" for k in keys]
    missing = [c for c in need if c not in names]
    if missing:
        raise ReportError(f"score table of run {run.url!r} lacks column(s) {missing}")
    for c in flag_columns:
        if c not in names:
            raise ReportError(f"flag column {c!r} (report.flag_columns) is not a column of the "
                              f"score table; columns carried from the data: "
                              f"{sorted(n for n in names if not _is_core(n))}")
    if group_column is not None and group_column not in names:
        raise ReportError(f"OoD group column {group_column!r} (report.ood.group_column) is not a "
                          "column of the score table")
    sig_cols = [c for c in ("sig_loss", "sig_margin", "sig_label_prob", "sig_correct", "sig_entropy")
                + tuple(f"sig_{s}" for s in LAST_SIGNALS) if c in names]
    sig_cols = list(dict.fromkeys(sig_cols))
    columns = need + sig_cols + list(flag_columns) + ([group_column] if group_column else [])
    return list(dict.fromkeys(columns)), sig_cols


class _FrameParts:
    """The per-batch pieces of a :class:`Frame`, concatenated at the end."""

    def __init__(self) -> None:
        self.split_codes: dict[str, int] = {}
        self.acc: dict[str, list[Any]] = {}
        self.K = 0

    def put(self, name: str, v: Any) -> None:
        self.acc.setdefault(name, []).append(v)

    def add(self, batch: pa.Table, keys: Sequence[str], sig_cols: list[str], flag_columns: Sequence[str],
            group_column: str | None, windows: dict[str, list[int]] | None) -> None:
        put = self.put
        splits = batch.column("split").to_numpy(zero_copy_only=False).astype(str)
        uniq, inv = np.unique(splits, return_inverse=True)
        codes = np.array([self.split_codes.setdefault(str(u), len(self.split_codes)) for u in uniq], np.int32)
        put("split", codes[inv])
        put("ids", batch.column("id").cast(pa.string()))
        for c, dst in (("label", "label"), ("target_label", "target"), ("pred", "pred"),
                       ("rank", "rank"), ("class_rank", "class_rank")):
            put(dst, pc.fill_null(batch.column(c), -1).to_numpy(zero_copy_only=False).astype(np.int64))
        cv = pc.fill_null(batch.column("correct").cast(pa.float32()), np.nan).to_numpy(zero_copy_only=False)
        put("correct", cv.astype(np.float32))
        for k in keys:
            for p in ("vog", "z"):
                put(f"{p}_{k}", pc.fill_null(batch.column(f"{p}_{k}").cast(pa.float64()), np.nan)
                    .to_numpy(zero_copy_only=False))
        self._signals(batch, sig_cols, windows)
        for c in flag_columns:
            put(f"f:{c}", _flag_values(batch.column(c), c))
        if group_column:
            g = batch.column(group_column).to_pylist()
            put("group", np.array([None if v is None else str(v) for v in g], dtype=object))

    def _signals(self, batch: pa.Table, sig_cols: list[str], windows: dict[str, list[int]] | None) -> None:
        put = self.put
        for s in ("loss", "margin", "entropy"):
            if f"sig_{s}" in sig_cols:
                put(f"s:mean_{s}", _nanmean_rows(_list_matrix(batch.column(f"sig_{s}"), np.float32)))
        if "sig_el2n" in sig_cols and windows:
            el2n = _list_matrix(batch.column("sig_el2n"), np.float32)
            for w, idx in windows.items():
                put(f"s:el2n_{w}", _nanmean_rows(el2n[:, list(idx)]))
        if "sig_label_prob" in sig_cols:
            conf, var = data_map(_list_matrix(batch.column("sig_label_prob"), np.float32))
            put("s:confidence", conf)
            put("s:variability", var)
        if "sig_correct" in sig_cols:
            cm = _list_matrix(batch.column("sig_correct"), np.int16)
            self.K = max(self.K, cm.shape[1])
            put("s:forgetting", forgetting_events(cm))
        for s in LAST_SIGNALS:
            if f"sig_{s}" in sig_cols:
                m = _list_matrix(batch.column(f"sig_{s}"), np.float32)
                self.K = max(self.K, m.shape[1])
                put(f"s:last_{s}", m[:, -1].copy())

    def frame(self, keys: Sequence[str], group_column: str | None) -> Frame:
        acc = self.acc

        def cat(name: str) -> np.ndarray:
            return np.concatenate(acc[name])

        ids = pa.concat_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in acc["ids"]])
        fr = Frame(split_names=[s for s, _ in sorted(self.split_codes.items(), key=lambda kv: kv[1])],
                   split=cat("split"), ids=ids, label=cat("label"), target=cat("target"),
                   pred=cat("pred"), correct=cat("correct"), rank=cat("rank"),
                   class_rank=cat("class_rank"), num_checkpoints=self.K)
        for k in keys:
            fr.vog[k] = cat(f"vog_{k}")
            fr.z[k] = cat(f"z_{k}")
        for name in acc:
            if name.startswith("s:"):
                fr.sig[name[2:]] = cat(name)
            elif name.startswith("f:"):
                fr.flags[name[2:]] = cat(name)
        if group_column:
            fr.group = cat("group")
        return fr


def load_frame(run: Run, keys: Sequence[str], *, flag_columns: Sequence[str] = (),
               group_column: str | None = None, schema: pa.Schema | None = None,
               windows: dict[str, list[int]] | None = None, batch_size: int = 65536) -> Frame:
    """Stream the needed columns of ``run``'s ranked rows (rows without a rank — a class the
    reference split lacks — are left out) into a :class:`Frame`; ``windows`` (name -> checkpoint
    indices): EL2N is averaged over each (``el2n_<window>``)."""
    columns, sig_cols = _frame_columns(run, schema or score_schema(run), keys, flag_columns, group_column)
    parts = _FrameParts()
    for batch in run.iter_scores(columns=columns, batch_size=batch_size):
        keep = pc.is_valid(batch.column("rank"))
        if batch.num_rows and pc.sum(keep).as_py() != batch.num_rows:
            batch = batch.filter(keep)
        if batch.num_rows:
            parts.add(batch, keys, sig_cols, flag_columns, group_column, windows)
    if not parts.acc:
        raise ReportError(f"run {run.url!r} has no scored rows (the score table is empty)")
    return parts.frame(keys, group_column)


_CORE = ("id", "split", "label", "target_label", "pred", "correct", "score", "rank",
         "class_rank", "percentile", "decile", "status")


def _is_core(name: str) -> bool:
    return name in _CORE or name.startswith(("vog_", "z_", "sig_"))
