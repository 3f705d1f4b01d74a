"""Single-process audit: ``vog_ray.score(...)`` on in-memory arrays or a torch ``Dataset``.

The Ray pipeline distributes exactly these steps (load checkpoints → engine per batch →
class moments → normalise → rank) and gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from .checkpoints import CheckpointInfo, checkpoint_info, list_checkpoints, load_into, load_state_dict, read_bytes
from .engine import LABEL_MODES, SIGNALS, TARGETS, BatchResult, GradientEngine, resolve_windows
from .models import build_model
from .moments import NORMALIZATIONS
from .reduce import class_lookup, merge_class_moments, normalize, partial_class_moments, rank_table, vog_col
from .core.table import keep_array
from .storage import StorageOptions

__all__ = ["score", "VogOptions", "LoadedCheckpoints", "load_checkpoints", "result_to_table",
           "pick_device", "make_engine"]


@dataclass
class VogOptions:
    """What to compute. ``windows`` maps names to specs (see :func:`resolve_windows`)."""

    windows: dict[str, Any] = field(default_factory=lambda: {"all": "all"})
    targets: Sequence[str] = ("logit",)
    label_mode: str = "true"
    normalization: str = "zscore"
    rank_by: str | None = None          # "<window>_<target>"; default: late/all/first window, first target
    accum_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}; expected one or more of {TARGETS}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"unknown label mode {self.label_mode!r}; expected one of {LABEL_MODES}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected one of {NORMALIZATIONS}")
        if self.accum_dtype not in ("float32", "float64"):
            raise ValueError("accum_dtype must be 'float32' or 'float64'")

    def keys(self, windows: dict[str, list[int]]) -> list[str]:
        return [f"{w}_{t}" for w in windows for t in self.targets]

    def primary(self, windows: dict[str, list[int]]) -> str:
        keys = self.keys(windows)
        if self.rank_by:
            if self.rank_by not in keys:
                raise ValueError(f"rank_by {self.rank_by!r} is not one of {keys}")
            return self.rank_by
        for w in ("late", "all"):
            if w in windows:
                return f"{w}_{self.targets[0]}"
        return keys[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.accum_dtype == "float64" else torch.float32


@dataclass
class LoadedCheckpoints:
    model: torch.nn.Module
    urls: list[str]
    state_dicts: list[dict[str, torch.Tensor]]
    infos: list[CheckpointInfo]


def load_checkpoints(model_spec: Any, checkpoints: str | list[str], storage: StorageOptions | None = None,
                     *, indices: Sequence[int] | None = None) -> LoadedCheckpoints:
    """Build the model and load its checkpoints (all of them, or those at ``indices``).

    Every checkpoint is checked against the architecture; a mismatch names the file and keys.
    """
    urls = list_checkpoints(checkpoints, storage)
    model = build_model(model_spec)
    sel = list(range(len(urls))) if indices is None else list(indices)
    sds, infos = [], []
    for i in sel:
        data = read_bytes(urls[i], storage)
        sd = load_state_dict(urls[i], data=data, model=model)
        load_into(model, sd, urls[i])  # validates keys and shapes
        sds.append(sd)
        infos.append(checkpoint_info(urls[i], data))
    return LoadedCheckpoints(model, urls, sds, infos)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available here")
    return torch.device(device)


def make_engine(loaded: LoadedCheckpoints, opts: VogOptions, device: str = "auto",
                indices: Sequence[int] | None = None, num_checkpoints: int | None = None,
                predict_state_dict: dict[str, torch.Tensor] | None = None) -> GradientEngine:
    K = num_checkpoints or len(loaded.urls)
    windows = resolve_windows(opts.windows, K)
    return GradientEngine(
        loaded.model, loaded.state_dicts, windows=windows, targets=opts.targets,
        label_mode=opts.label_mode, checkpoint_ids=indices, num_checkpoints=K,
        predict_state_dict=predict_state_dict, device=pick_device(device),
        accum_dtype=opts.torch_dtype)


def result_to_table(res: BatchResult, *, ids: Sequence[str], split: Sequence[str] | str,
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


def finish(table: pa.Table, keys: Sequence[str], opts: VogOptions, primary: str) -> tuple[pa.Table, pa.Table]:
    """Class moments → z → ranks on one in-memory table of scored rows. Returns (scores, classes)."""
    classes = merge_class_moments([partial_class_moments(table, keys)], keys)
    table = normalize(table, class_lookup(classes, keys), keys, opts.normalization, primary)
    return rank_table(table), classes


def _iter_batches(data: Any, labels: Any, batch_size: int):
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.Tensor):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        for batch in loader:
            if isinstance(batch, (list, tuple)):
                x, y = batch[0], batch[1] if len(batch) > 1 else None
            else:
                x, y = batch, None
            yield x, (None if y is None else np.asarray(y))
        return
    x = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    y = None if labels is None else np.asarray(labels)
    for a in range(0, len(x), batch_size):
        yield x[a:a + batch_size], (None if y is None else y[a:a + batch_size])


def score(data: Any, labels: Any = None, *, model: Any, checkpoints: str | list[str],
          windows: dict[str, Any] | None = None, targets: str | Sequence[str] = "logit",
          label_mode: str = "true", normalization: str = "zscore", rank_by: str | None = None,
          batch_size: int = 256, device: str = "auto", ids: Sequence[Any] | None = None,
          split: str = "all", extra: dict[str, Any] | None = None,
          storage: StorageOptions | None = None, accum_dtype: str = "float32",
          return_classes: bool = False) -> pa.Table | tuple[pa.Table, pa.Table]:
    """Audit a dataset in this process and return the ranked score table (pyarrow).

    ``data``: an array ``[N, C, H, W]`` / ``[N, D]`` (numpy or torch) with ``labels`` ``[N]``,
    or a torch ``Dataset`` yielding ``(x, y)``. ``model``: a model spec (``"lenet"``,
    ``{"name": "mlp", ...}``, ``"torchvision:resnet18"``, ``"pkg.mod:factory"``).
    ``checkpoints``: URLs or a glob, in training order (natural sort for globs).

    Rows whose pixels are not finite are kept with ``status = "non_finite_input"`` and null
    scores; they take no part in class statistics or ranks.
    """
    opts = VogOptions(windows=windows or {"all": "all"}, targets=targets, label_mode=label_mode,
                      normalization=normalization, rank_by=rank_by, accum_dtype=accum_dtype)
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    loaded = load_checkpoints(model, checkpoints, storage)
    engine = make_engine(loaded, opts, device)
    keys = engine.keys()
    primary = opts.primary(engine.windows)
    parts: list[pa.Table] = []
    pos = 0
    for xb, yb in _iter_batches(data, labels, batch_size):
        if yb is not None and np.any(np.asarray(yb) < 0) and label_mode == "true":
            raise ValueError("labels must be in [0, num_classes) with label_mode='true' "
                             f"(found {int(np.sum(np.asarray(yb) < 0))} negative labels)")
        n = len(xb)
        res = engine.run(xb, yb)
        bid = list(range(pos, pos + n)) if ids is None else list(ids[pos:pos + n])
        ex = None if extra is None else {k: np.asarray(v)[pos:pos + n] for k, v in extra.items()}
        parts.append(result_to_table(res, ids=bid, split=split, labels=yb, keys=keys, extra=ex))
        pos += n
    if not parts:
        raise ValueError("no examples to score (the dataset is empty)")
    table = pa.concat_tables(parts)
    if ids is not None and len(set(map(str, ids))) != len(ids):
        raise ValueError("ids must be unique")
    ok = np.asarray(table.column("status").to_pylist()) == "ok"
    scored, classes = finish(table.filter(pa.array(ok)), keys, opts, primary)
    if not ok.all():
        bad = table.filter(pa.array(~ok))
        scored = pa.concat_tables([scored, bad], promote_options="default")
    return (scored, classes) if return_classes else scored
