"""The scorer actor: a stateful Ray Data UDF that loads its checkpoints once (``__init__``, from
their URLs) and scores batches with the engine — raw VoG and signals per example (fused), or
partial pixel moments (checkpoint-sharded and incremental audits)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ..core.labels import label_problems
from ..core.options import SIGNALS, VogOptions
from ..core.table import keep_array, result_to_table
from ..storage import StorageOptions
from .merge import moment_columns

__all__ = ["ScorerActor", "ROW_META"]

ROW_META = ("x", "id", "split", "label", "status")  # decoded-row columns that are not carried columns


class ScorerActor:
    """Takes only URLs and plain options (no object refs), so Ray can restart it after a crash."""

    def __init__(self, *, model: Any, checkpoints: list[str], indices: list[int], num_checkpoints: int,
                 vog: dict[str, Any], device: str, storage: dict[str, Any], emit: str = "vog",
                 group: int = 0, threads: int | None = None, stacked: bool | str = False,
                 moment_dtype: str = "float64"):
        import torch

        from ..core.engine import make_engine
        from ..models.checkpoints import load_checkpoints

        threads = threads or int(os.environ.get("VOG_RAY_TORCH_THREADS", "0"))  # else Ray's OMP_NUM_THREADS
        torch.set_num_threads(max(1, threads or torch.get_num_threads()))
        # diagnostics: one JSON line per batch (wall-clock start/end, rows, seconds in the engine) in
        # $VOG_RAY_TRACE_DIR/scorer-<pid>.jsonl; bench/pipeline.py takes its steady-state rate from it
        trace_dir = os.environ.get("VOG_RAY_TRACE_DIR")
        self._engine_s = 0.0
        self._trace = open(os.path.join(trace_dir, f"scorer-{os.getpid()}.jsonl"), "a", buffering=1) if trace_dir else None
        self.storage = StorageOptions(**storage)
        self.opts = VogOptions(**vog)
        self.emit = emit
        self.group = group
        self.moment_dtype = moment_dtype  # how partial moments are stored (merge.moment_columns)
        self.K = num_checkpoints
        loaded = load_checkpoints(model, checkpoints, self.storage, indices=indices)
        predict_sd = None
        if self.opts.label_mode == "predicted" and (num_checkpoints - 1) not in indices:
            predict_sd = load_checkpoints(model, checkpoints, self.storage, indices=[num_checkpoints - 1]).state_dicts[0]
        dev = device
        if device in ("auto", "cuda"):
            dev = "cuda" if torch.cuda.is_available() else "cpu"  # fake GPUs: schedule, run on CPU
        self.engine = make_engine(loaded.model, loaded.state_dicts, self.opts, dev, indices=indices,
                                  num_checkpoints=num_checkpoints, predict_state_dict=predict_sd, stacked=stacked)
        self.keys = self.engine.keys()
        self.windows = self.engine.windows

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self._trace is None:
            return self._score(batch)
        t0 = time.time()
        self._engine_s = 0.0
        out = self._score(batch)
        self._trace.write(json.dumps({"start": t0, "end": time.time(), "rows": out.num_rows,
                                      "engine_s": self._engine_s, "group": self.group}) + "\n")
        return out

    def _score(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["id"])
        status = np.asarray(batch["status"]).astype(object)
        labels = np.asarray(batch["label"]).astype(np.int64)
        x = np.asarray(batch["x"])
        ok = status == "ok"
        if ok.any():
            reasons = label_problems(labels, self.engine.num_classes_for(x[ok]),
                                     allow_missing=self.opts.label_mode != "true")
            bad = ok & (reasons != None)  # noqa: E711
            status[bad] = reasons[bad]
            ok = status == "ok"
        keep = [c for c in batch if c not in ROW_META]
        parts = []
        if ok.any():
            t = time.perf_counter()
            res = self.engine.run(x[ok], labels[ok], emit="vog" if self.emit == "vog" else "moments")
            self._engine_s = time.perf_counter() - t
            parts.append(self._table(res, batch, ok, keep))
        if (~ok).any():
            parts.append(self._rejected(batch, ~ok, status, keep))
        out = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
        assert out.num_rows == n
        return out

    def _table(self, res: Any, batch: dict[str, np.ndarray], ok: np.ndarray, keep: list[str]) -> pa.Table:
        ids = np.asarray(batch["id"])[ok]
        splits = np.asarray(batch["split"])[ok]
        labels = np.asarray(batch["label"]).astype(np.int64)[ok]
        extra = {c: np.asarray(batch[c])[ok] for c in keep}
        if self.emit == "vog":
            return result_to_table(res, ids=list(ids), split=list(splits), labels=labels, keys=self.keys,
                                   extra=extra)
        return self._moment_rows(res, ids, splits, labels, extra)

    def _moment_rows(self, res: Any, ids: np.ndarray, splits: np.ndarray, labels: np.ndarray,
                     extra: dict[str, np.ndarray]) -> pa.Table:
        """Checkpoint-sharded / incremental: partial pixel moments per example (``mn_``, ``mmean_``,
        ``mm2_`` per key, stored in ``moment_dtype``; a key whose window has no checkpoint in this
        group has n = 0)."""
        n = len(ids)
        cols: dict[str, Any] = {
            "id": pa.array([str(i) for i in ids], pa.string()),
            "split": pa.array([str(s) for s in splits], pa.string()),
            "label": pa.array(labels, pa.int64()),
            "status": pa.array(list(res.status), pa.string()),
            "group": pa.array(np.full(n, self.group, np.int64)),
            "target_label": pa.array(res.target_label, pa.int64()),
            "pred": pa.array(res.pred if res.pred is not None else np.full(n, -1, np.int64), pa.int64()),
        }
        pix = None
        for st in res.moments.values():
            pix = int(np.prod(st.mean.shape[1:]))
        for k in self.keys:
            st = res.moments.get(k)
            if st is None:  # this group holds no checkpoint of that window
                mean = m2 = np.zeros((n, pix or 1))
                cnt = 0
            else:
                mean, m2, cnt = st.mean.reshape(n, -1), st.m2.reshape(n, -1), st.n
            cols[f"mn_{k}"] = pa.array(np.full(n, cnt, np.int64))
            cols.update(moment_columns(k, mean, m2, self.moment_dtype))
        for s in SIGNALS:
            v = res.signals[s]
            cols[f"sig_{s}"] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
        for c, v in extra.items():
            cols[c] = keep_array(v)
        return pa.table(cols)

    def _rejected(self, batch: dict[str, np.ndarray], mask: np.ndarray, status: np.ndarray, keep: list[str]) -> pa.Table:
        cols: dict[str, Any] = {
            "id": pa.array([str(i) for i in np.asarray(batch["id"])[mask]], pa.string()),
            "split": pa.array([str(s) for s in np.asarray(batch["split"])[mask]], pa.string()),
            "label": pa.array(np.asarray(batch["label"]).astype(np.int64)[mask], pa.int64()),
            "status": pa.array([str(s) for s in status[mask]], pa.string()),
        }
        if self.emit != "vog":
            cols["group"] = pa.array(np.full(int(mask.sum()), self.group, np.int64))
        for c in keep:
            cols[c] = keep_array(np.asarray(batch[c])[mask])
        return pa.table(cols)
