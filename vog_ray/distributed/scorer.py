"""The scorer actor: a stateful Ray Data UDF that loads its checkpoints once (``__init__``, from
their URLs) and scores batches with the engine — raw VoG and signals per example (fused), or
partial pixel moments (checkpoint-sharded and incremental audits). It reports the device it runs
on and the rows it scores to the stage's ledger (:mod:`.devices`). On a GPU it may decode the
JPEG rows itself (``transform.decode_on: gpu``), runs each call's engine batches with their copies
overlapped, and in tf32/bf16 checks its first batch against fp32 (written beside the work)."""

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
from ..storage import StorageOptions, atomic_write, join
from .merge import moment_columns

__all__ = ["ScorerActor", "ROW_META"]

ROW_META = ("x", "image", "id", "split", "label", "status")  # row columns that are not carried columns


def _rows(x: Any, mask: np.ndarray) -> Any:
    """The rows of ``x`` (numpy, or a torch tensor on any device) where ``mask`` holds."""
    if isinstance(x, np.ndarray):
        return x[mask]
    import torch

    return x[torch.from_numpy(mask).to(x.device)]


class ScorerActor:
    """Takes only URLs and plain options (no object refs), so Ray can restart it after a crash."""

    def __init__(self, *, model: Any, checkpoints: list[str], indices: list[int], num_checkpoints: int,
                 vog: dict[str, Any], device: str, storage: dict[str, Any], emit: str = "vog",
                 group: int = 0, threads: int | None = None, engine: dict[str, Any] | None = None,
                 engine_batch: int | None = None, check_url: str | None = None,
                 device_decode: dict[str, Any] | None = None, ledger: str | None = None,
                 moment_dtype: str = "float64"):
        """``engine``: the engine's execution options (``ComputeSpec.engine_options``); ``engine_batch``:
        the engine's batch size when a call holds several (run with overlapped copies); ``check_url``:
        where the first-batch precision check goes (tf32/bf16); ``device_decode``: ``{"transform",
        "input_shape"}`` when the rows come encoded (``transform.decode_on: gpu``); ``ledger``: the
        name of the stage's device ledger (:mod:`.devices`); ``moment_dtype``: how partial moments
        are stored (:func:`.merge.moment_columns`)."""
        import torch

        from ..core.engine import make_engine
        from ..models.checkpoints import load_checkpoints
        from .devices import actor_device, connect_ledger

        # auto: CUDA when torch here has it (Ray may reserve "GPUs" torch cannot use: then the CPU,
        # recorded and warned about); cuda without CUDA: an error, before any checkpoint is read
        dev, record = actor_device(device, group)

        threads = threads or int(os.environ.get("VOG_RAY_TORCH_THREADS", "0"))  # else Ray's OMP_NUM_THREADS
        torch.set_num_threads(max(1, threads or torch.get_num_threads()))
        # diagnostics: one JSON line per batch (wall-clock start/end, rows, seconds in the engine,
        # whether the stacked path ran) in $VOG_RAY_TRACE_DIR/scorer-<pid>.jsonl; bench/pipeline.py
        # takes its steady-state rate from it
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
        self._ledger = connect_ledger(ledger)
        self._tag = f"{record['actor_id']}-{record['pid']}"
        if self._ledger is not None:
            import ray

            ray.get(self._ledger.register.remote(self._tag, record))
        name = model if isinstance(model, str) else str(model.get("name", model))
        self.engine = make_engine(loaded.model, loaded.state_dicts, self.opts, dev, indices=indices,
                                  num_checkpoints=num_checkpoints, predict_state_dict=predict_sd, name=name,
                                  **(engine or {}))
        self.keys = self.engine.keys()
        self.windows = self.engine.windows
        self.engine_batch = engine_batch
        self.check_url = check_url if self.engine.precision != "fp32" else None
        self.device_decode = device_decode
        if device_decode is not None:
            from ..config import TransformSpec

            self.device_decode = {"transform": TransformSpec(**device_decode["transform"]),
                                  "input_shape": tuple(device_decode["input_shape"])}

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.time()
        self._engine_s = 0.0
        out = self._score(batch)
        if self._ledger is not None:  # synchronous: counted before the batch leaves this actor
            import ray

            ray.get(self._ledger.add.remote(self._tag, out.num_rows))
        if self._trace is not None:
            self._trace.write(json.dumps({"start": t0, "end": time.time(), "rows": out.num_rows,
                                          "engine_s": self._engine_s, "group": self.group,
                                          "stacked": self.engine.uses_stacked}) + "\n")
        return out

    def _inputs(self, batch: pa.Table, status: np.ndarray) -> tuple[Any, np.ndarray]:
        """The batch's model inputs: decoded by the decode stage (``x``), or here on the engine's
        device from the encoded ``image`` column."""
        if self.device_decode is None:
            xcol = batch.column("x")
            return (xcol.combine_chunks() if xcol.num_chunks != 1 else xcol.chunk(0)).to_numpy(), status
        from ..data.device_decode import decode_on_device

        return decode_on_device(batch.column("image").to_pylist(), status, self.device_decode["transform"],
                                self.device_decode["input_shape"], self.engine.device)

    def _run(self, x: Any, labels: np.ndarray) -> Any:
        """The engine on the scored rows: in batches of ``engine_batch`` whose copies overlap."""
        from ..core.engine import BatchResult

        emit = "vog" if self.emit == "vog" else "moments"
        b = self.engine_batch
        if b and len(labels) > b:
            parts = [(x[a:a + b], labels[a:a + b]) for a in range(0, len(labels), b)]
            return BatchResult.concat(list(self.engine.run_batches(parts, emit=emit)))
        return self.engine.run(x, labels, emit=emit)

    def _check_precision(self, x: Any, labels: np.ndarray, res: Any) -> None:
        """tf32/bf16: the first rows of the first batch again in fp32; raw VoG compared per key
        with this batch's own (``res``), written to ``check_url``."""
        t = time.perf_counter()
        check = self.engine.compare_to_fp32(x, labels, got=res)
        rec = {"precision": self.engine.precision, "device": str(self.engine.device), "group": self.group,
               "rows": max([f["n"] for f in check.values()], default=0), "seconds": time.perf_counter() - t, "keys": check}
        atomic_write(join(self.check_url, f"actor-{os.getpid()}-{self.group}.json"),
                     json.dumps(rec).encode(), self.storage)
        self.check_url = None

    def _score(self, batch: pa.Table) -> pa.Table:
        """An Arrow batch of decoded rows: only ``x``, ``label`` and ``status`` become numpy; ids,
        splits and the carried columns stay Arrow, so their values and types pass unchanged."""
        n = batch.num_rows
        status = batch.column("status").to_numpy(zero_copy_only=False).astype(object)
        labels = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        x, status = self._inputs(batch, status)
        ok = status == "ok"
        if ok.any():
            reasons = label_problems(labels, self.engine.num_classes_for(_rows(x, ok)),
                                     allow_missing=self.opts.label_mode != "true")
            bad = ok & (reasons != None)  # noqa: E711
            status[bad] = reasons[bad]
            ok = status == "ok"
        keep = [c for c in batch.column_names if c not in ROW_META]
        parts = []
        if ok.any():
            t = time.perf_counter()
            xs = _rows(x, ok)
            res = self._run(xs, labels[ok])
            self._engine_s = time.perf_counter() - t
            if self.check_url is not None:
                self._check_precision(xs, labels[ok], res)
            parts.append(self._table(res, batch.filter(pa.array(ok)), labels[ok], keep))
        if (~ok).any():
            parts.append(self._rejected(batch.filter(pa.array(~ok)), labels[~ok], status[~ok], keep))
        out = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
        assert out.num_rows == n
        return out

    def _table(self, res: Any, rows: pa.Table, labels: np.ndarray, keep: list[str]) -> pa.Table:
        extra = {c: rows.column(c) for c in keep}
        if self.emit == "vog":
            return result_to_table(res, ids=rows.column("id"), split=rows.column("split"), labels=labels,
                                   keys=self.keys, extra=extra)
        return self._moment_rows(res, rows.column("id"), rows.column("split"), labels, extra)

    def _moment_rows(self, res: Any, ids: pa.ChunkedArray, splits: pa.ChunkedArray, labels: np.ndarray,
                     extra: dict[str, pa.ChunkedArray]) -> pa.Table:
        """Checkpoint-sharded / incremental: partial pixel moments per example (``mn_``, ``mmean_``,
        ``mm2_`` per key, stored in ``moment_dtype``; a key whose window has no checkpoint in this
        group has n = 0)."""
        n = len(ids)
        cols: dict[str, Any] = {
            "id": ids.cast(pa.string()).combine_chunks(),
            "split": splits.cast(pa.string()).combine_chunks(),
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

    def _rejected(self, rows: pa.Table, labels: np.ndarray, status: np.ndarray, keep: list[str]) -> pa.Table:
        cols: dict[str, Any] = {
            "id": rows.column("id").cast(pa.string()).combine_chunks(),
            "split": rows.column("split").cast(pa.string()).combine_chunks(),
            "label": pa.array(labels, pa.int64()),
            "status": pa.array([str(s) for s in status], pa.string()),
        }
        if self.emit != "vog":
            cols["group"] = pa.array(np.full(rows.num_rows, self.group, np.int64))
        for c in keep:
            cols[c] = keep_array(rows.column(c))
        return pa.table(cols)
