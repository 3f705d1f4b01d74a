"""The image grids of a report: which examples each grid shows (the lowest- and highest-VoG of
every split, and of each class of ``report.classes_to_show``), their tiles read from the source
data, each marked with its flags and with label ≠ prediction, and the grid figures. Images that
cannot be read are left out with a warning. With ``report.heatmaps``, the highest-VoG examples of
each split also get a grid of their VoG heat maps (computed with the run's model and checkpoints,
:mod:`vog_ray.explore.heatmap`).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import numpy as np

from ..storage import StorageOptions
from . import figures as F
from .common import safe_name
from .context import ReportContext
from .sections import figure_entry

__all__ = ["GRID_SIZE", "LABEL_DIFFERS", "grid_section", "heatmap_section", "tile_marks"]

GRID_SIZE = 25
LABEL_DIFFERS = "label≠pred"


def _grid_rows(rows: np.ndarray, order_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(highest, lowest) rows by rank: the 25 smallest ranks, and the 25 largest (lowest first)."""
    o = rows[np.argsort(order_key, kind="stable")]
    return o[:GRID_SIZE], o[::-1][:GRID_SIZE]


def _grid_plan(ctx: ReportContext) -> list[dict[str, Any]]:
    """One entry per grid: split, which end, class (or None), rows, title and file name."""
    frame, primary = ctx.frame, ctx.primary
    plan: list[dict[str, Any]] = []
    for s in ctx.idx:
        rows = ctx.idx[s]
        hi, lo = _grid_rows(rows, frame.rank[rows])
        plan.append({"split": s, "which": "lowest", "class": None, "rows": lo,
                     "title": f"{s}: the {len(lo)} lowest-VoG examples ({primary})",
                     "file": f"grid_{safe_name(s)}_lowest"})
        plan.append({"split": s, "which": "highest", "class": None, "rows": hi,
                     "title": f"{s}: the {len(hi)} highest-VoG examples ({primary})",
                     "file": f"grid_{safe_name(s)}_highest"})
        for c in ctx.settings.classes_to_show:
            crow = rows[frame.target[rows] == c]
            if len(crow) == 0:
                continue
            hi, lo = _grid_rows(crow, frame.class_rank[crow])
            for which, sel in (("lowest", lo), ("highest", hi)):
                plan.append({"split": s, "which": which, "class": int(c), "rows": sel,
                             "title": f"{s}, class {ctx.label_of(c)}: the {len(sel)} {which}-VoG examples",
                             "file": f"grid_{safe_name(s)}_class{int(c)}_{which}"})
    return plan


def _image_fetcher(warns: list[str]) -> Callable | None:
    """The source-data image reader (``fetch_images``), or None with a warning."""
    try:
        readers = importlib.import_module("vog_ray.data.fetch")
        return readers.fetch_images
    except (ImportError, AttributeError) as e:
        warns.append(f"image grids skipped: vog_ray.data.fetch.fetch_images is not available ({e})")
        return None


def _read_images(ctx: ReportContext, plan: list[dict[str, Any]], fetch: Callable,
                 data_storage: StorageOptions | None) -> dict[str, dict[str, Any]]:
    """split -> id -> image of every example the plan shows; splits that fail are left out."""
    from ..config import SplitSpec

    images: dict[str, dict[str, Any]] = {}
    for s in ctx.idx:
        want = sorted({ctx.frame.ids[int(r)].as_py() for p in plan if p["split"] == s for r in p["rows"]})
        if s not in ctx.splits_cfg:
            ctx.warnings.append(f"image grids of split {s!r} skipped: the run config has no data.splits.{s}")
            continue
        try:
            kw = {"on_error": "skip"} if "on_error" in inspect.signature(fetch).parameters else {}
            images[s] = fetch(SplitSpec.model_validate(ctx.splits_cfg[s]), want, data_storage, **kw) or {}
        except Exception as e:  # the source data may be gone or unreadable: report, don't fail
            ctx.warnings.append(f"image grids of split {s!r} skipped: could not read the source images "
                                f"({type(e).__name__}: {e})")
            continue
        miss = [i for i in want if i not in images[s]]
        if miss:
            ctx.warnings.append(f"{len(miss)} image(s) of split {s!r} not found in the source data "
                                f"(e.g. {miss[:3]})")
    return images


def tile_marks(ctx: ReportContext, r: int) -> list[str]:
    """What a tile is marked with: the flag columns true for row ``r``, and ``label≠pred`` when
    its known label differs from the last checkpoint's prediction."""
    frame = ctx.frame
    marks = [c for c in ctx.settings.flag_columns if frame.flags[c][r] == 1]
    if frame.label[r] >= 0 and frame.label[r] != frame.pred[r]:
        marks.append(LABEL_DIFFERS)
    return marks


def _grid_tiles(ctx: ReportContext, p: dict[str, Any], images: dict[str, Any]) -> list[dict[str, Any]]:
    frame, label_of = ctx.frame, ctx.label_of
    tiles = []
    for r in p["rows"]:
        r = int(r)
        i = frame.ids[r].as_py()
        img = images.get(i)
        tiles.append({"id": i, "label": label_of(frame.label[r]), "pred": label_of(frame.pred[r]),
                      "z": float(frame.z[ctx.primary][r]), "marks": tile_marks(ctx, r),
                      "image": None if img is None else np.asarray(img)})
    return tiles


