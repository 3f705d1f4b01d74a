"""VoG heat maps: the per-pixel spread of an example's gradient maps over the checkpoints of the
ranked window (DESIGN.md §1 step 4, before the mean over pixels of step 5), computed on demand
with the run's model and checkpoints by the audit's own engine, from the example's stored
payload decoded as the audit decoded it. A map's pixel mean is the example's raw VoG in the
score table (tested to 1e-5).

::

    m = vog_ray.vog_map("s3://bucket/vog/mnist", "train-00017", split="train")
    m.map          # [H, W] float64: the per-pixel population std across the window's checkpoints
    m.vog, m.table_vog
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..runs import Run, open_run
from ..storage import StorageOptions

__all__ = ["VogMap", "MapMaker", "vog_map", "vog_maps", "HeatMapError"]


class HeatMapError(ValueError):
    """A heat map cannot be computed (unknown example, changed checkpoint, unreadable source)."""


@dataclass
class VogMap:
    """One example's VoG heat map under one key (``<window>_<target>``)."""

    id: str
    split: str
    key: str
    map: np.ndarray            # the model input's pixels: [H, W] (images) or [D] (vectors), float64
    table_vog: float | None    # vog_<key> in the run's score table
    target_label: int
    image: np.ndarray | None   # the example for display (uint8 HxW / HxWx3)
    image_shape: tuple[int, ...] | None = None   # (C, H, W) of a flattened image input

    @property
    def vog(self) -> float:
        """The map's pixel mean: the example's raw VoG."""
        return float(self.map.mean())

    def pixels(self) -> np.ndarray | None:
        """The map as an [H, W] image (a flattened input's features averaged over its channels,
        which keeps the mean), or None for a vector input."""
        if self.map.ndim == 2:
            return self.map
        s = self.image_shape
        if s is not None and len(s) == 3 and int(np.prod(s)) == self.map.size:
            return self.map.reshape(s).mean(axis=0)
        return None


def _split_key(key: str, targets: Sequence[str]) -> tuple[str, str]:
    for t in targets:
        if key.endswith("_" + t):
            return key[: -len(t) - 1], t
    raise HeatMapError(f"key {key!r} is not <window>_<target> with a target of {list(targets)}")


