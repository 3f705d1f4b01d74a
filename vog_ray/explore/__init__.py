"""The explorer: browse, filter and inspect the ranked examples of a published run in a browser
(``vog-ray explore``), see where in an image the difficulty sits (VoG heat maps), and export a
selection (``vog-ray export``).

Modules: :mod:`.queries` (DuckDB over the run's Parquet), :mod:`.heatmap` (``vog_map``: the
per-pixel VoG of an example, by the audit's engine), :mod:`.export` (CSV, Parquet, JSON lines,
Label Studio), :mod:`.app` / :mod:`.pages` / :mod:`.params` / :mod:`.images` / :mod:`.plots`
(the web app), :mod:`.guard` (what the server may read), :mod:`.server` (running it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"vog_map": "heatmap", "vog_maps": "heatmap", "VogMap": "heatmap", "RunTables": "queries",
            "Filters": "queries", "serve": "server", "ExplorerServer": "server", "export_table": "export",
            "write_export": "export"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vog_ray.explore' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
