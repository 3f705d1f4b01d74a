#!/usr/bin/env python
"""Gradient-engine throughput, measured side by side in one run on the same data.

Three ways to get the per-checkpoint input-gradient maps of VoG (DESIGN.md §1), timed as
examples x checkpoints per second:

(a) ``engine``       ``GradientEngine.run`` with its default settings (targets ["logit"], window
                     {"all": "all"}, label_mode "true"): forward + input-only backward per
                     checkpoint, Welford moments, per-checkpoint signals, numpy results.
(b) ``bare``         a bare PyTorch loop doing the same batched work and nothing else: per
                     checkpoint a forward, ``autograd.grad(logits.gather(1, y).sum(), x)``, the
                     channel mean; parameters frozen; no moments, no signals.
(c) ``per_example``  the loop of the official VoG code: one example at a time, parameters with
                     ``requires_grad=True``, ``.backward()``, read ``x.grad`` (channel mean, numpy).

Before timing, the script asserts that (a) and (b) give the same gradient maps: bitwise for the
engine's plain path (NCHW, one checkpoint after the other), to float rounding for the settings
actually timed (the engine may pick channels_last and/or the stacked vmap path), and that the
engine's VoG equals VoG computed from (b)'s maps; (c)'s maps are checked against (b)'s too.

Repetitions are interleaved (a, b, c, a, b, c, ...) after a warm-up, with a fixed
``torch.set_num_threads``; the rates are medians. The last line printed is one JSON object.

    .venv/bin/python bench/engine.py --quick       # ~45 s of CPU time (1 thread)
    .venv/bin/python bench/engine.py               # the full run: ~5 min of CPU time
    .venv/bin/python bench/engine.py --clock cpu   # headline ratios from CPU time (busy machine)

On a machine shared with other jobs, wall-clock medians swing by 2x; the per-process CPU-time
rates (printed too, and in the JSON) are the steadier comparison at ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from vog_ray.core.engine import GradientEngine
from vog_ray.core.windows import resolve_windows
from vog_ray.models import build_model

MODELS = {
    # name: (model spec, input shape, classes)
    "lenet": ("lenet", (1, 28, 28), 10),
    "resnet18_cifar": ("resnet18_cifar", (3, 32, 32), 10),
    # not run by default (--models mlp): a model without convolutions
    "mlp": ({"name": "mlp", "in_features": 784, "hidden": [256, 128], "num_classes": 10}, (784,), 10),
}
SHORT = {"lenet": "lenet", "resnet18_cifar": "resnet", "mlp": "mlp"}
FULL = {
    "lenet": dict(n=2048, k=5, batch=256, per_example_n=512),
    "resnet18_cifar": dict(n=256, k=3, batch=64, per_example_n=32),
    "mlp": dict(n=8192, k=5, batch=256, per_example_n=1024),
}
QUICK = {
    "lenet": dict(n=512, k=5, batch=256, per_example_n=64),
    "resnet18_cifar": dict(n=32, k=3, batch=32, per_example_n=8),
    "mlp": dict(n=2048, k=5, batch=256, per_example_n=256),
}


def checkpoints(spec, k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``k`` random-init checkpoints; BatchNorm statistics and affine set to non-trivial values."""
    out = []
    for i in range(k):
        torch.manual_seed(seed + i)
        m = build_model(spec)
        g = torch.Generator().manual_seed(10_000 + seed + i)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                mod.bias.data.copy_(0.1 * torch.randn(c, generator=g))
        out.append({n: v.detach().clone() for n, v in m.state_dict().items()})
    return out


def copies(spec, sds, device, *, param_grads: bool) -> list[torch.nn.Module]:
    out = []
    for sd in sds:
        m = build_model(spec)
        m.load_state_dict(sd)
        m.to(device).eval()
        m.requires_grad_(param_grads)
        out.append(m)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the three variants
