"""Published runs: the layout at the output URL, atomic publishing, and opening a run.

::

    <output>/runs/<run_id>/manifest.json      config, checkpoints (URL, size, sha256), versions,
                                              row counts, wall time, throughput, windows, keys
    <output>/runs/<run_id>/scores/*.parquet   the ranked score table (sorted by split, rank)
    <output>/runs/<run_id>/classes.parquet    per split and class: count, mean, std, error rate
    <output>/runs/<run_id>/rejected.parquet   rows that could not be scored, with the reason
    <output>/runs/<run_id>/report.*, figures/ written by ``vog-ray report``
    <output>/runs/<run_id>/_SUCCESS           written LAST: a run without it is not published
    <output>/LATEST                           the id of the newest published run

A reader (:func:`open_run`, :func:`list_runs`) never sees a run without ``_SUCCESS``, so a crash
or a failed upload never exposes a half-written run. Every run has its own id, so rerunning
never appends duplicate rows to an earlier run.
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import StorageOptions, atomic_write, join, list_files, resolve

__all__ = ["Run", "new_run_id", "open_run", "list_runs", "RunNotFound", "SUCCESS",
           "write_json", "read_json", "write_table", "publish"]

SUCCESS = "_SUCCESS"


class RunNotFound(FileNotFoundError):
    """No published run at that URL."""


def new_run_id(prefix: str = "") -> str:
    ts = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}{ts}-{secrets.token_hex(3)}"


def write_json(url: str, obj: Any, storage: StorageOptions | None = None) -> None:
    fs, path = resolve(url, storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def read_json(url: str, storage: StorageOptions | None = None) -> Any:
    fs, path = resolve(url, storage)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_table(url: str, table: pa.Table, storage: StorageOptions | None = None) -> None:
    fs, path = resolve(url, storage)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def publish(run_url: str, output_url: str, run_id: str, storage: StorageOptions | None = None) -> None:
    """Mark a fully written run as published: ``_SUCCESS`` last, then ``LATEST`` (each written
    atomically: a reader sees the old or the new content, never an empty file)."""
    atomic_write(join(run_url, SUCCESS), (run_id + "\n").encode(), storage)
    atomic_write(join(output_url, "LATEST"), (run_id + "\n").encode(), storage)


@dataclass
class Run:
    """A published run, opened for reading."""

    url: str
    manifest: dict[str, Any]
    storage: StorageOptions | None = None

    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id", self.url.rstrip("/").rsplit("/", 1)[-1])

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    def _read(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        fs, files = list_files(self.path(rel), self.storage)
        if not files:
            if not fs.exists(resolve(self.path(rel), self.storage)[1]):
                raise FileNotFoundError(f"run {self.url!r} has no {rel}")
            return pa.table({})
        tables = []
        for f in files:  # opened here, so closed here (pyarrow may close a file it opened later, on its own thread)
            with fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def scores(self, columns: list[str] | None = None) -> pa.Table:
        """The score table, sorted by (split, rank)."""
        t = self._read("scores", columns)
        if t.num_rows and (columns is None or {"split", "rank"} <= set(columns)):
            t = t.sort_by([("split", "ascending"), ("rank", "ascending")])
        return t

    def iter_scores(self, columns: list[str] | None = None, batch_size: int = 65536):
        """Stream the score table in record batches (for tables that do not fit in memory)."""
        fs, files = list_files(self.path("scores"), self.storage)
        for f in files:
            with fs.open(f, "rb") as fh, pq.ParquetFile(fh) as pf:
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)

    def classes(self) -> pa.Table:
        return self._read("classes.parquet")

    def rejected(self) -> pa.Table:
        return self._read("rejected.parquet")


def open_run(url: str, storage: StorageOptions | None = None) -> Run:
    """Open a published run: a run directory, or an output URL (opens its ``LATEST`` run)."""
    fs, path = resolve(url, storage)
    if fs.exists(path + "/" + SUCCESS):
        return Run(url.rstrip("/"), read_json(join(url, "manifest.json"), storage), storage)
    if fs.exists(path + "/LATEST"):
        with fs.open(path + "/LATEST", "r") as f:
            rid = f.read().strip()
        return open_run(join(url, "runs", rid), storage)
    if fs.exists(path + "/manifest.json") or fs.exists(path):
        raise RunNotFound(f"{url!r} is not a published run (no {SUCCESS} marker: the run is "
                          "incomplete, still being written, or failed)")
    raise RunNotFound(f"no run at {url!r}")


def list_runs(output_url: str, storage: StorageOptions | None = None) -> list[str]:
    """Ids of the published runs under an output URL, oldest first."""
    fs, path = resolve(join(output_url, "runs"), storage)
    if not fs.exists(path):
        return []
    out = []
    for d in fs.ls(path, detail=False):
        if fs.exists(d.rstrip("/") + "/" + SUCCESS):
            out.append(d.rstrip("/").rsplit("/", 1)[-1])
    return sorted(out)