def grid_section(ctx: ReportContext, storage: StorageOptions | None,
                 data_storage: StorageOptions | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(grids for the page, grid entries of ``report.json``, grid figures to write).

    ``data_storage``: storage options of the source data (default: ``storage``, else the run
    config's storage). A grid's tiles carry ``png`` for the page; its figure is a file only.
    """
    plan = _grid_plan(ctx)
    meta = [{"split": p["split"], "which": p["which"], "class": p["class"], "title": p["title"],
             "ids": [ctx.frame.ids[int(r)].as_py() for r in p["rows"]],
             "marks": {ctx.frame.ids[int(r)].as_py(): m for r in p["rows"] if (m := tile_marks(ctx, int(r)))}}
            for p in plan]
    fetch = _image_fetcher(ctx.warnings)
    if fetch is None:
        return [], meta, []
    from ..config import StorageSpec

    if data_storage is None:
        data_storage = storage if storage is not None else \
            StorageSpec.model_validate(ctx.config.get("storage") or {}).options()
    images = _read_images(ctx, plan, fetch, data_storage)
    grids, figs = [], []
    for p in plan:
        if p["split"] not in images:
            continue
        g = {"title": p["title"], "file": p["file"], "split": p["split"], "which": p["which"],
             "class": p["class"], "tiles": _grid_tiles(ctx, p, images[p["split"]])}
        # the figure's font may lack "≠": its captions write the marks in ASCII
        tiles = [(t["image"], f"{t['id']}\nlabel {t['label']}\npred {t['pred']}"
                  + (f" | {', '.join(t['marks'])}".replace("≠", "!=") if t["marks"] else ""))
                 for t in g["tiles"]]
        figs.append(figure_entry(g["file"], g["title"], F.image_grid(g["title"], tiles)))
        for t in g["tiles"]:
            t["png"] = F.tile_png(t["image"]) if t["image"] is not None else None
        grids.append(g)
    return grids, meta, figs


def _heat_tiles(ctx: ReportContext, maker: Any, split: str, rows: np.ndarray) -> list[dict[str, Any]]:
    frame, key = ctx.frame, ctx.primary
    want = [{"id": frame.ids[int(r)].as_py(), "label": int(frame.label[int(r)]),
             f"vog_{key}": float(frame.vog[key][int(r)])} for r in rows]
    maps = maker.maps(split, want)
    tiles = []
    for r, w in zip(rows, want):
        vm = maps[w["id"]]
        pix = vm.pixels()
        tiles.append({"id": w["id"], "label": ctx.label_of(frame.label[int(r)]), "pred": ctx.label_of(frame.pred[int(r)]),
                      "z": float(frame.z[key][int(r)]), "vog": vm.vog,
                      "image": None if pix is None else F.heatmap_rgb(vm.image, pix)})
    return tiles


def heatmap_section(ctx: ReportContext, storage: StorageOptions | None,
                    data_storage: StorageOptions | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(heat-map grids for the page, their ``report.json`` entries, their figures): the VoG heat
    maps of the highest-VoG examples of each split under the ranked key, over their images. A
    run whose maps cannot be computed (checkpoints moved or changed, source data gone) gets a
    warning instead."""
    if not ctx.settings.heatmaps:
        return [], [], []
    from ..config import StorageSpec

    if data_storage is None:
        data_storage = storage if storage is not None else \
            StorageSpec.model_validate(ctx.config.get("storage") or {}).options()
    try:
        from ..explore.heatmap import MapMaker

        maker = MapMaker(ctx.run, ctx.primary, data_storage=data_storage)
    except Exception as e:  # noqa: BLE001 - the report stands without heat maps
        ctx.warnings.append(f"heat-map grids skipped: {type(e).__name__}: {e}")
        return [], [], []
    grids, meta, figs = [], [], []
    for s in ctx.idx:
        hi, _ = _grid_rows(ctx.idx[s], ctx.frame.rank[ctx.idx[s]])
        title = f"{s}: VoG heat maps of the {len(hi)} highest-VoG examples ({ctx.primary})"
        try:
            tiles = _heat_tiles(ctx, maker, s, hi)
        except Exception as e:  # noqa: BLE001 - e.g. a split whose source data is gone
            ctx.warnings.append(f"heat-map grid of split {s!r} skipped: {type(e).__name__}: {e}")
            continue
        name = f"heatmap_{safe_name(s)}_highest"
        meta.append({"split": s, "key": ctx.primary, "title": title, "ids": [t["id"] for t in tiles],
                     "map_means": [t["vog"] for t in tiles]})
        figs.append(figure_entry(name, title, F.image_grid(title, [(t["image"], f"{t['id']}\nlabel {t['label']}\n"
                                                                   f"pred {t['pred']}") for t in tiles])))
        for t in tiles:
            t["png"] = F.tile_png(t["image"]) if t["image"] is not None else None
        grids.append({"title": title, "file": name, "tiles": tiles})
    return grids, meta, figs
