"""The single-process audit: ``vog_ray.score(...)`` on in-memory arrays or a torch ``Dataset``.

The same steps as the Ray audit (load the checkpoints → the engine per batch → class moments →
normalise → rank), in this process, from the same functions, so both give the same numbers.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .core.engine import make_engine
from .core.flags import FlagRule, flag_block
from .core.labels import label_problems
from .core.options import VogOptions
from .core.ranking import rank_in_memory
from .core.table import result_to_table
from .models.checkpoints import load_checkpoints
from .storage import StorageOptions

__all__ = ["score"]


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
          split: str | Sequence[str] = "all", extra: dict[str, Any] | None = None,
          storage: StorageOptions | None = None, accum_dtype: str = "float32",
          return_classes: bool = False, normalize_against: str | None = None,
          flags: dict[str, Any] | None = None, precision: str = "fp32", compile: bool = False
          ) -> pa.Table | tuple[pa.Table, pa.Table]:
    """Audit a dataset in this process and return the ranked score table (pyarrow).

    ``data``: an array ``[N, C, H, W]`` / ``[N, D]`` (numpy or torch) with ``labels`` ``[N]``,
    or a torch ``Dataset`` yielding ``(x, y)``. ``model``: a model spec (``"lenet"``,
    ``{"name": "mlp", ...}``, ``"torchvision:resnet18"``, ``"pkg.mod:factory"``).
    ``checkpoints``: URLs or a glob, in training order (natural sort for globs).

    ``split``: one split name for every example, or one per example (class normalisation and
    ranks are per split); ``normalize_against``: a split whose class moments normalise every
    split (``vog.normalize_against`` of an audit: a row of a class that split lacks gets z = NaN
    and no rank).

    Rows whose pixels are not finite are kept with ``status = "non_finite_input"`` and null
    scores; they take no part in class statistics or ranks. ``flags`` (``{"top_percent": 5,
    "z_above": …, "label_mismatch": …}``, the audit config's ``flags`` rule) adds the boolean
    ``flagged`` column.
    ``precision`` (``fp32``, ``tf32``, ``bf16``) and ``compile``: the engine's execution options
    (README, "GPU").
    """
    opts = VogOptions(windows=windows or {"all": "all"}, targets=targets, label_mode=label_mode,
                      normalization=normalization, rank_by=rank_by, accum_dtype=accum_dtype,
                      normalize_against=normalize_against)
    if not isinstance(split, str) and len(split) != len(data):
        raise ValueError(f"split holds {len(split)} names for {len(data)} examples")
    names = {split} if isinstance(split, str) else set(map(str, split))
    if normalize_against is not None and normalize_against not in names:
        raise ValueError(f"normalize_against {normalize_against!r} is not one of the splits {sorted(names)}")
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    loaded = load_checkpoints(model, checkpoints, storage)
    engine = make_engine(loaded.model, loaded.state_dicts, opts, device, precision=precision, compile=compile)
    keys = engine.keys()
    primary = opts.primary(engine.windows)
    parts: list[pa.Table] = []
    pos = 0
    for xb, yb in _iter_batches(data, labels, batch_size):
        if yb is not None and label_mode == "true":
            bad = int(np.sum(label_problems(yb, allow_missing=False) != None))  # noqa: E711
            if bad:
                raise ValueError("labels must be in [0, num_classes) with label_mode='true' "
                                 f"(found {bad} negative labels)")
        n = len(xb)
        res = engine.run(xb, yb)
        bid = list(range(pos, pos + n)) if ids is None else list(ids[pos:pos + n])
        ex = None if extra is None else {k: np.asarray(v)[pos:pos + n] for k, v in extra.items()}
        sp = split if isinstance(split, str) else [str(v) for v in split[pos:pos + n]]
        parts.append(result_to_table(res, ids=bid, split=sp, labels=yb, keys=keys, extra=ex))
        pos += n
    if not parts:
        raise ValueError("no examples to score (the dataset is empty)")
    table = pa.concat_tables(parts)
    if ids is not None:
        names = [split] * len(ids) if isinstance(split, str) else [str(v) for v in split]
        if len(set(zip(names, map(str, ids)))) != len(ids):
            raise ValueError("ids must be unique within a split")
    ok = np.asarray(table.column("status").to_pylist()) == "ok"
    scored, classes = rank_in_memory(table.filter(pa.array(ok)), keys, opts.normalization, primary,
                                     opts.normalize_against)
    if flags is not None:
        ranked = scored.filter(pc.is_valid(scored.column("rank")))
        sizes = dict(zip(*np.unique(ranked.column("split").to_numpy(zero_copy_only=False).astype(str),
                                    return_counts=True)))
        scored = flag_block(scored, {s_: FlagRule(**flags) for s_ in sizes}, {k: int(v) for k, v in sizes.items()})
    if not ok.all():
        bad = table.filter(pa.array(~ok))
        scored = pa.concat_tables([scored, bad], promote_options="default")
    return (scored, classes) if return_classes else scored
