"""Stacked checkpoints: the K copies of one small model run as one batched call.

The unstacked engine runs, per checkpoint, a forward and one input-gradient backward per
target: ``K`` small calls whose Python and dispatch overhead dominates for small models.
Here the ``K`` checkpoints' parameters (and buffers) are stacked along a new leading axis
(:func:`torch.func.stack_module_state`) and the per-checkpoint function

    x  ->  logits = f(x; θ_k)  ->  target scores  ->  ∂ score / ∂ x   (one vjp per target)

is vectorised over ``k`` with :func:`torch.vmap`: one forward and one backward per target for
all checkpoints together (a convolution whose weights are batched becomes one wider or grouped
convolution). The math is the engine's (DESIGN.md §1): the same target scores
(``logits.gather(1, p).sum()``, or the softmax probability at ``p``), a fresh gradient per
checkpoint, the model in ``eval()`` mode, parameters frozen (no weight-gradient product).
Results equal the unstacked path up to float rounding (grouped kernels sum in another order).

It costs ``K`` times the activation memory of one checkpoint, so the engine uses it only for
small models (see ``GradientEngine(stacked=...)``). Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vjp, vmap

from .precision import autocast

__all__ = ["StackedCheckpoints", "param_bytes"]


def param_bytes(models: Sequence[nn.Module]) -> int:
    """Bytes of all parameters and buffers of ``models`` together."""
    return sum(t.numel() * t.element_size()
               for m in models for t in list(m.parameters()) + list(m.buffers()))


def _per_checkpoint(base: nn.Module, targets: tuple[str, ...], precision: str) -> Callable:
    """``(params, buffers, x, p) -> (logits, (grad_x per target))`` for one checkpoint; the forward
    under the precision's autocast (:func:`vog_ray.core.precision.autocast`)."""

    def one(params, buffers, x, pi):
        def scores(xx):
            with autocast(xx.device, precision):
                lg = functional_call(base, (params, buffers), (xx,))
            lg = lg.float()  # bf16 logits: targets in float32 (fp32: the same tensor)
            out = []
            for t in targets:
                s = lg if t == "logit" else torch.softmax(lg, dim=1)
                out.append(s.gather(1, pi).sum())
            return torch.stack(out), lg

        s, pull, lg = vjp(scores, x, has_aux=True)
        eye = torch.eye(len(targets), dtype=s.dtype, device=s.device)
        grads = tuple(pull(eye[j])[0] for j in range(len(targets)))
        return lg, grads

    return one


class StackedCheckpoints:
    """``K`` checkpoints of one architecture, evaluated together with ``torch.vmap``.

    ``models`` must be of the same class, frozen and in ``eval()`` mode (the engine's copies
    are). The stacked parameters are new tensors: ``K`` times the parameter memory.
    """

    def __init__(self, models: Sequence[nn.Module]):
        models = list(models)
        if not models:
            raise ValueError("StackedCheckpoints needs at least one model")
        if any(m.training for m in models):
            raise ValueError("StackedCheckpoints needs models in eval() mode")
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach() for k, v in params.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        # the module whose forward is called; functional_call swaps the stacked slices in
        self.base = copy.deepcopy(models[0])
        self.num_checkpoints = len(models)
        self._fns: dict[tuple[tuple[str, ...], str], Callable] = {}

    def input_grads(self, x: torch.Tensor, p: torch.Tensor, targets: Sequence[str],
                    precision: str = "fp32") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``[K, N, classes]`` and, per target, ``∂ score / ∂ x`` of shape ``[K, *x.shape]``.

        ``p``: the target index per example ``[N]`` (already checked to lie in range).
        """
        key = tuple(targets)
        fn = self._fns.get((key, precision))
        if fn is None:
            fn = self._fns[(key, precision)] = vmap(_per_checkpoint(self.base, key, precision),
                                                    in_dims=(0, 0, None, None))
        x = x.detach()
        with warnings.catch_warnings():
            # ops without a batching rule (e.g. as_strided_ in adaptive_avg_pool2d's backward)
            # run in a per-checkpoint loop: slower, still exact; the engine's "auto" times it
            warnings.filterwarnings("ignore", message="There is a performance drop")
            lg, grads = fn(self.params, self.buffers, x, p.view(-1, 1))
        return lg.detach(), {t: g.detach() for t, g in zip(key, grads)}
