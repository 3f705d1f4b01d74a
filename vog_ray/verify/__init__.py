"""The run validator: the invariants of a run (:mod:`.invariants`), checked on summaries of its
files (:mod:`.summaries`) and of its source (``data.carried``) made file by file, so memory stays
bounded whatever the run's size. :func:`verify_run` checks any run (``vog-ray verify``, threads in
this process); the audit's gate (``distributed.validate``) runs the same checks as Ray tasks
before ``_SUCCESS`` is written. Imports neither torch nor Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from ..core.classes import class_lookup
from ..runs import read_json
from ..storage import StorageOptions, join, list_files
from .invariants import check_classes, check_rows, check_ranks, check_row_rules, check_source
from .summaries import RunContext, summarize_rejected, summarize_scores

__all__ = ["verify_run", "Verdict", "RunInvalid", "RunContext", "local_map", "INVARIANTS"]

INVARIANTS = ("rows", "ranks", "class ranks", "rank order", "finite", "z", "score", "percentile", "decile",
              "unreferenced", "classes", "carried columns", "ids")
VERIFY_THREADS = 4  # files summarised at once in this process (each holds one record batch at a time)

Mapper = Callable[[Callable[..., Any], list[tuple]], list]


class RunInvalid(RuntimeError):
    """A run breaks an invariant; the message names it."""


def local_map(fn: Callable[..., Any], args: list[tuple]) -> list:
    """``[fn(*a) for a in args]`` on a few threads (Parquet reads release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(args) <= 1:
        return [fn(*a) for a in args]
    with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(args))) as pool:
        return list(pool.map(lambda a: fn(*a), args))


@dataclass
class Verdict:
    """What :func:`verify_run` found: no problem means every invariant holds."""

    run_url: str
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    rows: int = 0
    source: str = "read"

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self, limit: int = 5) -> str:
        head = f"run {self.run_url} breaks {len(self.problems)} invariant check(s): "
        more = f" … and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        return head + "; ".join(self.problems[:limit]) + more


def run_context(manifest: dict[str, Any], classes: pa.Table, carried: list[str]) -> RunContext:
    keys = list(manifest["keys"])
    d = classes.to_pydict() if classes.num_rows else {}
    means = {"split": d.get("split", []), "class": d.get("class", [])}
    for k in keys:
        means[k] = d.get(f"mean_{k}", [])
    lookup = {s: {n: list(v) for n, v in e.items()} for s, e in class_lookup(classes, keys).items()} \
        if classes.num_rows else {}
    unref = {s: sum(int(n) for n in per.values()) for s, per in (manifest.get("rows_without_reference") or {}).items()}
    # ranked rows per split: percentiles and deciles are relative to them
    sizes = {s: int(v.get("rows_scored", 0)) - unref.get(s, 0) for s, v in (manifest.get("splits") or {}).items()}
    return RunContext(keys=keys, primary=manifest["primary"], normalization=manifest.get("normalization", "zscore"),
                      carried=carried, split_sizes=sizes, lookup=lookup, means=means,
                      reference=manifest.get("normalize_against"))


def _carried(config: dict[str, Any]) -> list[str]:
    splits = ((config or {}).get("data") or {}).get("splits") or {}
    return list(dict.fromkeys(c for s in splits.values() for c in (s.get("keep_columns") or [])))


def _source(cfg: Any, mapper: Mapper) -> dict[str, dict[str, Any]]:
    from ..data.carried import digest_source, merge_summaries, source_units

    storage = cfg.storage.options()
    args = [(name, spec, storage, unit) for name, spec in cfg.data.splits.items()
            for unit in source_units(name, spec, storage)]
    merged = merge_summaries(mapper(digest_source, args))
    for name, spec in cfg.data.splits.items():  # a split whose files hold no row
        merged.setdefault(name, {"split": name, "rows": 0, "ids": 0, "values": {c: 0 for c in spec.keep_columns},
                                 "types": {}, "other_types": {}})
    return merged


def _config(manifest: dict[str, Any], run_url: str) -> tuple[Any, str | None]:
    from ..config import ConfigError, validate

    try:
        return validate(manifest.get("config") or {}, f"{run_url}/manifest.json"), None
    except ConfigError as e:
        return None, f"config: the run's config is refused: {' '.join(str(e).split())}"


def verify_run(run_url: str, storage: StorageOptions | None = None, *, cfg: Any = None, source: bool = True,
               mapper: Mapper | None = None) -> Verdict:
    """Check a run's invariants (published or about to be). ``cfg``: the audit's config for the
    source (default: the manifest's); ``source=False`` skips re-reading the source (carried values
    and types, ids, source row counts); ``mapper`` runs the per-file work (default: threads here)."""
    mapper = mapper or local_map
    storage = storage or StorageOptions()
    v = Verdict(run_url.rstrip("/"))
    manifest = read_json(join(run_url, "manifest.json"), storage)
    missing = [k for k in ("keys", "primary", "splits", "rows") if k not in manifest]
    if missing:
        v.problems.append(f"manifest: lacks {missing}")
        return v
    from ..runs import Run

    classes = Run(v.run_url, manifest, storage).classes()
    if cfg is None and source:
        cfg, problem = _config(manifest, v.run_url)
        if problem:
            v.problems.append(problem)
    carried = list(dict.fromkeys(c for s in cfg.data.splits.values() for c in s.keep_columns)) if cfg is not None \
        else _carried(manifest.get("config") or {})
    ctx = run_context(manifest, classes, carried)
    st = dataclasses.asdict(storage)
    _, score_files = list_files(join(run_url, "scores"), storage)
    _, rejected_files = list_files(join(run_url, "rejected.parquet"), storage)
    scores = mapper(summarize_scores, [(f, run_url, st, ctx) for f in score_files])
    rejected = mapper(summarize_rejected, [(f, run_url, st, ctx) for f in rejected_files])
    v.rows = sum(n for p in scores + rejected for n in p.get("rows", {}).values())
    v.problems += check_rows(manifest, scores, rejected)
    v.problems += check_ranks(scores)
    v.problems += check_row_rules(scores + rejected)
    v.problems += check_classes(scores, classes, ctx.keys)
    v.checked = [i for i in INVARIANTS if i not in ("carried columns", "ids")]
    if not source:
        v.source = "skipped"
    elif cfg is None:
        v.source = "skipped: the run's config is refused"
    else:
        v.problems += check_source(_source(cfg, mapper), scores, rejected, manifest, carried)
        v.checked += ["carried columns", "ids"]
    return v
