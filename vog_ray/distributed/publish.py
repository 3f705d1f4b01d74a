"""Publishing a run: the ranked score table (with the ``flagged`` column when the config has
``flags``), ``flagged.parquet``, ``rejected.parquet``, ``classes.parquet`` and the manifest are
written under ``<output>/runs/<run_id>/``, then ``_SUCCESS`` and ``LATEST``
(:func:`vog_ray.runs.publish`). A failure removes what was written; a run without ``_SUCCESS``
is never listed or opened."""

from __future__ import annotations

import os
import platform
import re
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from .. import __version__
from ..config import FlagsSpec, redact
from ..core.flags import flag_block, flagged_rows
from ..core.table import dictionary_columns
from ..runs import SUCCESS, publish, write_json, write_table
from ..storage import StorageOptions, join, list_files, resolve
from .reduce import Reduced, cast_carried, rejected_columns

__all__ = ["write_run", "write_flagged", "publish_failed", "top_ids", "versions", "check_writable"]


def versions() -> dict[str, str]:
    """Library versions for the manifest."""
    import pyarrow
    import ray
    import torch

    return {"vog_ray": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "pyarrow": pyarrow.__version__, "python": platform.python_version()}


def check_writable(url: str, storage: StorageOptions) -> None:
    """Write and delete a probe object under ``<output>/_work``: an output that cannot be written
    fails here, before any work, with an error naming it."""
    probe = join(url.rstrip("/"), "_work", f".probe-{os.getpid()}-{time.time_ns()}")
    try:
        fs, path = resolve(probe, storage)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    except Exception as e:  # noqa: BLE001 - permission, missing bucket, a file in the way, no network …
        raise PermissionError(f"output.url {redact(url)!r} cannot be written: "
                              f"{type(e).__name__}: {redact(str(e))}") from None


def write_flagged(red: Reduced, flags: FlagsSpec, run_url: str, storage: StorageOptions,
                  fs_out: Any, ranked: Any = None) -> tuple[Any, dict[str, Any]]:
    """Write ``flagged.parquet`` (the flagged rows of ``ranked``, default ``red.ranked``, one file).
    Returns the ranked rows with the ``flagged`` column (lazy: computed again per block as the
    scores are written) and the rules and counts for the manifest."""
    ranked = red.ranked if ranked is None else ranked
    rules = flags.rules(sorted(red.scored_by_split))
    kw = {"fn_kwargs": {"rules": rules, "sizes": dict(red.scored_by_split)}, "batch_format": "pyarrow",
          "batch_size": None}
    only = ranked.map_batches(flagged_rows, **kw).materialize()
    url = join(run_url, "flagged.parquet")
    counts: dict[str, int] = {}
    for b in only.iter_batches(batch_format="pyarrow", batch_size=None):
        for s, n in zip(*np.unique(b.column("split").to_numpy(zero_copy_only=False).astype(str),
                                   return_counts=True)):
            counts[str(s)] = counts.get(str(s), 0) + int(n)
    if counts:
        only.repartition(1).write_parquet(url, filesystem=fs_out, mode="overwrite")
    else:  # an empty write on S3 fails: one empty file with the columns of the scores
        first = next(iter(ranked.iter_batches(batch_format="pyarrow", batch_size=1)))
        write_table(join(url, "empty.parquet"), flag_block(first.slice(0, 0), rules, red.scored_by_split), storage)
    summary = {"rules": rules, "flagged_by_split": {s: counts.get(s, 0) for s in rules},
               "ground_truth": flags.ground_truth}
    return ranked.map_batches(flag_block, **kw), summary


