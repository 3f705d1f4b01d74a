#!/usr/bin/env python
"""One prepared benchmark for one GPU: the engine's speed per model and precision, against the card's
peak and a bare PyTorch loop; overlapped transfers, channels_last and compile; GPU JPEG decode; the
Ray pipeline's steady state against the engine alone; the fidelity of tf32/bf16 against fp32.

Sections (each guarded: one that fails is printed and recorded, the others still run; each starts
only if the time budget leaves it room; the JSON so far is rewritten to ``--out`` after each):

``flops``     FLOPs per example·checkpoint of one forward + input-only backward (one target),
              counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 × multiply-adds).
``engine``    per model (``resnet18_cifar`` 32×32, ``torchvision:resnet50`` 224×224) and precision
              (fp32, tf32, bf16): ``GradientEngine`` example×checkpoints/s from host batches (its
              production input: pinned copies overlapped on a side stream) and from batches already
              on the device; achieved TFLOP/s and the share of the card's dense peak for that
              precision; in tf32/bf16 also the other memory layout (``channels_last_speedup``: the
              engine's default layout over the other one).
``bare``      a bare bf16 channels_last loop (forward + ``autograd.grad`` of the summed label logits,
              frozen parameters) on device batches: ``engine_vs_bare_gpu`` = engine bf16 / bare.
``transfer``  engine bf16 from host batches one at a time (copy, then compute) vs ``run_batches``
              (copy of batch i+1 during batch i) vs device batches: ``overlap_gain``, ``copy_cost``.
``compile``   ``compile=True`` vs eager, bf16 (compile time reported apart).
``decode``    JPEG photos (scikit-learn's sample images cut into 256–400 px tiles) resized 256 /
              cropped 224: the decode stage's CPU path per core vs ``decode_on_device`` on the GPU,
              and the largest pixel difference between them.
``fidelity``  ``bench/precision.py``'s measurement on the device: resnet18_cifar trained briefly,
              tf32 and bf16 z against fp32 per window and target.
``pipeline``  ``run_audit`` on JPEG Parquet (resnet50 bf16, one actor on the GPU, the other CPUs
              decoding) — steady state from the actor's trace as in bench/pipeline.py — over the
              engine alone on the same decoded images: ``pipeline_vs_engine_gpu``, and with
              ``transform.decode_on: gpu``: ``pipeline_vs_engine_gpu_decode``.

The peak comes from ``PEAK_TFLOPS`` (dense, NVIDIA datasheets) by the card's name, or
``--peak-tflops bf16=989,tf32=494,fp32=67``. Last line: one JSON object.

    .venv/bin/python bench/gpu.py --out gpu.json                 # one GPU: under 8 minutes on an H200
    .venv/bin/python bench/gpu.py --device cpu --quick           # the same code on the CPU (tests run it;
                                                                 # add --skip none to compile on the CPU too)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16")
# dense tensor-core peaks (TFLOP/s: bf16, tf32, fp32), NVIDIA datasheets (the "with sparsity" figures
# halved); matched against torch.cuda.get_device_name() in this order (the first substring found)
PEAK_TFLOPS = [
    ("H200", {"bf16": 989, "tf32": 494, "fp32": 67}),
    ("H100 PCIe", {"bf16": 756, "tf32": 378, "fp32": 51}),
    ("H100 NVL", {"bf16": 835, "tf32": 418, "fp32": 60}),
    ("H100", {"bf16": 989, "tf32": 494, "fp32": 67}),            # SXM
    ("A100", {"bf16": 312, "tf32": 156, "fp32": 19.5}),
    ("L40S", {"bf16": 362, "tf32": 183, "fp32": 91.6}),
    ("L4", {"bf16": 121, "tf32": 60, "fp32": 30.3}),
    ("A10G", {"bf16": 125, "tf32": 62.5, "fp32": 31.2}),         # the A10 datasheet (AWS lists no other)
    ("A10", {"bf16": 125, "tf32": 62.5, "fp32": 31.2}),
]
MODELS = {"resnet18_cifar": ({"name": "resnet18_cifar", "num_classes": 10}, (3, 32, 32), 10),
          "resnet50": ("torchvision:resnet50", (3, 224, 224), 1000)}
# per model: batch, checkpoints, input shape, batches per timed pass; quick CPU runs shrink all and
# time resnet50 at 32×32 (FLOPs are still counted at 224×224 too)
SIZES = {"resnet18_cifar": dict(batch=512, k=3, shape=(3, 32, 32), batches=4),
         "resnet50": dict(batch=128, k=3, shape=(3, 224, 224), batches=4)}
QUICK = {"resnet18_cifar": dict(batch=4, k=2, shape=(3, 32, 32), batches=2),
         "resnet50": dict(batch=2, k=2, shape=(3, 32, 32), batches=2)}


def peaks_for(name: str, override: str | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {p: None for p in PRECISIONS}
    for key, vals in PEAK_TFLOPS:
        if key in name:
            out.update(vals)
            break
    for part in (override or "").split(","):
        if part.strip():
            p, _, v = part.partition("=") if "=" in part else ("bf16", "", part)
            out[p.strip()] = float(v)
    return out


class Run:
    """Results, per-section status, the time budget, and the incremental ``--out`` file."""

    def __init__(self, budget_s: float, out: str | None):
        self.t0, self.budget, self.out = time.perf_counter(), budget_s, out
        self.res: dict[str, Any] = {"sections": {}}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def section(self, name: str, need_s: float, fn: Callable[[], Any]) -> None:
        rec: dict[str, Any] = {}
        if self.left() < need_s:
            rec = {"status": "skipped", "reason": f"{self.left():.0f} s of the budget left, needs ~{need_s:.0f} s"}
            print(f"[{name}] skipped: {rec['reason']}", flush=True)
        else:
            t = time.perf_counter()
            print(f"[{name}] ...", flush=True)
            try:
                fn()
                rec = {"status": "ok"}
            except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
                traceback.print_exc()
                rec = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
                print(f"[{name}] FAILED: {rec['error']}", flush=True)
            rec["seconds"] = round(time.perf_counter() - t, 1)
            print(f"[{name}] {rec['status']} in {rec['seconds']} s", flush=True)
        self.res["sections"][name] = rec
        self.save()

    def save(self) -> None:
        self.res["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.out:
            Path(self.out).write_text(json.dumps(self.res, indent=1, default=float))


# ------------------------------------------------------------------ models, data, timing
@functools.lru_cache(maxsize=8)
def _state_dicts(spec_json: str, k: int) -> tuple[dict[str, torch.Tensor], ...]:
    from vog_ray.models import build_model

    spec = json.loads(spec_json)
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append({n: v.detach().clone() for n, v in build_model(spec).state_dict().items()})
    return tuple(out)


def state_dicts(spec: Any, k: int) -> list[dict[str, torch.Tensor]]:
    """``k`` random-init checkpoints of ``spec`` (made once per spec; the engines copy them)."""
    return list(_state_dicts(json.dumps(spec, sort_keys=True), k))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(fn: Callable[[], int], device: torch.device, seconds: float, reps: int = 2) -> float:
    """Examples per second of ``fn`` (one pass, returns its examples), best of ``reps`` windows of at
    least ``seconds`` each, after one warm-up pass."""
    fn()
    sync(device)
    best = 0.0
    for _ in range(reps):
        n, t = 0, time.perf_counter()
        while True:
            n += fn()
            sync(device)
            dt = time.perf_counter() - t
            if dt >= seconds:
                break
        best = max(best, n / dt)
    return best


def flops_per_example(spec: Any, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward + input-only backward of one target, per example (batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vog_ray.models import build_model

    with torch.device("meta"):  # shapes only: counted without computing anything
        m = build_model(spec).eval()
        m.requires_grad_(False)
        x = torch.randn(2, *shape, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        m(x)[:, 0].sum().backward()  # FlopCounterMode counts .backward() (not autograd.grad)
    return fc.get_total_flops() / 2


def engine_for(name: str, sizes: dict, device: torch.device, precision: str, **kw: Any):
    from vog_ray.core.engine import GradientEngine
    from vog_ray.models import build_model

    spec, _, _ = MODELS[name]
    k = sizes[name]["k"]
    return GradientEngine(build_model(spec), state_dicts(spec, k), windows={"all": list(range(k))},
                          targets=["logit"], device=device, precision=precision, name=name, **kw)


def host_batches(name: str, sizes: dict, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    _, _, classes = MODELS[name]
    b, shape, n_batches = sizes[name]["batch"], sizes[name]["shape"], sizes[name]["batches"]
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((b, *shape), dtype=np.float32), rng.integers(0, classes, b))
            for _ in range(n_batches)]


# ------------------------------------------------------------------ sections
def sec_flops(run: Run, a: Any) -> None:
    out = {}
    for name, (spec, nominal, _) in MODELS.items():
        timed = a.sizes[name]["shape"]
        out[name] = {"nominal_shape": list(nominal), "gflop_nominal": flops_per_example(spec, nominal) / 1e9,
                     "timed_shape": list(timed)}
        out[name]["gflop_timed"] = (out[name]["gflop_nominal"] if tuple(timed) == nominal
                                    else flops_per_example(spec, timed) / 1e9)
    run.res["flops"] = out


def sec_engine(run: Run, a: Any, name: str) -> None:
    dev, sizes, out = a.device, a.sizes, run.res.setdefault("engine", {}).setdefault(name, {})
    host = host_batches(name, sizes)
    on_dev = [(torch.as_tensor(x, device=dev), y) for x, y in host]
    gflop = run.res.get("flops", {}).get(name, {}).get("gflop_timed")
    k = sizes[name]["k"]
    for p in PRECISIONS:
        if run.left() < a.per_engine_s:
            out[p] = {"status": "skipped (budget)"}
            continue
        eng = engine_for(name, sizes, dev, p)
        r_host = timed_rate(lambda: sum(len(r.status) for r in eng.run_batches(host)), dev, a.seconds, a.reps) * k
        r_dev = timed_rate(lambda: sum(len(eng.run(x, y).status) for x, y in on_dev), dev, a.seconds, a.reps) * k
        rec = {"rate_host": r_host, "rate_device": r_dev, "channels_last": eng.channels_last}
        if gflop:
            rec["tflops"] = r_host * gflop / 1e3
            peak = a.peaks.get(p)
            rec["peak_tflops"] = peak
            rec["share_of_peak"] = rec["tflops"] / peak if peak else None
        if p != "fp32" and dev.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in eng.models[0].modules()):
            other = engine_for(name, sizes, dev, p, channels_last=not eng.channels_last)
            r_other = timed_rate(lambda: sum(len(other.run(x, y).status) for x, y in on_dev), dev, a.seconds, a.reps) * k
            rec["channels_last_speedup"] = r_dev / r_other if eng.channels_last else r_other / r_dev
            del other
        out[p] = rec
        print(f"  {name} {p}: {r_host:10.1f} example×checkpoints/s from host batches, {r_dev:10.1f} from device "
              f"batches" + (f", {rec['tflops']:.3g} TFLOP/s" if gflop else "")
              + (f" = {rec['share_of_peak']:.1%} of {rec['peak_tflops']:g}" if rec.get("share_of_peak") else "")
              + (f", channels_last x{rec['channels_last_speedup']:.2f}" if "channels_last_speedup" in rec else ""),
              flush=True)
        del eng
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    run.save()


def bare_loop(models: list[torch.nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]], device) -> int:
    n = 0
    for x, y in batches:
        xg = x.detach().requires_grad_(True)
        yi = y.view(-1, 1)
        for m in models:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                lg = m(xg)
            (g,) = torch.autograd.grad(lg.float().gather(1, yi).sum(), xg)
            g.mean(dim=1)
        n += len(y)
    return n


def sec_bare(run: Run, a: Any, name: str) -> None:
    from vog_ray.models import build_model

    dev, sizes = a.device, a.sizes
    spec = MODELS[name][0]
    models = []
    for sd in state_dicts(spec, sizes[name]["k"]):
        m = build_model(spec)
        m.load_state_dict(sd)
        m = m.to(dev).eval().to(memory_format=torch.channels_last)
        m.requires_grad_(False)
        models.append(m)
    batches = [(torch.as_tensor(x, device=dev).contiguous(memory_format=torch.channels_last),
                torch.as_tensor(y, device=dev)) for x, y in host_batches(name, sizes)]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    r_bare = timed_rate(lambda: bare_loop(models, batches, dev), dev, a.seconds, a.reps) * sizes[name]["k"]
    eng = run.res.get("engine", {}).get(name, {}).get("bf16", {})
    out = {"rate_bare_bf16_channels_last": r_bare}
    if "rate_device" in eng:
        out["engine_vs_bare_gpu"] = eng["rate_device"] / r_bare
        out["engine_host_vs_bare_gpu"] = eng["rate_host"] / r_bare
    run.res.setdefault("bare", {})[name] = out
    print(f"  {name} bare bf16 channels_last loop: {r_bare:10.1f} example×checkpoints/s"
          + (f"; engine/bare {out['engine_vs_bare_gpu']:.3f} (device batches), "
             f"{out['engine_host_vs_bare_gpu']:.3f} (host batches)" if "engine_vs_bare_gpu" in out else ""), flush=True)


def sec_transfer(run: Run, a: Any, name: str) -> None:
    dev, k = a.device, a.sizes[name]["k"]
    eng = engine_for(name, a.sizes, dev, "bf16")
    host = host_batches(name, a.sizes)
    on_dev = [(torch.as_tensor(x, device=dev), y) for x, y in host]
    one = timed_rate(lambda: sum(len(eng.run(x, y).status) for x, y in host), dev, a.seconds, a.reps) * k
    overlapped = timed_rate(lambda: sum(len(r.status) for r in eng.run_batches(host)), dev, a.seconds, a.reps) * k
    resident = timed_rate(lambda: sum(len(eng.run(x, y).status) for x, y in on_dev), dev, a.seconds, a.reps) * k
    run.res.setdefault("transfer", {})[name] = {
        "rate_one_at_a_time": one, "rate_overlapped": overlapped, "rate_device_resident": resident,
        "overlap_gain": overlapped / one, "copy_cost": 1 - overlapped / resident}
    print(f"  {name} bf16: copy then compute {one:.1f}/s, overlapped {overlapped:.1f}/s, no copy {resident:.1f}/s",
          flush=True)


def sec_compile(run: Run, a: Any, name: str) -> None:
    dev, k = a.device, a.sizes[name]["k"]
    on_dev = [(torch.as_tensor(x, device=dev), y) for x, y in host_batches(name, a.sizes)[:2]]
    eager = engine_for(name, a.sizes, dev, "bf16")
    comp = engine_for(name, a.sizes, dev, "bf16", compile=True)
    t = time.perf_counter()
    comp.run(*on_dev[0])
    sync(dev)
    compile_s = time.perf_counter() - t
    r_eager = timed_rate(lambda: sum(len(eager.run(x, y).status) for x, y in on_dev), dev, a.seconds, a.reps) * k
    r_comp = timed_rate(lambda: sum(len(comp.run(x, y).status) for x, y in on_dev), dev, a.seconds, a.reps) * k
    a_vog, b_vog = eager.run(*on_dev[0]).vog["all_logit"], comp.run(*on_dev[0]).vog["all_logit"]
    run.res.setdefault("compile", {})[name] = {
        "compile_s": compile_s, "rate_eager": r_eager, "rate_compiled": r_comp, "compile_speedup": r_comp / r_eager,
        "max_rel_vog_diff": float(np.max(np.abs(a_vog - b_vog) / np.abs(a_vog)))}
    print(f"  {name} bf16 compile: {compile_s:.0f} s to compile, x{r_comp / r_eager:.2f}", flush=True)


def photo_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEG tiles (256–400 px) of scikit-learn's two sample photos, random crops and flips."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = int(rng.integers(256, 400)), int(rng.integers(256, 400))
        t, l = int(rng.integers(0, img.shape[0] - min(h, img.shape[0]) + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        tile = img[t:t + h, l:l + w][:, ::-1 if rng.random() < 0.5 else 1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(tile)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


IMAGENET = dict(channels=3, resize=256, center_crop=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def sec_decode(run: Run, a: Any) -> None:
    from vog_ray.config import TransformSpec
    from vog_ray.data.decode import decode_batch
    from vog_ray.data.device_decode import decode_on_device

    n = 16 if a.quick else 512
    jpegs = photo_jpegs(n)
    batch = {"image": np.array(jpegs, dtype=object), "label": np.zeros(n, np.int64)}
    tf = TransformSpec(**IMAGENET)
    st = np.full(n, "ok", dtype=object)
    t = time.perf_counter()
    ref = decode_batch(batch, tf, input_shape=(3, 224, 224))
    cpu_rate = n / (time.perf_counter() - t)
    decode_on_device(jpegs[:8], st[:8], tf, (3, 224, 224), a.device)  # warm-up (nvJPEG handles)
    sync(a.device)
    t = time.perf_counter()
    x, status = decode_on_device(jpegs, st, tf, (3, 224, 224), a.device)
    sync(a.device)
    dev_rate = n / (time.perf_counter() - t)
    raw = TransformSpec(**{**IMAGENET, "mean": None, "std": None, "scale": 1.0})
    x1, _ = decode_on_device(jpegs, st, raw, (3, 224, 224), a.device)
    r1 = decode_batch(batch, raw, input_shape=(3, 224, 224))["x"]
    d = np.abs(x1.cpu().numpy() - r1)
    run.res["decode"] = {"images": n, "cpu_images_per_s_per_core": cpu_rate, "device_images_per_s": dev_rate,
                         "cpu_cores": os.cpu_count(), "device_vs_all_cpu_cores": dev_rate / (cpu_rate * (os.cpu_count() or 1)),
                         "max_pixel_diff_levels": float(d.max()), "share_pixels_differing": float((d > 0).mean()),
                         "mean_abs_pixel_diff_levels": float(d.mean()),
                         "statuses_equal": bool(list(status) == list(ref["status"]))}
    print(f"  decode 256/224: CPU {cpu_rate:.0f} images/s per core, {a.device.type} {dev_rate:.0f} images/s; max pixel "
          f"difference {d.max():.0f} levels of 255 ({(d > 0).mean():.1%} of pixels differ)", flush=True)


def sec_fidelity(run: Run, a: Any) -> None:
    prec = _load("precision")
    modes = ["bf16"] if a.device.type == "cpu" else ["tf32", "bf16"]
    if a.quick:
        r = prec.run(modes, a.device.type, demo=None, quick=True, demo_limit=None, resnet_n=64, resnet_epochs=3,
                     batch_size=32, which=("resnet18_cifar",), resnet_width=8)
    else:
        r = prec.run(modes, a.device.type, demo=a.demo, quick=False, demo_limit=None, resnet_n=2000,
                     resnet_epochs=8, batch_size=256, which=("resnet18_cifar",) + (("demo",) if a.demo else ()))
    run.res["fidelity"] = r
    print(prec.table(r, modes), flush=True)


def _load(mod: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bench_{mod}", BENCH / f"{mod}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def write_jpeg_parquet(root: str, n: int, classes: int, unique: int, files: int) -> None:
    """``n`` rows of JPEG photos (``unique`` distinct ones, repeated) with random labels, in ``files`` files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpegs = photo_jpegs(unique)
    labels = np.random.default_rng(1).integers(0, classes, n)
    os.makedirs(root, exist_ok=True)
    per = -(-n // files)
    for f in range(files):
        idx = range(f * per, min(n, (f + 1) * per))
        pq.write_table(pa.table({"image": pa.array([jpegs[i % unique] for i in idx], pa.binary()),
                                 "label": pa.array(labels[list(idx)], pa.int64())}), f"{root}/part-{f:05d}.parquet")


def sec_pipeline(run: Run, a: Any) -> None:
    import ray

    from vog_ray.config import TransformSpec, validate
    from vog_ray.data.decode import decode_batch
    from vog_ray.distributed.audit import run_audit

    pipe = _load("pipeline")
    dev = a.device
    if a.quick:
        name, spec, tf, batch, k = "resnet18_cifar", {"name": "resnet18_cifar", "num_classes": 10, "width": 8}, \
            dict(channels=3, resize=36, center_crop=32, mean=IMAGENET["mean"], std=IMAGENET["std"]), 16, 2
        n, unique, files, classes = 192, 48, 4, 10
    else:
        name, spec, tf, batch, k = "resnet50", "torchvision:resnet50", IMAGENET, 256, 3
        n, unique, files, classes = a.pipeline_n, 1000, 64, 1000
    tmp = tempfile.mkdtemp(prefix="vog-bench-gpu-")
    write_jpeg_parquet(f"{tmp}/data", n, classes, unique, files)
    os.makedirs(f"{tmp}/ck")
    for i, sd in enumerate(state_dicts(spec, k)):
        torch.save(sd, f"{tmp}/ck/epoch_{i}.pt")
    shape = (3, tf["center_crop"], tf["center_crop"])
    # the engine alone: bf16, the same batches as the actor, from the same decoded photos in host memory
    from vog_ray.core.engine import GradientEngine
    from vog_ray.models import build_model

    jpegs = photo_jpegs(unique)
    m = min(unique, 4 * batch)
    dec = decode_batch({"image": np.array(jpegs[:m], dtype=object), "label": np.zeros(m, np.int64)},
                       TransformSpec(**tf), input_shape=shape)["x"]
    ys = np.random.default_rng(2).integers(0, classes, m)
    eng = GradientEngine(build_model(spec), state_dicts(spec, k), windows={"all": list(range(k))}, device=dev,
                         precision="bf16")
    parts = [(dec[s:s + batch], ys[s:s + batch]) for s in range(0, m, batch)]
    engine_rate = timed_rate(lambda: sum(len(r.status) for r in eng.run_batches(parts)), dev, a.seconds, a.reps) * k
    del eng
    trace = f"{tmp}/trace"
    os.makedirs(trace)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), num_gpus=1 if dev.type == "cuda" else 0, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"VOG_RAY_TRACE_DIR": trace}})
    out: dict[str, Any] = {"model": name, "examples": n, "checkpoints": k, "batch_size": batch, "precision": "bf16",
                           "engine_rate": engine_rate}
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        for variant in ("cpu", "gpu"):
            cfg = validate({
                "data": {"splits": {"train": {"format": "parquet", "url": f"{tmp}/data"}},
                         "transform": {**tf, "decode_on": variant}},
                "model": spec, "checkpoints": f"{tmp}/ck/epoch_*.pt",
                "vog": {"windows": {"all": "all"}, "targets": ["logit"]},
                "compute": {"device": "cuda" if dev.type == "cuda" else "cpu", "batch_size": batch, "precision": "bf16",
                            "actors": {"min": 1, "max": 1}, "cpus_per_actor": 1, "decode_batch_size": 64},
                "output": {"url": f"{tmp}/out_{variant}"}, "report": {"enabled": False}})
            t = time.perf_counter()
            res = run_audit(cfg, report=False)
            total = time.perf_counter() - t
            events = []
            for f in os.listdir(trace):
                with open(os.path.join(trace, f)) as fh:
                    events += [{**json.loads(line), "actor": f} for line in fh]
                os.remove(os.path.join(trace, f))
            ss = pipe.steady_state(events, k)
            stage1 = res.manifest["score_wall_time_s"]
            out[f"{variant}_decode"] = {"steady_rate": ss["rate"], "actors_busy": ss["busy"],
                                        "engine_share": ss["engine_share"], "window_s": ss["window_s"],
                                        "stage1_s": stage1, "end_to_end_rate": n * k / stage1, "audit_s": total,
                                        "precision_check": res.manifest.get("precision")}
            print(f"  pipeline, {variant} decode: steady {ss['rate']:.1f}/s vs engine alone {engine_rate:.1f}/s "
                  f"(actor busy {ss['busy']:.0%}, {ss['engine_share']:.0%} of its time in the engine)", flush=True)
        out["pipeline_vs_engine_gpu"] = out["cpu_decode"]["steady_rate"] / engine_rate
        out["pipeline_vs_engine_gpu_decode"] = out["gpu_decode"]["steady_rate"] / engine_rate
    finally:
        run.res["pipeline"] = out
        ray.shutdown()


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The headline figures, flat."""
    s: dict[str, Any] = {}
    for name, per in res.get("engine", {}).items():
        for p, r in per.items():
            if isinstance(r, dict) and "rate_host" in r:
                s[f"{name}_{p}_rate"] = round(r["rate_host"], 1)
                if r.get("tflops") is not None:
                    s[f"{name}_{p}_tflops"] = round(r["tflops"], 3)
                if r.get("share_of_peak") is not None:
                    s[f"{name}_{p}_share_of_peak"] = round(r["share_of_peak"], 4)
    for name, r in res.get("bare", {}).items():
        if "engine_vs_bare_gpu" in r:
            s[f"{name}_engine_vs_bare_gpu"] = round(r["engine_vs_bare_gpu"], 3)
    rn = res.get("bare", {}).get("resnet50", {})
    if "engine_vs_bare_gpu" in rn:
        s["engine_vs_bare_gpu"] = round(rn["engine_vs_bare_gpu"], 3)
    p = res.get("pipeline", {})
    for key in ("pipeline_vs_engine_gpu", "pipeline_vs_engine_gpu_decode"):
        if key in p:
            s[key] = round(p[key], 3)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU run the tests make)")
    ap.add_argument("--out", default=None, help="write the JSON here too, after every section")
    ap.add_argument("--budget-s", type=float, default=None, help="time for all sections (default 420; quick 120)")
    ap.add_argument("--peak-tflops", default=None, help="e.g. bf16=989,tf32=494,fp32=67 (a bare number: bf16)")
    ap.add_argument("--seconds", type=float, default=None, help="length of each timed window (default 1.5; quick 0.05)")
    ap.add_argument("--pipeline-n", type=int, default=16000, help="JPEG rows of the pipeline section")
    ap.add_argument("--demo", default=None, help="a demo store folder: its fidelity measured on the device too")
    ap.add_argument("--skip", default=None, help="comma-separated sections to leave out (default: none; with "
                    "--quick: compile, whose CPU compilation alone takes minutes; tests/core/test_compile.py covers it)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU (use --device cpu --quick for the CPU run)")
    a.device = torch.device(a.device)
    if a.device.type == "cpu":  # as each scorer actor on the CPU: one torch thread (see README, CPU layout)
        torch.set_num_threads(1)
    a.sizes = QUICK if a.quick else SIZES
    a.seconds = a.seconds or (0.05 if a.quick else 1.5)
    a.reps = 1 if a.quick else 2  # timed windows per rate (the best one counts)
    a.per_engine_s = 1 if a.quick else 20
    budget = a.budget_s or (120 if a.quick else 420)
    skip = {s.strip() for s in (a.skip if a.skip is not None else "compile" if a.quick else "").split(",") if s.strip()}
    card = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else platform.processor() or "cpu"
    a.peaks = peaks_for(card if a.device.type == "cuda" else "", a.peak_tflops)
    run = Run(budget, a.out)
    run.res.update({"device": card, "device_type": a.device.type, "quick": a.quick, "peaks_tflops": a.peaks,
                    "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
                    "sizes": {m: {**v, "shape": list(v["shape"])} for m, v in a.sizes.items()},
                    "seconds_per_window": a.seconds, "budget_s": budget})
    q = 0.05 if a.quick else 1.0  # the sections' expected seconds, scaled for quick runs
    plan = [("flops", 20, lambda: sec_flops(run, a)),
            ("engine_resnet50", 120 * q, lambda: sec_engine(run, a, "resnet50")),
            ("engine_resnet18_cifar", 60 * q, lambda: sec_engine(run, a, "resnet18_cifar")),
            ("bare_resnet50", 20 * q, lambda: sec_bare(run, a, "resnet50")),
            ("bare_resnet18_cifar", 15 * q, lambda: sec_bare(run, a, "resnet18_cifar")),
            ("transfer_resnet50", 20 * q, lambda: sec_transfer(run, a, "resnet50")),
            ("decode", 20 * q, lambda: sec_decode(run, a)),
            ("fidelity", 60 * q, lambda: sec_fidelity(run, a)),
            ("pipeline", 130 * q, lambda: sec_pipeline(run, a)),
            ("compile_resnet18_cifar", 60 * q, lambda: sec_compile(run, a, "resnet18_cifar"))]
    for name, need, fn in plan:
        if name in skip or name.split("_")[0] in skip:
            run.res["sections"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        run.section(name, need, fn)
    run.res["summary"] = summary(run.res)
    run.save()
    print(json.dumps(run.res, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
