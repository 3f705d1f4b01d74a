"""Incremental (scheduled) audits: fold only the new checkpoints of a training run in.

State at ``<output>/_incremental/``::

    state.json            generation, the checkpoints folded so far (URL, size, sha256), the
                          config key, and where the per-example pixel moments of that generation live
    gen-<g>-<token>/moments/*.parquet   per example: (n, mean, M2) per window and target over the
                          checkpoints folded so far, and the per-checkpoint signals (generation 1
                          keeps them under ``gen-…/parts/``, the scorer's output, without a copy);
                          zstd-compressed, the moments in ``vog.state_dtype`` (float32; float16
                          halves them: see :mod:`.merge`). Each run's manifest says the state's
                          size (``state.bytes_per_example``)
    lock                  held (exclusive create, :mod:`.lock`) while a run folds checkpoints in

A run lists the checkpoint prefix, compares it with ``state.json``, computes gradient maps for
the **new checkpoints only**, merges them into the persisted moments (Chan), publishes a new
ranked run (and its report), and then commits the next generation. Nothing new: it says so and
writes nothing.

Rules, enforced with clear errors:

* ``vog.label`` must be ``true``: with predicted labels the target index depends on the last
  checkpoint, which changes every time a checkpoint arrives, so earlier gradient maps would be
  of the wrong target.
* Windows must not slide: ``all``, ``first:N``, ``a:`` / ``a:b`` slices with a non-negative start
  and explicit index lists are fine; ``last:N`` (and negative slices) move as checkpoints
  arrive, so they cannot be folded incrementally — run a full audit for them.
* Checkpoints only get appended: a folded checkpoint that changed or disappeared is an error.
* Every window needs two checkpoints: with fewer listed, the run waits (:class:`TooFewCheckpoints`:
  nothing written; the CLI exits 0); a window no number of checkpoints fills is a config error.
* Two runs at once: the lock (exclusive create, also on S3 via conditional writes) lets one
  proceed; the other fails saying who holds it. The commit is also a compare-and-swap on the
  state's generation.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any


from ..config import AuditConfig
from ..core.windows import parse_window, resolve_windows
from ..models.checkpoints import CheckpointInfo, hash_checkpoints
from ..storage import StorageOptions, join, resolve
from .audit import AuditResult, Plan, list_config_checkpoints, plan_audit, reduce_and_publish
from .cluster import check_address
from .lock import DirLock
from .lock import LockHeld as DirLockHeld
from .merge import merge_by_example, moments_to_table, set_group
from .reduce import RAW_ROWS_PER_READ, filter_status, read_raw, rejected_of_group0
from .sort import partitions_for
from .stage import PRECISION_CHECKS, precision_record, score_stage

__all__ = ["run_incremental", "IncrementalError", "IncrementalConfigError", "StateLock", "LockHeld", "read_state",
           "check_incremental_config", "TooFewCheckpoints", "check_window_counts", "state_size", "state_write_args",
           "folded", "STATE_COMPRESSION"]

STATE_COMPRESSION = "zstd"


def state_write_args(keys: list[str]) -> dict[str, Any]:
    """How the state's Parquet files are written: zstd; no dictionary pages (per-pixel floats
    never repeat: the dictionary attempt only adds bytes); the moments' floats byte-stream-split
    (their exponent bytes then compress). Measured on 200 rows of 1024 pixels (float32 moments of
    a 32×32 input): 11.9 KB a row with pyarrow's defaults, 6.9 KB so."""
    floats = [f"{p}{k}.list.element" for k in keys for p in ("mmean_", "mm2_")]  # the leaf columns
    return {"compression": STATE_COMPRESSION, "use_dictionary": False, "use_byte_stream_split": floats}


class IncrementalError(RuntimeError):
    """The incremental state cannot be advanced (changed checkpoints, changed config, lost race)."""


class TooFewCheckpoints(IncrementalError):
    """The windows need more checkpoints than the training run has written so far: nothing to
    publish yet (every window needs at least two)."""