class MapMaker:
    """Loads the run's model and the checkpoints of one key's window once (checked against the
    sha256 the manifest recorded), then computes the maps of any examples of the run."""

    def __init__(self, run: Run | str, key: str | None = None, *, storage: StorageOptions | None = None,
                 data_storage: StorageOptions | None = None, device: str = "cpu"):
        from ..config import StorageSpec

        self.run = run if isinstance(run, Run) else open_run(run, storage)
        m = self.run.manifest
        self.config = m.get("config") or {}
        self.key = key or m["primary"]
        if self.key not in m["keys"]:
            raise HeatMapError(f"key {self.key!r} is not one of the run's keys {m['keys']}")
        self.window, self.target = _split_key(self.key, m["targets"])
        self.data_storage = data_storage or (storage if storage is not None else
                                             StorageSpec.model_validate(self.config.get("storage") or {}).options())
        self.engine = self._engine(device)

    def _engine(self, device: str):
        import torch

        from ..core.engine import GradientEngine, pick_device
        from ..models.checkpoints import load_checkpoints

        m = self.run.manifest
        infos = m["checkpoints"]
        K = int(m["num_checkpoints"])
        idx = sorted(int(i) for i in m["windows"][self.window])
        predicted = m.get("label_mode") == "predicted"
        need = sorted(set(idx) | ({K - 1} if predicted else set()))
        urls = [infos[i]["url"] for i in range(K)]
        loaded = load_checkpoints(self.config["model"], urls, self.data_storage, indices=need)
        for i, info in zip(need, loaded.infos):
            if info.sha256 != infos[i]["sha256"]:
                raise HeatMapError(f"checkpoint {urls[i]!r} changed since the audit (sha256 {info.sha256[:12]}… "
                                   f"!= {infos[i]['sha256'][:12]}… in the manifest): its heat map would not be "
                                   "the audit's")
        sds = dict(zip(need, loaded.state_dicts))
        dtype = torch.float64 if (self.config.get("vog") or {}).get("accum_dtype") == "float64" else torch.float32
        return GradientEngine(
            loaded.model, [sds[i] for i in idx], windows={self.window: idx}, targets=[self.target],
            label_mode="predicted" if predicted else "true", checkpoint_ids=idx, num_checkpoints=K,
            predict_state_dict=sds.get(K - 1) if predicted and K - 1 not in idx else None,
            device=pick_device(device), accum_dtype=dtype)

    def _inputs(self, split: str, ids: list[str]) -> tuple[np.ndarray, list[np.ndarray | None], tuple | None]:
        """(model inputs decoded as the audit decoded them, display images, the (C, H, W) of a
        flattened input)."""
        from ..config import SplitSpec, TransformSpec
        from ..data.decode import Reject, decode_batch, decode_row
        from ..data.fetch import display_payload, fetch_payloads

        splits = (self.config.get("data") or {}).get("splits") or {}
        if split not in splits:
            raise HeatMapError(f"split {split!r} is not a split of the run's config")
        spec = SplitSpec.model_validate(splits[split])
        try:
            payloads = fetch_payloads(spec, ids, self.data_storage)
        except (KeyError, ValueError, OSError) as e:
            raise HeatMapError(f"split {split!r}: cannot read the source of {ids[:3]}: {e}") from None
        transform = TransformSpec.model_validate((self.config.get("data") or {}).get("transform") or {})
        col = np.empty(len(ids), dtype=object)
        col[:] = [payloads[i] for i in ids]
        dec = decode_batch({"image": col}, transform)
        bad = [(i, s) for i, s in zip(ids, dec["status"]) if s != "ok"]
        if bad:
            raise HeatMapError(f"split {split!r}: example {bad[0][0]!r} does not decode ({bad[0][1]})")
        shape = None
        if transform.flatten:
            try:
                shape = tuple(decode_row(col[0], transform.model_copy(update={"flatten": False})).shape)
            except Reject:
                shape = None
        images = []
        for p in col:
            try:
                images.append(display_payload(p, spec))
            except Exception:  # noqa: BLE001 - a payload the model takes need not be displayable
                images.append(None)
        return dec["x"], images, shape

    def maps(self, split: str, rows: Sequence[dict[str, Any]]) -> dict[str, VogMap]:
        """The maps of score-table rows (each with ``id``, ``label`` and ``vog_<key>``) of one split."""
        ids = [str(r["id"]) for r in rows]
        if not ids:
            return {}
        x, images, shape = self._inputs(split, ids)
        y = np.array([-1 if r.get("label") is None else int(r["label"]) for r in rows], np.int64)
        if self.engine.label_mode == "true" and (y < 0).any():
            raise HeatMapError(f"example {ids[int(np.argmax(y < 0))]!r} has no label (the run used true labels)")
        res = self.engine.run(x, y, emit="moments")
        st = res.moments[self.key]
        std = np.sqrt(np.maximum(st.m2 / st.n, 0)).astype(np.float64)   # the engine's per-pixel std
        out = {}
        for j, r in enumerate(rows):
            tv = r.get(f"vog_{self.key}")
            out[ids[j]] = VogMap(id=ids[j], split=split, key=self.key, map=std[j],
                                 table_vog=None if tv is None else float(tv),
                                 target_label=int(res.target_label[j]), image=images[j], image_shape=shape)
        return out


def _rows(run: Run, split: str | None, ids: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
    """The score rows of ``ids`` (one split; found by id when ``split`` is None)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from ..storage import list_files

    fs, files = list_files(run.path("scores"), run.storage)
    cond = pc.field("id").isin([str(i) for i in ids])
    if split is not None:
        cond = cond & (pc.field("split") == split)
    t = pads.dataset(files, filesystem=fs, format="parquet").to_table(filter=cond)
    rows = {r["id"]: r for r in t.to_pylist()}
    missing = [i for i in ids if str(i) not in rows]
    if missing:
        raise HeatMapError(f"no scored example {missing[0]!r}" + (f" in split {split!r}" if split else "")
                           + f" in run {run.url!r}")
    splits = {r["split"] for r in rows.values()}
    if len(splits) > 1:
        raise HeatMapError(f"ids {list(ids)[:3]} are in several splits {sorted(splits)}: name the split")
    return splits.pop(), [rows[str(i)] for i in ids]


def vog_maps(run: Run | str, ids: Sequence[str], *, split: str | None = None, key: str | None = None,
             storage: StorageOptions | None = None, data_storage: StorageOptions | None = None,
             device: str = "cpu") -> dict[str, VogMap]:
    """The VoG heat maps of examples of a published run (one split), computed together."""
    r = run if isinstance(run, Run) else open_run(run, storage)
    s, rows = _rows(r, split, ids)
    return MapMaker(r, key, storage=storage, data_storage=data_storage, device=device).maps(s, rows)


def vog_map(run: Run | str, example_id: str, *, split: str | None = None, key: str | None = None,
            storage: StorageOptions | None = None, data_storage: StorageOptions | None = None,
            device: str = "cpu") -> VogMap:
    """The VoG heat map of one example of a published run: for each pixel, the population std of
    its gradient-map values across the checkpoints of ``key``'s window (default: the ranked key).
    ``run``: a run URL or an output URL (its latest run)."""
    return vog_maps(run, [example_id], split=split, key=key, storage=storage, data_storage=data_storage,
                    device=device)[str(example_id)]
