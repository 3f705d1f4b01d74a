"""The input of a report: :class:`ReportContext` and :func:`load_context`, which checks a published
run against the report settings (keys, classes, OoD splits), reads its :class:`~.frame.Frame`,
orders the splits and ranks each split by each key. Every problem raises :class:`ReportError`
before any section is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from ..runs import Run
from .common import ReportError
from .frame import Frame, load_frame, score_schema
from .stats import rank_order, ranks_from_order

__all__ = ["ReportContext", "load_context"]


@dataclass
class ReportContext:
    """What every section of a report reads; ``warnings`` is the one list the sections append to."""

    run: Run
    manifest: dict[str, Any]
    config: dict[str, Any]                 # the run's config (manifest["config"])
    settings: Any                          # config.ReportSpec
    splits_cfg: dict[str, Any]             # config data.splits
    class_names: Sequence[str] | None
    keys: list[str]
    primary: str
    windows: dict[str, list[int]]
    targets: list[str]
    frame: Frame
    classes: pa.Table | None               # classes.parquet, None when the run has none
    splits: list[str]                      # in-distribution, the other splits sorted, then OoD
    idx: dict[str, np.ndarray]             # split -> rows of the frame
    ids_by_split: dict[str, pa.Array]
    split_ranks: dict[tuple[str, str], np.ndarray]   # (split, key) -> rank within the split
    label_of: Callable[[int], str]
    warnings: list[str] = field(default_factory=list)

    @property
    def ood_spec(self):
        return self.settings.ood

    @property
    def normalize_against(self) -> str | None:
        """The split every z of the run is normalised against (``vog.normalize_against``), or None."""
        return self.manifest.get("normalize_against")

    @property
    def bootstrap(self) -> int:
        return int(self.settings.bootstrap)

    @property
    def seed(self) -> int:
        return int(self.settings.seed)


def _report_spec(manifest: dict[str, Any], spec: Any):
    """The report settings: ``spec`` (a ``ReportSpec`` or dict), else the run's ``config.report``."""
    from ..config import ReportSpec

    raw = spec if spec is not None else (manifest.get("config") or {}).get("report") or {}
    if isinstance(raw, ReportSpec):
        return raw
    try:
        return ReportSpec.model_validate(raw)
    except Exception as e:  # pydantic.ValidationError
        raise ReportError(f"invalid report settings: {e}") from None


def _class_label_fn(class_names: Sequence[str] | None) -> Callable[[int], str]:
    """``label(c)``: ``"c:name"`` with class names, ``"c"`` without, ``"?"`` for an unknown (< 0)."""
    def label(c: int) -> str:
        c = int(c)
        if c < 0:
            return "?"
        if class_names and c < len(class_names):
            return f"{c}:{class_names[c]}"
        return str(c)
    return label


def _check_classes(run: Run) -> pa.Table | None:
    try:
        classes = run.classes()
    except FileNotFoundError:
        return None
    if classes.num_rows and "class" in classes.column_names:
        n = len(set(classes.column("class").to_pylist()))
        if n < 2:
            raise ReportError(f"run {run.url!r} has one class only "
                              f"({classes.column('class')[0].as_py()}): VoG is normalised and "
                              "ranked per class and errors by VoG need at least two classes")
    return classes


def _ood_plan(rspec, manifest: dict[str, Any], frame: Frame | None, splits_cfg: dict[str, Any]):
    """Validate report.ood against the run (before and after reading the table)."""
    ood = rspec.ood
    if ood is None:
        return None
    known = list(dict.fromkeys(list(manifest.get("splits") or {}) + list(splits_cfg)))
    if frame is not None:
        known = list(dict.fromkeys(known + frame.split_names))
    for s in [ood.in_distribution] + list(ood.ood_splits):
        if s not in known:
            raise ReportError(f"OoD split {s!r} (report.ood) is not a split of this run; "
                              f"splits: {known}")
    if not ood.ood_splits and not ood.group_column:
        raise ReportError("report.ood needs ood_splits and/or group_column")
    if ood.in_distribution in ood.ood_splits:
        raise ReportError(f"split {ood.in_distribution!r} is both in-distribution and OoD")
    if frame is not None:
        for s in [ood.in_distribution] + list(ood.ood_splits):
            if s not in frame.split_names:
                raise ReportError(f"OoD split {s!r} (report.ood) has no scored rows in this run")
    return ood


def _split_order(frame: Frame, ood_spec) -> list[str]:
    """In-distribution, the other labelled/unlisted splits (sorted), then the OoD splits."""
    ood_names = list(ood_spec.ood_splits) if ood_spec else []
    first = [ood_spec.in_distribution] if ood_spec else []
    return first + sorted(x for x in frame.split_names if x not in first and x not in ood_names) + \
        [x for x in ood_names if x in frame.split_names]


def load_context(run: Run, spec: Any = None) -> ReportContext:
    """Check ``run`` (a published run, see ``open_published``) against the settings, read its
    frame and rank every split by every key."""
    m = run.manifest
    cfg = m.get("config") or {}
    rspec = _report_spec(m, spec)
    splits_cfg = ((cfg.get("data") or {}).get("splits")) or {}
    class_names = (cfg.get("data") or {}).get("class_names")
    keys: list[str] = list(m["keys"])
    primary: str = m["primary"]
    windows: dict[str, list[int]] = dict(m["windows"])
    targets: list[str] = list(m["targets"])
    if primary not in keys:
        raise ReportError(f"primary key {primary!r} is not among the run's keys {keys}")
    schema = score_schema(run)
    classes_tbl = _check_classes(run)
    _ood_plan(rspec, m, None, splits_cfg)
    ood_spec = rspec.ood
    frame = load_frame(run, keys, flag_columns=rspec.flag_columns,
                       group_column=ood_spec.group_column if ood_spec else None, schema=schema,
                       windows=windows)
    if len(np.unique(frame.target)) < 2:
        raise ReportError(f"run {run.url!r} has one class only: VoG is normalised and ranked per "
                          "class and errors by VoG need at least two classes")
    _ood_plan(rspec, m, frame, splits_cfg)
    splits = _split_order(frame, ood_spec)
    idx = {s: frame.rows(s) for s in splits}
    ids_by_split = {s: frame.ids.take(pa.array(idx[s])) for s in splits}
    split_ranks: dict[tuple[str, str], np.ndarray] = {}
    for s in splits:
        for k in keys:
            split_ranks[(s, k)] = ranks_from_order(rank_order(frame.z[k][idx[s]], ids_by_split[s]))
    return ReportContext(
        run=run, manifest=m, config=cfg, settings=rspec, splits_cfg=splits_cfg,
        class_names=class_names, keys=keys, primary=primary, windows=windows,
        targets=targets, frame=frame, classes=classes_tbl, splits=splits, idx=idx,
        ids_by_split=ids_by_split, split_ranks=split_ranks, label_of=_class_label_fn(class_names))