# "as many checkpoints as a training run will write": a window that no count of this size
# satisfies (``first:1``, ``0:1``) is a config error, one that this count satisfies is waiting
FUTURE_CHECKPOINTS = 10_000


def check_window_counts(cfg: AuditConfig, num_checkpoints: int) -> None:
    """Raise :class:`TooFewCheckpoints` when the windows need more checkpoints than are listed,
    and a ``ConfigError`` when no number of checkpoints would do."""
    try:
        resolve_windows(cfg.vog.windows, num_checkpoints)
    except ValueError as e:
        try:
            resolve_windows(cfg.vog.windows, max(num_checkpoints, FUTURE_CHECKPOINTS))
        except ValueError as never:
            raise cfg.error("vog.windows", str(never)) from None
        raise TooFewCheckpoints(f"{num_checkpoints} checkpoint(s) so far, too few for the windows ({e}); "
                                "nothing was written") from None


class LockHeld(IncrementalError, DirLockHeld):
    """Another incremental audit holds the lock."""


class IncrementalConfigError(IncrementalError):
    """The config breaks a rule of incremental audits; ``key`` names the config key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check_incremental_config(cfg: AuditConfig) -> None:
    if cfg.vog.label != "true":
        raise IncrementalConfigError(
            "vog.label", "incremental audits require vog.label: true — with predicted labels the target index "
            "comes from the last checkpoint, which changes as checkpoints arrive (run a full audit instead)")
    bad = [f"{n} = {s!r}" for n, s in cfg.vog.windows.items() if parse_window(n, s).slides]
    if bad:
        raise IncrementalConfigError(
            "vog.windows", f"incremental audits need windows that do not slide as checkpoints arrive; {', '.join(bad)} "
            "moves with the newest checkpoint (use 'all', 'first:N', 'a:' or explicit indices, or run a full audit)")


def _config_key(cfg: AuditConfig) -> str:
    d = cfg.to_dict()
    vog = {k: v for k, v in d["vog"].items() if k != "normalize_against"}  # the reduce's choice only
    keep = {"data": d["data"], "model": d["model"], "vog": vog}
    if cfg.compute.precision != "fp32":  # moments of another arithmetic are not folded into these
        keep["precision"] = cfg.compute.precision
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def read_state(state_url: str, storage: StorageOptions | None) -> dict[str, Any] | None:
    fs, path = resolve(join(state_url, "state.json"), storage)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


class StateLock(DirLock):
    """The incremental state's lock (``<output>/_incremental/lock``)."""

    what = "another incremental audit"
    error = LockHeld


def folded(state: dict[str, Any] | None) -> dict[str, CheckpointInfo]:
    """The checkpoints the state holds (url → info): while their stored size and version tag are
    unchanged (an ETag, a generation, a file's mtime and inode), they are not read and hashed again."""
    return {d["url"]: CheckpointInfo(d["url"], d["size"], d["sha256"], d.get("version", ""))
            for d in (state or {}).get("checkpoints", [])}


def _new_checkpoints(plan_urls: list[str], infos: list[Any], state: dict[str, Any] | None) -> list[int]:
    done = state["checkpoints"] if state else []
    if len(done) > len(plan_urls):
        raise IncrementalError(f"{len(done)} checkpoints were folded in before, but only {len(plan_urls)} are listed now")
    for i, d in enumerate(done):
        if plan_urls[i] != d["url"] or infos[i].sha256 != d["sha256"]:
            raise IncrementalError(
                f"checkpoint {i} changed since it was folded in: was {d['url']} (sha256 {d['sha256'][:12]}…), "
                f"now {plan_urls[i]} (sha256 {infos[i].sha256[:12]}…); checkpoints may only be appended — "
                "start a new output URL to audit a different run")
    return list(range(len(done), len(plan_urls)))


