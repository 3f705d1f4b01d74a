#!/usr/bin/env python
"""What storing the incremental state in float16 (``vog.state_dtype: float16``) costs in z, on the
demo data: a reduced ``make demo`` (real MNIST with 20% shuffled labels, LeNet trained until it
memorises them, MNIST-C corruptions as a third split), audited incrementally twice — float32 and
float16 state — folding all checkpoints but the last, then the last one (so the float16 moments
are stored, read back, merged and stored again). Compared per split and per ``<window>_<target>``
column: max |Δz|, Spearman's rank correlation of z, the share of the top-decile ids that
agree, and the state's bytes per example of each.

Windows ``first:3`` and ``all`` (incremental audits need windows that do not slide), targets
logit and softmax, true labels (the corrupted test images keep theirs). The last line printed is
one JSON object.

    .venv/bin/python bench/state_dtype.py [--n-train 1000] [--max-epochs 25]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from incremental import start_ray  # noqa: E402 - bench/incremental.py, beside this script

WINDOWS = {"early": "first:3", "all": "all"}
TARGETS = ["logit", "softmax"]


def config(store: Path, ckpts: str, out: str, state_dtype: str):
    from vog_ray.config import validate

    data = store / "data"
    return validate({
        "name": "state-dtype",
        "data": {"splits": {"train": {"format": "parquet", "url": str(data / "train"), "id_column": "id"},
                            "test": {"format": "parquet", "url": str(data / "test"), "id_column": "id"},
                            "ood": {"format": "parquet", "url": str(data / "ood"), "id_column": "id"}},
                 "transform": {"channels": 1, "mean": [0.1307], "std": [0.3081]}},
        "model": "lenet", "checkpoints": ckpts,
        "vog": {"label": "true", "targets": TARGETS, "windows": WINDOWS, "state_dtype": state_dtype},
        "compute": {"device": "cpu", "batch_size": 256},
        "output": {"url": out}, "report": {"enabled": False}})


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def compare(run32: str, run16: str) -> dict:
    import pyarrow.compute as pc

    from vog_ray.runs import open_run

    a = open_run(run32).scores().sort_by([("split", "ascending"), ("id", "ascending")])
    b = open_run(run16).scores().sort_by([("split", "ascending"), ("id", "ascending")])
    assert a["id"].to_pylist() == b["id"].to_pylist()
    out = {}
    for split in sorted(set(a["split"].to_pylist())):
        sa, sb = (t.filter(pc.equal(t["split"], split)) for t in (a, b))
        for w in WINDOWS:
            for tg in TARGETS:
                za, zb = sa[f"z_{w}_{tg}"].to_numpy(), sb[f"z_{w}_{tg}"].to_numpy()
                va, vb = sa[f"vog_{w}_{tg}"].to_numpy(), sb[f"vog_{w}_{tg}"].to_numpy()
                top = max(1, len(za) // 10)
                ta, tb = set(np.argsort(-za)[:top]), set(np.argsort(-zb)[:top])
                out[f"{split}/{w}_{tg}"] = {"max_abs_dz": float(np.max(np.abs(za - zb))),
                                            "spearman_z": spearman(za, zb),
                                            "max_rel_dvog": float(np.max(np.abs(va - vb) / np.abs(va))),
                                            "top_decile_agreement": len(ta & tb) / top}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--n-ood", type=int, default=40, help="test images per corruption")
    ap.add_argument("--max-epochs", type=int, default=25)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("ray", "ray.data", "vog_ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray
    import ray.data

    from vog_ray.demo import DemoSizes, prepare
    from vog_ray.distributed.incremental import run_incremental

    root = Path(args.workdir or tempfile.mkdtemp(prefix="vog-bench-state-"))
    try:
        t = time.perf_counter()
        facts = prepare(root, DemoSizes(args.n_train, args.n_test, args.n_ood, args.max_epochs))
        ckpts = facts["checkpoints"]
        print(f"[reduced demo: {len(ckpts)} checkpoints in {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
        start_ray(os.cpu_count())
        ray.data.DataContext.get_current().enable_progress_bars = False
        runs, states = {}, {}
        for dtype in ("float32", "float16"):
            live = root / f"live-{dtype}"
            live.mkdir()
            for c in ckpts[:-1]:
                shutil.copy(c, live)
            cfg = config(facts["store"], str(live / "epoch_*.pt"), str(root / f"out-{dtype}"), dtype)
            run_incremental(cfg)
            shutil.copy(ckpts[-1], live)
            res = run_incremental(cfg)
            runs[dtype], states[dtype] = res.run_url, res.manifest["state"]
            print(f"[{dtype}: state {states[dtype]['bytes_per_example']:.0f} bytes per example]", file=sys.stderr,
                  flush=True)
        ray.shutdown()
        cmp = compare(runs["float32"], runs["float16"])
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'split/column':<24}{'max |Δz|':>10}{'Spearman z':>12}{'max rel ΔVoG':>14}{'top-10% kept':>14}")
    for k, v in cmp.items():
        print(f"{k:<24}{v['max_abs_dz']:>10.2e}{v['spearman_z']:>12.7f}{v['max_rel_dvog']:>14.2e}"
              f"{v['top_decile_agreement']:>14.3f}")
    ratio = states["float16"]["bytes_per_example"] / states["float32"]["bytes_per_example"]
    print(f"state bytes per example: float32 {states['float32']['bytes_per_example']:.0f}, float16 "
          f"{states['float16']['bytes_per_example']:.0f} ({ratio:.2f}×)")
    print(json.dumps({"max_abs_dz": max(v["max_abs_dz"] for v in cmp.values()),
                      "min_spearman_z": min(v["spearman_z"] for v in cmp.values()),
                      "min_top_decile_agreement": min(v["top_decile_agreement"] for v in cmp.values()),
                      "state_bytes_per_example": {k: v["bytes_per_example"] for k, v in states.items()},
                      "float16_vs_float32_bytes": round(ratio, 3), "columns": cmp,
                      "settings": {"n_train": args.n_train, "n_test": args.n_test, "n_ood_per_corruption": args.n_ood,
                                   "checkpoints": len(ckpts), "windows": WINDOWS, "targets": TARGETS,
                                   "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