def engine_pass(engine: GradientEngine, X: torch.Tensor, Y: np.ndarray, batch: int) -> None:
    for a in range(0, len(X), batch):
        engine.run(X[a:a + batch], Y[a:a + batch])


def bare_pass(models, X: torch.Tensor, Yt: torch.Tensor, batch: int, keep: bool = False):
    kept = []
    for a in range(0, len(X), batch):
        x = X[a:a + batch].detach().requires_grad_(True)
        y = Yt[a:a + batch].view(-1, 1)
        for m in models:
            logits = m(x)
            (g,) = torch.autograd.grad(logits.gather(1, y).sum(), x)
            maps = g.mean(dim=1) if g.ndim > 2 else g
            if keep:
                kept.append(maps.detach())
    return kept


def per_example_pass(models, X: torch.Tensor, Yt: torch.Tensor, keep: bool = False):
    """One example at a time, parameters requiring grad, ``.backward()`` (official VoG code)."""
    kept = []
    for i in range(len(X)):
        for m in models:
            xi = X[i:i + 1].clone().requires_grad_(True)
            m.zero_grad(set_to_none=True)
            logits = m(xi)
            logits[0, Yt[i]].backward()
            g = xi.grad
            maps = (g.mean(dim=1) if g.ndim > 2 else g).cpu().numpy()
            if keep:
                kept.append(maps[0])
    return kept


# ---------------------------------------------------------------- honesty checks
# Input gradients of ReLU / max-pool networks are discontinuous: a rounding difference of 1e-7
# can flip one ReLU or one max-pool argmax, and with it a few pixels of one example's map (seen
# on random-init ResNet-18: 1 map in 192 off by 3e-3, while float32 vs float64 is 5e-7). So
# the checks of the settings actually timed count the maps that agree to MAP_RTOL and bound
# the overall (L2) difference; the engine's plain path must equal the bare loop bit for bit.
MAP_RTOL = 1e-5
MIN_AGREE = 0.95
MAX_L2 = 1e-3