def run_incremental(cfg: AuditConfig, *, address: str | None = None, report: bool | None = None,
                    run_id: str | None = None) -> AuditResult | None:
    """Fold new checkpoints into the persisted moments and publish a new run; ``None`` if up to
    date; :class:`TooFewCheckpoints` while the windows need more checkpoints than are listed."""
    t0 = time.time()
    check_address(address)
    check_incremental_config(cfg)
    storage = cfg.storage.options()
    out_url = cfg.output.url.rstrip("/")
    state_url = join(out_url, "_incremental")
    urls = list_config_checkpoints(cfg, storage)
    check_window_counts(cfg, len(urls))
    state = read_state(state_url, storage)
    if state and state.get("config_key") != _config_key(cfg):
        raise IncrementalError(
            "the config's data/model/vog settings changed since the incremental state was created; "
            f"use a new output URL (or delete {state_url} to start over)")
    if state and len(state["checkpoints"]) == len(urls):
        infos = hash_checkpoints(urls, storage, known=folded(state))
        _new_checkpoints(urls, infos, state)  # raises if a folded checkpoint changed
        return None
    with StateLock(state_url, storage):
        state = read_state(state_url, storage)  # re-read under the lock
        generation = state["generation"] if state else 0
        t = time.perf_counter()
        plan = plan_audit(cfg, address, urls=urls, known=folded(state))
        steps: dict[str, float] = {"plan": round(time.perf_counter() - t, 3)}
        new_idx = _new_checkpoints(plan.urls, plan.infos, state)
        digests = {name: v["sha256"] for name, v in plan.inputs.items()}
        if state and state.get("inputs", digests) != digests:
            changed = sorted(n for n in digests if state["inputs"].get(n) != digests[n])
            raise IncrementalError(
                f"the input files of split(s) {', '.join(changed)} changed since their moments were persisted; "
                f"folding new checkpoints into them would mix old and new data: use a new output URL (or delete "
                f"{state_url} to start over)")
        if not new_idx:
            return None
        t_score = time.time()
        gen_url = join(state_url, f"gen-{generation + 1:06d}-{secrets.token_hex(3)}")
        parts_url, moments_url, raw_url = (join(gen_url, d) for d in ("parts", "moments", "raw"))
        committed = False
        try:
            check_url = join(gen_url, PRECISION_CHECKS)
            t = time.perf_counter()
            devices = score_stage(plan, [new_idx], "moments", parts_url, check_url=check_url,
                                  moment_dtype=cfg.vog.state_dtype, write_args=state_write_args(plan.keys))
            steps["score new checkpoints"] = round(time.perf_counter() - t, 3)
            if state is None:  # the first generation: the new checkpoints' moments ARE the state
                moments_url = parts_url
            t = time.perf_counter()
            _fold(plan, state, parts_url, moments_url, raw_url)
            steps["fold into the state"] = round(time.perf_counter() - t, 3)
            score_wall = time.time() - t_score
            result = reduce_and_publish(
                plan, raw_url, run_id=run_id, t0=t0, score_wall=score_wall, report=report,
                scored_checkpoints=len(new_idx),
                extra={"mode": "incremental", "generation": generation + 1,
                       "new_checkpoints": [plan.urls[i] for i in new_idx], "state_url": state_url, **devices,
                       "precision": precision_record(cfg, check_url, storage),
                       "state": state_size(moments_url, storage, sum(plan.rows_in.values()), cfg.vog.state_dtype),
                       "incremental_steps_s": steps})
            _commit(state_url, storage, generation, {
                "generation": generation + 1, "config_key": _config_key(cfg), "inputs": digests,
                "checkpoints": [i.as_dict() for i in plan.infos], "moments_url": moments_url,
                "windows": plan.windows, "keys": plan.keys, "last_run": result.run_id,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            committed = True
        finally:
            if not committed:  # failed or lost the race: drop this generation's work files
                _drop_uncommitted(state_url, gen_url, storage)
        for p in (parts_url, raw_url):
            if p != moments_url:
                _rm(p, storage)
        if state and state.get("moments_url"):
            _rm(state["moments_url"].rsplit("/", 1)[0], storage)
        return result


def _commit(state_url: str, storage: StorageOptions, generation: int, new_state: dict[str, Any]) -> None:
    """Write ``new_state`` as the state of generation ``generation + 1``: a compare-and-swap on the
    generation (a run that lost a race publishes but never overwrites the state), written to a
    temporary object and moved into place."""
    current = read_state(state_url, storage)
    if (current["generation"] if current else 0) != generation:
        raise IncrementalError("the incremental state advanced while this run was folding (lost a race); "
                               "the published run stands, the state was not overwritten")
    fs, path = resolve(join(state_url, "state.json"), storage)
    tmp = path + f".tmp-{secrets.token_hex(3)}"
    with fs.open(tmp, "w") as f:
        json.dump(new_state, f, indent=2)
    fs.mv(tmp, path)


def state_size(moments_url: str, storage: StorageOptions, rows: int, dtype: str) -> dict[str, Any]:
    """What the persisted moments take: bytes in all, per example, and how they are stored."""
    fs, path = resolve(moments_url, storage)
    total = sum(int(v.get("size") or 0) for v in fs.find(path, detail=True).values()) if fs.exists(path) else 0
    return {"bytes": total, "bytes_per_example": round(total / max(rows, 1), 1), "dtype": dtype,
            "compression": STATE_COMPRESSION}


def _drop_uncommitted(state_url: str, gen_url: str, storage: StorageOptions) -> None:
    """Best effort: remove a generation that the state does not point at (never raises)."""
    try:
        cur = read_state(state_url, storage)
        if cur and str(cur.get("moments_url", "")).startswith(gen_url + "/"):
            return  # the state was written after all (e.g. a move that failed after its copy)
        _rm(gen_url, storage)
    except Exception:  # noqa: BLE001 - cleanup must not hide the original error
        pass


def _rm(url: str, storage: StorageOptions) -> None:
    fs, path = resolve(url, storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _fold(plan: Plan, state: dict[str, Any] | None, parts_url: str, moments_url: str, raw_url: str) -> None:
    """The next generation: the previous moments (group 0) ⊕ the new checkpoints' (group 1) merged
    by example and written to ``moments_url`` (the first generation's moments are ``parts_url``
    itself), and the score rows they give written to ``raw_url`` — each input read once."""
    fs, _ = resolve(parts_url, plan.storage)
    n = sum(plan.rows_in.values())
    new = read_raw(parts_url, plan.storage, partitions_for(n, RAW_ROWS_PER_READ)).ds
    if state is None:
        moments = new
    else:
        old = read_raw(state["moments_url"], plan.storage, partitions_for(n, RAW_ROWS_PER_READ)).ds
        ok = [d.map_batches(filter_status, fn_kwargs={"ok": True}, batch_format="pyarrow").map_batches(
            set_group, fn_kwargs={"group": g}, batch_format="pyarrow") for g, d in ((0, old), (1, new))]
        rejected = new.map_batches(filter_status, fn_kwargs={"ok": False}, batch_format="pyarrow")
        merged = merge_by_example(ok[0].union(ok[1]), plan.keys, 2, 2 * n, plan.cfg.vog.state_dtype)
        moments = rejected if merged is None else merged.union(rejected).materialize()
        moments.write_parquet(moments_url, filesystem=fs, mode="overwrite", **state_write_args(plan.keys))
    scored = moments.map_batches(filter_status, fn_kwargs={"ok": True}, batch_format="pyarrow") \
        .map_batches(moments_to_table, fn_kwargs={"vog_keys": plan.keys}, batch_format="pyarrow")
    bad = moments.map_batches(rejected_of_group0, batch_format="pyarrow")
    scored.union(bad).write_parquet(raw_url, filesystem=fs, mode="overwrite")