def write_run(red: Reduced, run_url: str, out_url: str, run_id: str, storage: StorageOptions,
              manifest: dict[str, Any], *, t0: float, flags: FlagsSpec | None = None,
              carried: dict[str, Any] | None = None, gate: Callable[[str], None] | None = None) -> None:
    """Write the run's tables and ``manifest`` (completed with ``wall_time_s`` since ``t0``, the
    tables' write time in ``timings_s`` and, with ``flags``, the flag rules and counts), check it
    with ``gate(run_url)`` (the run validator, which raises when an invariant breaks), then publish
    it. ``carried``: the carried columns and their source types (null when unknown), kept in both
    tables. Any failure removes what was written and raises :func:`publish_failed`'s error."""
    fs_out, _ = resolve(out_url, storage)
    t = time.perf_counter()
    carried = dict(carried or {})
    typed = {c: typ for c, typ in carried.items() if not pa.types.is_null(typ)}
    try:
        ranked = red.ranked.map_batches(cast_carried, fn_kwargs={"types": typed}, batch_format="pyarrow") \
            if typed else red.ranked
        dictionary = dictionary_columns(red.ranked.schema().base_schema)
        if flags is not None:
            ranked, manifest["flags"] = write_flagged(red, flags, run_url, storage, fs_out, ranked)
            dictionary.append("flagged")
        ranked.write_parquet(join(run_url, "scores"), filesystem=fs_out, mode="overwrite", use_dictionary=dictionary)
        if red.rows_rejected:  # an empty write on S3 fails: Ray then deletes a prefix that never existed
            red.rejected.map_batches(rejected_columns, fn_kwargs={"carried": carried}, batch_format="pyarrow") \
                .repartition(1).write_parquet(join(run_url, "rejected.parquet"), filesystem=fs_out, mode="overwrite")
        else:
            write_table(join(run_url, "rejected.parquet", "empty.parquet"), rejected_columns(None, carried), storage)
        write_table(join(run_url, "classes.parquet"), red.classes, storage)
        manifest["wall_time_s"] = time.time() - t0
        manifest.setdefault("timings_s", {})["publish (tables)"] = round(time.perf_counter() - t, 3)
        write_json(join(run_url, "manifest.json"), manifest, storage)
        if gate is not None:
            t_gate = time.perf_counter()
            gate(run_url)
            manifest["timings_s"]["validate"] = round(time.perf_counter() - t_gate, 3)
            write_json(join(run_url, "manifest.json"), manifest, storage)
        publish(run_url, out_url, run_id, storage)
    except Exception as e:  # noqa: BLE001 - any failure to write the run is reported the same way
        raise publish_failed(run_url, run_id, storage, e) from None


def publish_failed(run_url: str, run_id: str, storage: StorageOptions, e: BaseException) -> RuntimeError:
    """The error for a run that could not be written; removes what was written (best effort)."""
    root: BaseException = e
    while (getattr(root, "cause", None) or root.__cause__) not in (None, root):
        root = getattr(root, "cause", None) or root.__cause__
    msg = redact(str(root) or type(root).__name__)
    # Ray Data appends retry-tuning hints to I/O errors: keep the error and what failed
    msg = "; ".join(x.strip() for x in re.split(r"\n(?:This looks like|To change retry)", msg)[0].splitlines()
                    if x.strip())
    where = redact(run_url)
    try:
        fs, path = resolve(run_url, storage)
        if fs.exists(path + "/" + SUCCESS):
            return RuntimeError(f"run {run_id} was published at {where}, but LATEST could not be updated: {msg}")
        fs.rm(path, recursive=True)
    except Exception:  # noqa: BLE001 - the store may be unreachable: readers ignore it anyway
        pass
    return RuntimeError(f"could not publish run {run_id} to {where}: {msg}; nothing was published "
                        f"(a run without {SUCCESS} is never listed or opened)")


def top_ids(run_url: str, storage: StorageOptions, splits: list[str], k: int = 10) -> dict[str, list[str]]:
    """The ``k`` highest-ranked ids of each split, read from the head of the sorted score table:
    Parquet row-group statistics skip every row group whose ranks are all above ``k``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, files = list_files(join(run_url, "scores"), storage)
    best: dict[str, list[tuple[int, str]]] = {}
    if files:
        t = pads.dataset(files, filesystem=fs, format="parquet").to_table(
            columns=["id", "split", "rank"], filter=pc.field("rank") <= k)
        for i, s, r in zip(t["id"].to_pylist(), t["split"].to_pylist(), t["rank"].to_pylist()):
            best.setdefault(s, []).append((r, i))
    return {s: [i for _, i in sorted(best.get(s, []))] for s in splits}