def agreement(got: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Per map: max |got - ref| / max |ref|; the share within MAP_RTOL; overall L2 difference."""
    per = [float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref)]
    g, r = np.concatenate([a.ravel() for a in got]), np.concatenate([a.ravel() for a in ref])
    return {"maps": len(per), "agree": float(np.mean(np.asarray(per) <= MAP_RTOL)),
            "max_rel": max(per), "l2_rel": float(np.linalg.norm(g - r) / np.linalg.norm(r))}


def _assert_agree(what: str, a: dict) -> None:
    if a["agree"] < MIN_AGREE or a["l2_rel"] > MAX_L2:
        raise AssertionError(f"{what}: only {a['agree']:.1%} of {a['maps']} maps agree to "
                             f"{MAP_RTOL:g} (L2 difference {a['l2_rel']:.1e})")


def check_equal(name, base, sds, engine, X, Y, Yt, batch, device, models_bare, models_pe, pe_check):
    """(a) and (b) give the same maps; engine VoG == VoG of (b)'s maps; (c) == (b)."""
    K = len(sds)
    x, y, yt = X[:batch], Y[:batch], Yt[:batch]
    bare = [b.cpu() for b in bare_pass(models_bare, x, yt, batch, keep=True)]   # K x [n, H, W]
    single = {f"c{k}": [k] for k in range(K)}
    out = {}
    # 1. the engine's plain path (NCHW, one checkpoint after the other) is the bare loop, bitwise
    plain = GradientEngine(base, sds, windows=single, device=device, channels_last=False,
                           stacked=False)
    res = plain.run(x, y, emit="moments")
    for k in range(K):
        if not torch.equal(torch.as_tensor(res.moments[f"c{k}_logit"].mean), bare[k]):
            raise AssertionError(f"{name}: engine (plain path) map of checkpoint {k} differs "
                                 "from the bare loop's")
    out["plain_path_bitwise_equal"] = True
    # 2. the settings timed (channels_last / stacked as the engine chose them)
    timed = GradientEngine(base, sds, windows=single, device=device,
                           channels_last=engine.channels_last, stacked=bool(engine.uses_stacked))
    res = timed.run(x, y, emit="moments")
    got = [res.moments[f"c{k}_logit"].mean[i] for k in range(K) for i in range(len(x))]
    ref = [bare[k][i].numpy() for k in range(K) for i in range(len(x))]
    out["timed_settings"] = a = agreement(got, ref)
    _assert_agree(f"{name}: engine (timed settings) vs bare loop", a)
    # 3. the timed engine's VoG (window "all") vs VoG of the bare maps (float64, np.std ddof=0)
    vog = engine.run(x, y).vog["all_logit"]
    stack = torch.stack(bare).double().numpy()
    vref = stack.std(axis=0, ddof=0).reshape(len(x), -1).mean(axis=1)
    rel = np.abs(vog - vref) / np.abs(vref)
    out["vog"] = {"agree": float(np.mean(rel <= 1e-4)), "max_rel": float(rel.max()),
                  "median_rel": float(np.median(rel))}
    if out["vog"]["agree"] < MIN_AGREE:
        raise AssertionError(f"{name}: engine VoG differs from VoG of the bare maps "
                             f"(only {out['vog']['agree']:.1%} within 1e-4)")
    # 4. the per-example loop gives the same maps (on a few examples)
    n = min(pe_check, len(x))
    pe = per_example_pass(models_pe, X[:n], Yt[:n], keep=True)          # example-major
    out["per_example"] = a = agreement(pe, [bare[k][i].numpy() for i in range(n) for k in range(K)])
    _assert_agree(f"{name}: per-example loop vs bare loop", a)
    return out


# ---------------------------------------------------------------- one model
def bench_model(name: str, cfg: dict, args, device: torch.device) -> dict:
    spec, shape, classes = MODELS[name]
    K, N, B, NPE = cfg["k"], cfg["n"], cfg["batch"], cfg["per_example_n"]
    g = torch.Generator().manual_seed(args.seed)
    X = torch.randn(N, *shape, generator=g).to(device)
    Yt = torch.randint(0, classes, (N,), generator=g).to(device)
    Y = Yt.cpu().numpy()
    sds = checkpoints(spec, K, args.seed)
    base = build_model(spec)
    opts = {}
    if args.stacked != "default":
        opts["stacked"] = {"on": True, "off": False, "auto": "auto"}[args.stacked]
    if args.channels_last != "default":
        opts["channels_last"] = {"on": True, "off": False}[args.channels_last]
    engine = GradientEngine(base, sds, windows=resolve_windows({"all": "all"}, K),
                            targets=["logit"], label_mode="true", device=device, **opts)
    models_bare = copies(spec, sds, device, param_grads=False)
    models_pe = copies(spec, sds, device, param_grads=True)
    XPE, YPE = X[:NPE], Yt[:NPE]

    # warm-up (the engine's first batch also decides stacked="auto" by timing both paths)
    engine_pass(engine, X[:B], Y[:B], B)
    bare_pass(models_bare, X[:B], Yt[:B], B)
    per_example_pass(models_pe, XPE[:2], YPE[:2])
    checks = check_equal(name, base, sds, engine, X, Y, Yt, min(B, args.check_n), device,
                         models_bare, models_pe, pe_check=min(8, NPE))

    variants = {
        "engine": (N, lambda: engine_pass(engine, X, Y, B)),
        "bare": (N, lambda: bare_pass(models_bare, X, Yt, B)),
        "per_example": (NPE, lambda: per_example_pass(models_pe, XPE, YPE)),
    }
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for _ in range(args.reps):
        for v, (_, fn) in variants.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    wall_rate = {v: n * K / statistics.median(wall[v]) for v, (n, _) in variants.items()}
    cpu_rate = {v: n * K / statistics.median(cpu[v]) for v, (n, _) in variants.items()}
    rate = cpu_rate if args.clock == "cpu" else wall_rate
    return {
        "model": name, "input": list(shape), "examples": N, "checkpoints": K, "batch": B,
        "per_example_examples": NPE,
        "rates": rate, "cpu_rates": cpu_rate,
        "wall_s": wall, "cpu_s": cpu,
        "engine_vs_bare": rate["engine"] / rate["bare"],
        "engine_vs_per_example": rate["engine"] / rate["per_example"],
        "bare_vs_per_example": rate["bare"] / rate["per_example"],
        "wall_rates": wall_rate,
        "cpu_engine_vs_bare": cpu_rate["engine"] / cpu_rate["bare"],
        "cpu_engine_vs_per_example": cpu_rate["engine"] / cpu_rate["per_example"],
        "engine_path": {"stacked": bool(engine.uses_stacked), "channels_last": engine.channels_last,
                        "stack_timing_s": engine.stack_timing},
        "checks": checks,
    }


def table(results: list[dict]) -> str:
    lines = []
    hdr = (f"{'model':<15} {'variant':<16} {'examples':>8} {'K':>2} {'batch':>5} "
           f"{'ex*ckpt/s':>10} {'median s':>9} {'min..max s':>15} {'per cpu s':>10}")
    lines += [hdr, "-" * len(hdr)]
    for r in results:
        for v, label in (("engine", "(a) engine"), ("bare", "(b) bare loop"),
                         ("per_example", "(c) per-example")):
            n = r["per_example_examples"] if v == "per_example" else r["examples"]
            b = 1 if v == "per_example" else r["batch"]
            w = r["wall_s"][v]
            lines.append(f"{r['model']:<15} {label:<16} {n:>8} {r['checkpoints']:>2} {b:>5} "
                         f"{r['wall_rates'][v]:>10.1f} {statistics.median(w):>9.3f} "
                         f"{min(w):>7.3f}..{max(w):<7.3f} {r['cpu_rates'][v]:>10.1f}")
        p = r["engine_path"]
        wr = r["wall_rates"]
        lines.append(f"{'':<15} wall clock: engine/bare = {wr['engine'] / wr['bare']:.3f}   "
                     f"engine/per-example = {wr['engine'] / wr['per_example']:.2f}   "
                     f"bare/per-example = {wr['bare'] / wr['per_example']:.2f}")
        cr = r["cpu_rates"]
        lines.append(f"{'':<15} cpu time:   engine/bare = {cr['engine'] / cr['bare']:.3f}   "
                     f"engine/per-example = {cr['engine'] / cr['per_example']:.2f}   "
                     f"bare/per-example = {cr['bare'] / cr['per_example']:.2f}")
        c = r["checks"]
        lines.append(f"{'':<15} engine path: stacked={p['stacked']} channels_last={p['channels_last']}"
                     f"{'' if p['stack_timing_s'] is None else '  (auto timing: unstacked %.3f s, stacked %.3f s)' % tuple(p['stack_timing_s'])}")
        lines.append(f"{'':<15} checks: engine plain path == bare loop bitwise; timed settings: "
                     f"{c['timed_settings']['agree']:.1%} of {c['timed_settings']['maps']} maps within "
                     f"{MAP_RTOL:g} (L2 diff {c['timed_settings']['l2_rel']:.1e}); VoG: "
                     f"{c['vog']['agree']:.1%} within 1e-4 (median {c['vog']['median_rel']:.1e}); "
                     f"per-example: {c['per_example']['agree']:.1%} of {c['per_example']['maps']} maps")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 repetitions (~1 min)")
    ap.add_argument("--models", default="lenet,resnet18_cifar",
                    help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: the per-example loop cannot use more, "
                         "and single-threaded timings are stable on a shared machine)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5; 3 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="what the headline rates and ratios use: wall-clock time (default) or "
                         "this process's CPU time (steadier on a busy shared machine; only "
                         "meaningful with --threads 1). Both are always printed.")
    ap.add_argument("--check-n", type=int, default=32,
                    help="examples on which the variants' maps are compared before timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stacked", choices=["default", "auto", "on", "off"], default="default",
                    help="engine option (default: the engine's own default)")
    ap.add_argument("--channels-last", choices=["default", "on", "off"], default="default",
                    help="engine option (default: the engine's own default)")
    for m, short in SHORT.items():
        for key in ("n", "k", "batch", "per_example_n"):
            ap.add_argument(f"--{short}-{key.replace('_', '-')}", type=int, default=None,
                            dest=f"{short}_{key}", help=f"{m}: {key} (full: {FULL[m][key]}, quick: {QUICK[m][key]})")
    args = ap.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {list(MODELS)}")

    results = []
    for m in names:
        short = SHORT[m]
        cfg = dict((QUICK if args.quick else FULL)[m])
        for key in cfg:
            v = getattr(args, f"{short}_{key}")
            if v is not None:
                cfg[key] = v
        t0 = time.perf_counter()
        results.append(bench_model(m, cfg, args, device))
        print(f"[{m}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    print(table(results))
    by = {r["model"]: r for r in results}
    le, rn = by.get("lenet"), by.get("resnet18_cifar")
    summary = {
        "engine_vs_bare": le and round(le["engine_vs_bare"], 4),
        "engine_vs_per_example": le and round(le["engine_vs_per_example"], 3),
        "resnet_engine_vs_bare": rn and round(rn["engine_vs_bare"], 4),
        "resnet_engine_vs_per_example": rn and round(rn["engine_vs_per_example"], 3),
        "bare_vs_per_example": le and round(le["bare_vs_per_example"], 3),
        "resnet_bare_vs_per_example": rn and round(rn["bare_vs_per_example"], 3),
        **{f"{SHORT[r['model']]}_{k}": round(r[k], 4) for r in results
           if r["model"] not in ("lenet", "resnet18_cifar")
           for k in ("engine_vs_bare", "engine_vs_per_example", "bare_vs_per_example")},
        "wall_clock_ratios": {r["model"]: {
            "engine_vs_bare": round(r["wall_rates"]["engine"] / r["wall_rates"]["bare"], 4),
            "engine_vs_per_example": round(r["wall_rates"]["engine"] / r["wall_rates"]["per_example"], 3)}
            for r in results},
        "cpu_time_ratios": {r["model"]: {"engine_vs_bare": round(r["cpu_engine_vs_bare"], 4),
                                         "engine_vs_per_example": round(r["cpu_engine_vs_per_example"], 3)}
                            for r in results},
        "rates_examples_x_checkpoints_per_s": {
            r["model"]: {v: round(x, 2) for v, x in r["wall_rates"].items()} for r in results},
        "rates_examples_x_checkpoints_per_cpu_s": {
            r["model"]: {v: round(x, 2) for v, x in r["cpu_rates"].items()} for r in results},
        "engine_path": {r["model"]: r["engine_path"] for r in results},
        "checks": {r["model"]: r["checks"] for r in results},
        "settings": {
            "models": {r["model"]: {k: r[k] for k in ("input", "examples", "checkpoints", "batch",
                                                      "per_example_examples")} for r in results},
            "quick": args.quick, "reps": args.reps, "threads": args.threads, "seed": args.seed,
            "device": str(device), "engine_options": {"stacked": args.stacked,
                                                      "channels_last": args.channels_last},
            "targets": ["logit"], "windows": {"all": "all"}, "label_mode": "true",
            "clock": args.clock,
            "statistic": f"median {'process CPU' if args.clock == 'cpu' else 'wall-clock'} time "
                         "over interleaved repetitions",
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
        },
    }
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
