"""Rendering the explorer's pages: the Jinja2 environment (autoescape on for every template, so
every id, class name, column name and value from the data is escaped), the stylesheet, and the
example page's context (its keys, ranks, signals and heat map)."""

from __future__ import annotations

import functools
import math
from importlib import resources
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse

from .heatmap import HeatMapError
from .params import PER_PAGE_CHOICES, query_string, value_text
from .plots import sparkline

if TYPE_CHECKING:  # pragma: no cover
    from .app import Explorer

__all__ = ["render", "stylesheet", "example_context", "compile_templates", "SIGNAL_PLOTS"]

# the per-checkpoint signals the example page plots, with their captions
SIGNAL_PLOTS = {"loss": "loss", "label_prob": "p(target)", "margin": "margin", "max_prob": "max softmax"}


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table cell (``—`` for missing)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:.{digits - 1}e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6) else f"{v:.{digits}f}"
    return str(v)


def value(v: Any) -> str:
    """A carried (keep) column's value: as stored, whole floats without decimals (an integer
    column with missing values is stored as floats)."""
    if isinstance(v, float) and math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return fmt(v) if isinstance(v, (bool, float)) or v is None else str(v)


@functools.lru_cache(maxsize=1)
def _env() -> Environment:
    env = Environment(loader=PackageLoader("vog_ray.explore", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(fmt=fmt, value=value, qs=query_string, value_text=value_text, per_page_choices=PER_PAGE_CHOICES)
    return env


def compile_templates() -> None:
    """Load and compile every template now (not on a page's first request)."""
    env = _env()
    for name in env.list_templates(extensions=["html"]):
        env.get_template(name)


def render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
    page = _env().get_template(name).render(request=request, path=request.url.path, **ctx)
    return HTMLResponse(page, status_code=status)


@functools.lru_cache(maxsize=1)
def stylesheet() -> str:
    return resources.files("vog_ray.explore").joinpath("static/style.css").read_text("utf-8")


def _signals(ex: "Explorer", row: dict[str, Any], shaded: list[int]) -> list[Any]:
    out = []
    for name, caption in SIGNAL_PLOTS.items():
        vals = row.get(f"sig_{name}")
        if vals is not None:
            out.append(sparkline(caption, list(vals), shaded=shaded))
    return out


def example_context(ex: "Explorer", request: Request, split: str, eid: str) -> dict[str, Any]:
    """What the example page shows: the row (or its rejection), every key's raw VoG, z, rank and
    percentile in the split, the signals, and the heat map of the chosen key (its pixel mean
    beside the table's raw VoG)."""
    from .params import BadRequest

    row = ex.example(split, eid)
    ctx: dict[str, Any] = {"split": split, "eid": eid, "row": row, "rejected": None, "keys": [],
                           "signals": [], "key": None, "heat": None, "heat_error": None,
                           "keep": {}, "correct": []}
    if row is None:
        ctx["rejected"] = ex.tables.rejected_row(split, eid)
        return ctx
    key = request.query_params.get("key", "") or ex.tables.primary
    if key not in ex.tables.keys:
        raise BadRequest(f"key: {key!r} is not one of {ex.tables.keys}")
    ranks = ex.tables.key_ranks(row)
    ctx["keys"] = [{"key": k, "vog": row.get(f"vog_{k}"), "z": row.get(f"z_{k}"), **ranks.get(k, {}),
                    "primary": k == ex.tables.primary} for k in ex.tables.keys]
    window = key.rsplit("_", 1)[0]
    shaded = [int(i) for i in (ex.run.manifest.get("windows") or {}).get(window, [])]
    ctx.update(key=key, window=window, shaded=shaded, signals=_signals(ex, row, shaded),
               keep={c: row.get(c) for c in ex.tables.keep_columns},
               correct=list(row.get("sig_correct") or []))
    try:
        _, vm = ex.heatmaps.get(split, row, key, True, 224)
        ctx["heat"] = {"mean": vm.vog, "table": vm.table_vog, "max": float(vm.map.max())}
    except (HeatMapError, ValueError, OSError) as e:
        ctx["heat_error"] = str(e)
    return ctx
