"""A results request's query string → the query (:class:`~.queries.Filters`, sort, page) and the
view settings, every value checked against the run (splits, classes, columns, the values of a
keep column); and back to query strings for the page's links. A bad value is a
:class:`BadRequest` naming the parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlencode

from .queries import Filters, RunTables

__all__ = ["BadRequest", "View", "parse_view", "query_string", "PER_PAGE_CHOICES", "KEEP_PREFIX"]

PER_PAGE_CHOICES = (25, 50, 100, 200)
KEEP_PREFIX = "keep."            # keep.<column>=<value>
VIEW_PARAMS = ("split", "label", "pred", "mismatch", "flagged", "pct_min", "pct_max", "z_min", "z_max", "sort",
               "order", "view", "per_page")


class BadRequest(ValueError):
    """A query parameter the run cannot answer; the message names it."""


@dataclass
class View:
    """What one results page shows."""

    filters: Filters
    sort: str = "score"
    descending: bool = True
    view: str = "grid"
    page: int = 1
    per_page: int = 50
    params: dict[str, str] = field(default_factory=dict)   # the accepted parameters, for links


def _int(params: Mapping[str, str], name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    raw = params.get(name, "")
    if raw == "":
        return None
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: {raw!r} is not an integer") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"{name}: {v} is outside [{lo}, {hi}]")
    return v


def _float(params: Mapping[str, str], name: str) -> float | None:
    raw = params.get(name, "")
    if raw == "":
        return None
    try:
        v = float(raw)
    except ValueError:
        raise BadRequest(f"{name}: {raw!r} is not a number") from None
    if not math.isfinite(v):
        raise BadRequest(f"{name}: {raw!r} is not a finite number")
    return v


def _choice(params: Mapping[str, str], name: str, options: list[str], default: str) -> str:
    v = params.get(name, "") or default
    if v not in options:
        raise BadRequest(f"{name}: {v!r} is not one of {options}")
    return v


def _keep_filters(params: Mapping[str, str], tables: RunTables) -> dict[str, Any]:
    keep: dict[str, Any] = {}
    for name, raw in params.items():
        if not name.startswith(KEEP_PREFIX) or raw == "":
            continue
        col = name[len(KEEP_PREFIX):]
        if col not in tables.keep_choices:
            raise BadRequest(f"{name}: {col!r} is not a column this run can filter on")
        match = [v for v in tables.keep_choices[col] if value_text(v) == raw]
        if not match:
            raise BadRequest(f"{name}: {raw!r} is not a value of {col!r}")
        keep[col] = match[0]
    return keep


def value_text(v: Any) -> str:
    """A keep column's value as a query parameter (booleans as ``true``/``false``)."""
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def parse_view(params: Mapping[str, str], tables: RunTables, num_classes: int) -> View:
    """The page a query string asks for (every parameter optional)."""
    split = params.get("split", "") or None
    if split is not None and split not in tables.splits:
        raise BadRequest(f"split: {split!r} is not a split of this run ({tables.splits})")
    flagged = _choice(params, "flagged", ["", "yes", "no"], "")
    if flagged and not tables.has_flagged:
        raise BadRequest("flagged: this run has no flagged column (its config has no flags section)")
    f = Filters(split=split, label=_int(params, "label", -1, num_classes - 1),
                pred=_int(params, "pred", 0, num_classes - 1), mismatch=params.get("mismatch", "") in ("1", "on"),
                flagged={"": None, "yes": True, "no": False}[flagged], keep=_keep_filters(params, tables),
                pct_min=_float(params, "pct_min"), pct_max=_float(params, "pct_max"),
                z_min=_float(params, "z_min"), z_max=_float(params, "z_max"))
    v = View(filters=f, sort=_choice(params, "sort", tables.sort_options(), "score"),
             descending=_choice(params, "order", ["desc", "asc"], "desc") == "desc",
             view=_choice(params, "view", ["grid", "table"], "grid"),
             page=_int(params, "page", 1) or 1,
             per_page=int(_choice(params, "per_page", [str(c) for c in PER_PAGE_CHOICES], "50")))
    v.params = {k: str(params[k]) for k in VIEW_PARAMS if params.get(k, "") != ""}
    v.params.update({k: str(val) for k, val in params.items() if k.startswith(KEEP_PREFIX) and val != ""})
    return v


def query_string(params: Mapping[str, Any], **changes: Any) -> str:
    """``?a=1&b=2`` from ``params`` with ``changes`` applied (None removes a parameter)."""
    p = {**params, **changes}
    return "?" + urlencode({k: v for k, v in p.items() if v is not None and v != ""})
