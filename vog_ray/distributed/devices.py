"""What each scorer actor actually ran on: the device it chose (and the GPU's name), the node, the
GPUs Ray reserved for it and the rows it scored — gathered by a small ledger actor for the
manifest — and the warning for a pool that reserved GPUs but scored on the CPU. Imports torch
only inside :func:`actor_device` (it runs in the scorer actors)."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

__all__ = ["DeviceLedger", "start_ledger", "connect_ledger", "collect_ledger", "actor_device", "device_report"]

log = logging.getLogger("vog_ray")


class DeviceLedger:
    """One record per scorer actor (``register``) and its rows (``add`` after each batch). The
    actors call it synchronously, so when the stage's dataset is written every batch is counted (a
    block scored again after its node was lost is counted again: the rows are work done, and may
    add up to more than the rows in)."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}

    def register(self, tag: str, record: dict[str, Any]) -> None:
        self._records[tag] = {**record, "rows": 0, "batches": 0}

    def add(self, tag: str, rows: int) -> None:
        rec = self._records[tag]
        rec["rows"] += int(rows)
        rec["batches"] += 1

    def records(self) -> list[dict[str, Any]]:
        return sorted(self._records.values(), key=lambda r: (r["group"], r["node_id"], r["pid"]))


def start_ledger() -> tuple[str, Any]:
    """A named ledger actor for one stage (no CPU: it only counts), on the driver's node — a worker
    node lost mid-audit must not take the ledger with it; returns ``(name, handle)``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    name = f"vog-ray-devices-{uuid.uuid4().hex[:12]}"
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return name, ray.remote(num_cpus=0)(DeviceLedger).options(name=name, scheduling_strategy=here).remote()


def connect_ledger(name: str | None) -> Any:
    """The ledger's handle inside a scorer actor (None: not recording, e.g. outside Ray)."""
    import ray

    return ray.get_actor(name) if name else None


def collect_ledger(handle: Any, quiet: bool = False) -> list[dict[str, Any]]:
    """The records of every scorer actor of the stage; ends the ledger. ``quiet``: after a failed
    stage, end it without reading (and without raising)."""
    import ray

    try:
        return [] if quiet else ray.get(handle.records.remote())
    finally:
        try:
            ray.kill(handle)
        except Exception:  # noqa: BLE001 - already gone; nothing else holds it
            if not quiet:
                raise


def actor_device(requested: str, group: int) -> tuple[str, dict[str, Any]]:
    """``(torch device, record)`` of the scorer actor this runs in. ``auto`` and ``cuda`` use CUDA
    when this process's torch has it; ``cuda`` without it is an error (Ray may have reserved a GPU
    that torch cannot use: ``ray start --num-gpus`` on a machine without one, a CPU-only torch)."""
    import ray
    import torch

    cuda = torch.cuda.is_available()
    in_ray = ray.is_initialized()
    reserved = [str(g) for g in ray.get_gpu_ids()] if in_ray else []
    ctx = ray.get_runtime_context() if in_ray else None
    node = ctx.get_node_id() if ctx else None
    if requested == "cuda" and not cuda:
        raise RuntimeError(
            f"compute.device is 'cuda' but the scorer actor on node {node} (pid {os.getpid()}) has no usable CUDA: "
            f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no GPU; Ray reserved GPU(s) "
            f"{reserved or 'none'} for it, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}. "
            "Use compute.device: cpu (or auto), or run on nodes whose GPUs torch can use")
    dev = "cuda" if requested in ("auto", "cuda") and cuda else "cpu"
    return dev, {
        "actor_id": ctx.get_actor_id() if ctx else None,
        "node_id": node or "",
        "node_ip": ray.util.get_node_ip_address() if in_ray else None,
        "pid": os.getpid(),
        "group": group,
        "device": f"cuda:{torch.cuda.current_device()}" if dev == "cuda" else "cpu",
        "gpu_name": torch.cuda.get_device_name() if dev == "cuda" else None,
        "gpus_reserved": reserved,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def device_report(records: list[dict[str, Any]], gpus_per_actor: float) -> dict[str, Any]:
    """The manifest's ``scorers`` (one record per actor), ``devices`` (rows per device kind and
    GPU name) and ``warnings`` (actors that reserved GPUs and scored on the CPU, also logged)."""
    devices: dict[str, int] = {}
    for r in records:
        kind = r["device"].split(":")[0] + (f" ({r['gpu_name']})" if r.get("gpu_name") else "")
        devices[kind] = devices.get(kind, 0) + r["rows"]
    warnings = []
    on_cpu = [r for r in records if r["device"] == "cpu" and (r["gpus_reserved"] or gpus_per_actor)]
    if on_cpu:
        nodes = sorted({r["node_ip"] or r["node_id"] for r in on_cpu})
        warnings.append(
            f"{len(on_cpu)} of {len(records)} scorer actor(s) reserved GPUs (compute.gpus_per_actor = "
            f"{gpus_per_actor:g}) but scored on the CPU: torch there sees no CUDA (node(s) {', '.join(nodes)}). The "
            "cluster advertises GPUs this PyTorch cannot use (e.g. `ray start --num-gpus` on a machine without one, "
            "or a CPU-only torch build): set compute.device: cpu, or fix the nodes' CUDA")
        for w in warnings:
            log.warning(w)
    return {"scorers": records, "devices": devices, "warnings": warnings}
