"""Exports of a run's ranked examples, for the people who act on them: CSV, Parquet, JSON lines,
or Label Studio's task import (the image URI and the current label as a pre-annotation, so a
labeling team can fix what the audit found). Every row carries id, split, label, prediction,
z (the ranked score), percentile and rank; ``vog-ray export`` and the explorer's export links
both write through :func:`write_export`.
"""

from __future__ import annotations

import base64
import io
import json
from typing import IO, Any, Sequence

import pyarrow as pa

from ..core.flags import FLAGGED
from .queries import Filters, RunTables

__all__ = ["FORMATS", "MEDIA_TYPES", "export_table", "write_export", "label_studio_tasks", "labeling_config"]

FORMATS = ("csv", "parquet", "jsonl", "labelstudio")
MEDIA_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet", "jsonl": "application/x-ndjson",
               "labelstudio": "application/json"}
LABEL_STUDIO_FROM = "label"   # the <Choices name=…> of labeling_config()
LABEL_STUDIO_TO = "image"     # the <Image name=…> of labeling_config()
LABEL_STUDIO_MIN_SIZE = 128   # small images are enlarged (nearest-neighbour) to at least this many pixels


def export_table(tables: RunTables, f: Filters | None = None, *, where_sql: str | None = None,
                 top: int | None = None) -> pa.Table:
    """The exported rows: id, split, label, pred, z, percentile, rank (+ flagged, + the class
    names), the highest scores first."""
    cols = ["id", "split", "label", "pred", "score", "percentile", "rank"] + \
        ([FLAGGED] if tables.has_flagged else [])
    t = tables.select(f, where_sql=where_sql, top=top, columns=cols)
    t = t.rename_columns([("z" if c == "score" else c) for c in t.column_names])
    names = ((tables.run.manifest.get("config") or {}).get("data") or {}).get("class_names")
    if names:
        def name_of(v: Any) -> str | None:
            return names[v] if v is not None and 0 <= v < len(names) else None
        t = t.append_column("label_name", pa.array([name_of(v) for v in t["label"].to_pylist()], pa.string()))
        t = t.append_column("pred_name", pa.array([name_of(v) for v in t["pred"].to_pylist()], pa.string()))
    return t


def labeling_config(class_names: Sequence[str]) -> str:
    """The Label Studio labeling config the ``labelstudio`` export's pre-annotations refer to."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(str(c))}/>" for c in class_names)
    return (f'<View>\n  <Image name="{LABEL_STUDIO_TO}" value="$image"/>\n'
            f'  <Choices name="{LABEL_STUDIO_FROM}" toName="{LABEL_STUDIO_TO}" choice="single" showInline="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def _class_value(label: int | None, names: Sequence[str] | None) -> str | None:
    if label is None or label < 0:
        return None
    return str(names[label]) if names and label < len(names) else str(label)


def _image_uris(tables: RunTables, rows: list[dict[str, Any]], storage: Any) -> dict[tuple[str, str], str]:
    """(split, id) -> an image URI: the source file of an image-folder split, else a PNG data URI."""
    from ..config import SplitSpec
    from ..data.fetch import fetch_images
    from ..report.figures import tile_png
    from ..storage import join

    splits = ((tables.run.manifest.get("config") or {}).get("data") or {}).get("splits") or {}
    out: dict[tuple[str, str], str] = {}
    by_split: dict[str, list[str]] = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(r["id"])
    for s, ids in by_split.items():
        spec = SplitSpec.model_validate(splits[s])
        if spec.format == "image_folder":
            out.update({(s, i): join(str(spec.url), i) for i in ids})
            continue
        for i, img in fetch_images(spec, ids, storage, on_error="skip").items():
            png = tile_png(img, min_size=LABEL_STUDIO_MIN_SIZE)
            out[(s, i)] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return out


def label_studio_tasks(tables: RunTables, t: pa.Table, storage: Any = None) -> list[dict[str, Any]]:
    """Label Studio tasks (its JSON task import): ``data`` holds the image URI and the audit's
    numbers, ``predictions`` the current label as a pre-annotation of ``labeling_config``."""
    names = ((tables.run.manifest.get("config") or {}).get("data") or {}).get("class_names")
    rows = t.to_pylist()
    uris = _image_uris(tables, rows, storage)
    version = f"vog-ray {tables.run.run_id} ({tables.primary})"
    tasks = []
    for r in rows:
        task: dict[str, Any] = {"data": {"image": uris.get((r["split"], r["id"])), **{
            k: v for k, v in r.items() if k not in ("label_name", "pred_name")}}}
        current = _class_value(r["label"], names)
        if current is not None:
            task["predictions"] = [{"model_version": version, "score": r["z"], "result": [{
                "from_name": LABEL_STUDIO_FROM, "to_name": LABEL_STUDIO_TO, "type": "choices",
                "value": {"choices": [current]}}]}]
        tasks.append(task)
    return tasks


def write_export(tables: RunTables, t: pa.Table, fmt: str, out: IO[bytes], storage: Any = None) -> None:
    """Write the rows ``t`` (:func:`export_table`) to the binary stream ``out`` in ``fmt``."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(t, out)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(t, out)
    elif fmt == "jsonl":
        text = io.TextIOWrapper(out, encoding="utf-8", newline="\n")
        for r in t.to_pylist():
            text.write(json.dumps(r, allow_nan=False) + "\n")
        text.flush()
        text.detach()
    elif fmt == "labelstudio":
        out.write(json.dumps(label_studio_tasks(tables, t, storage), indent=1, allow_nan=False).encode("utf-8"))
    else:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
