"""The gradient engine: per batch, every checkpoint's input-gradient maps folded into windows.

For a batch ``x`` and checkpoints ``θ_1..θ_K`` (DESIGN.md §1):

* the target index is the true label or the label predicted by the **last checkpoint of the
  run** (``label_mode="predicted"``);
* for each checkpoint and each target (``logit``: the pre-softmax logit, ``softmax``: the
  softmax probability), one backward of the summed target scores gives every example's
  gradient (exact per example: the model is in ``eval()`` mode, so examples do not interact);
  parameters have ``requires_grad=False``, so no weight-gradient product is computed;
* the gradient is averaged over input channels (the signed map, never ``abs()``) and folded
  (Welford) into the pixel moments of every named window containing that checkpoint;
* the forward pass gives per-checkpoint signals for free (loss, confidence, margin, EL2N,
  entropy, …);
* execution choices that change no result beyond float rounding: small models may run all
  checkpoints as one vmapped call (:mod:`vog_ray.core.stacked`; opt in with ``stacked=True`` or
  ``"auto"``, which times both paths on the first batch — off by default, since a per-actor timing
  choice would make reruns differ in the last bits), convnets run in ``channels_last`` on the CPU
  and in the tensor-core modes on CUDA (bench/engine.py, bench/gpu.py measure both), the forward
  may be compiled (``compile=True``), and a batch that runs out of GPU memory is split in two
  (per-example results do not depend on the batch: the same bits on the CPU);
* a choice that changes results beyond the last bits, measured against fp32 per window
  (:mod:`vog_ray.core.precision`): ``precision="tf32"`` (CUDA tensor cores) or ``"bf16"``
  (forward under autocast); the gradient maps and pixel moments stay float32/float64.

Nothing here imports Ray: the scorer actor wraps this class.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .labels import label_problems
from .moments import PixelMoments, chan_merge
from .options import LABEL_MODES, SIGNALS, TARGETS, VogOptions
from .precision import autocast, check_precision, cuda_flags, fidelity
from .stacked import StackedCheckpoints, param_bytes
from .transfer import Stager
from .windows import resolve_windows

__all__ = ["GradientEngine", "BatchResult", "InputError", "DeviceMemoryError", "make_engine", "pick_device",
           "default_channels_last"]

log = logging.getLogger("vog_ray")

# stacked="auto": stack the checkpoints (vog_ray.core.stacked) only when all their parameters and
# buffers together take at most this many bytes, and only if, timed on the first batch of at
# least STACK_AUTO_MIN_BATCH examples, the stacked path is faster by STACK_AUTO_MARGIN
STACK_AUTO_MAX_BYTES = 64 << 20
STACK_AUTO_MIN_BATCH = 32
STACK_AUTO_MARGIN = 0.9
# channels_last on CUDA by default in the tensor-core modes: cuDNN's tensor-core convolutions work in
# NHWC and transpose NCHW tensors around each convolution otherwise (NVIDIA's deep-learning
# performance guide); bench/gpu.py measures both layouts per model and precision
CUDA_CHANNELS_LAST = ("tf32", "bf16")
# the first-batch precision check (compare_to_fp32) compares at most this many examples
PRECISION_CHECK_ROWS = 128


class InputError(ValueError):
    """The batch does not fit the model or holds invalid labels."""


class DeviceMemoryError(RuntimeError):
    """A single example does not fit in the device's memory."""


@dataclass
class BatchResult:
    """Per-example outputs of one batch (numpy, first axis = example)."""

    status: np.ndarray                      # object array: "ok" or the reason
    target_label: np.ndarray                # int64, -1 for rows not scored
    pred: np.ndarray | None                 # int64, prediction of the run's last checkpoint
    vog: dict[str, np.ndarray] = field(default_factory=dict)          # "window_target" -> [N]
    moments: dict[str, PixelMoments] = field(default_factory=dict)    # "window_target" -> state
    signals: dict[str, np.ndarray] = field(default_factory=dict)      # name -> [N, K_local]

    @staticmethod
    def concat(parts: Sequence["BatchResult"]) -> "BatchResult":
        """The results of consecutive parts of one batch, as the batch's result."""
        if len(parts) == 1:
            return parts[0]
        cat = np.concatenate
        first = parts[0]
        return BatchResult(
            status=cat([r.status for r in parts]), target_label=cat([r.target_label for r in parts]),
            pred=None if first.pred is None else cat([r.pred for r in parts]),
            vog={k: cat([r.vog[k] for r in parts]) for k in first.vog},
            moments={k: PixelMoments(st.n, cat([r.moments[k].mean for r in parts]),
                                     cat([r.moments[k].m2 for r in parts])) for k, st in first.moments.items()},
            signals={s: cat([r.signals[s] for r in parts]) for s in first.signals})


def default_channels_last(model: nn.Module, device: torch.device, precision: str) -> bool:
    """Whether the engine runs ``model`` in channels_last unless told: convnets on the CPU (NHWC
    convolutions: ~2x faster input gradients for LeNet-sized convnets, ~1.1x for ResNet-18,
    bench/engine.py) and on CUDA in the tensor-core modes (``CUDA_CHANNELS_LAST``)."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    return device.type == "cpu" or (device.type == "cuda" and precision in CUDA_CHANNELS_LAST)


def _freeze(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _first_moments(m: torch.Tensor, dtype: torch.dtype) -> PixelMoments:
    """The moments of one observation (n = 1, M2 = 0)."""
    return PixelMoments(1, m.to(dtype, copy=True), torch.zeros_like(m, dtype=dtype))


def _fold(st: PixelMoments, m: torch.Tensor) -> None:
    """Fold one map into ``st`` in place (:func:`chan_merge` with a set of one, fused ops: the
    passes over the maps dominate the engine's own cost for small models)."""
    st.n, _, _ = chan_merge(st.n, st.mean, st.m2, 1, m, inplace=True)


def _signals(lg: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-checkpoint signals (:data:`SIGNALS`) from logits ``[K, N, C]``: name -> ``[N, K]``.

    All at the target index ``p``; ``correct`` is -1 where the true label ``y`` is unknown;
    ``el2n`` is the L2 distance of the softmax from the one-hot target (Paul et al., 2021),
    ``entropy`` the predictive entropy (nats).
    """
    with torch.no_grad():
        lg = lg.detach().float()
        K, N, C = lg.shape
        pi = p.view(1, N, 1).expand(K, N, 1)
        logp = torch.log_softmax(lg, dim=2)
        prob = logp.exp()
        at = lg.gather(2, pi).squeeze(2)
        other = (lg.scatter(2, pi, float("-inf")).amax(dim=2) if C > 1
                 else torch.full_like(at, float("-inf")))
        pred = lg.argmax(dim=2)
        out = {
            "loss": -logp.gather(2, pi).squeeze(2),
            "label_logit": at,
            "label_prob": prob.gather(2, pi).squeeze(2),
            "margin": at - other,
            "pred": pred,
            "correct": torch.where(y >= 0, (pred == y).to(torch.int8),
                                   torch.full_like(pred, -1, dtype=torch.int8)),
            "max_prob": prob.amax(dim=2),
            "max_logit": lg.amax(dim=2),
            "energy": -torch.logsumexp(lg, dim=2),
            "el2n": (prob - torch.zeros_like(prob).scatter_(2, pi, 1.0)).norm(dim=2),
            "entropy": -(prob * logp).sum(dim=2),
        }
        return {s: out[s].t().contiguous() for s in SIGNALS}


class GradientEngine:
    """Computes VoG moments and signals for batches, with all checkpoints of a group resident.

    Parameters
    ----------
    model:
        The architecture (an ``nn.Module``; its weights are replaced by each state_dict).
    state_dicts:
        The checkpoints this engine folds, in order.
    checkpoint_ids:
        Their global indices in the run (default ``0..len-1``). Windows are given in global
        indices; a window's moments here cover only the checkpoints this engine holds.
    windows:
        ``name -> list of global checkpoint indices`` (see :func:`resolve_windows`).
    predict_state_dict:
        For ``label_mode="predicted"`` when the run's last checkpoint is not among
        ``state_dicts`` (checkpoint-sharded audits): its weights, used forward-only.
    accum_dtype:
        dtype of the pixel moments on the device (``torch.float32`` default, or float64).
    channels_last:
        Run 4-D inputs and the models in ``torch.channels_last`` memory format. Default: on for
        models with ``Conv2d`` layers on CPU, and on CUDA in the modes of ``CUDA_CHANNELS_LAST``.
    stacked:
        ``True``: run all checkpoints as one vmapped call (:mod:`vog_ray.core.stacked`; ``K`` times
        the activation memory); ``False``: one checkpoint after the other; ``"auto"``
        (default): stacked for small models (see ``STACK_AUTO_MAX_BYTES``) when it is faster,
        timed on the first batch. Both give the same results up to float rounding.
    precision:
        ``"fp32"`` (default), ``"tf32"`` or ``"bf16"`` (:mod:`vog_ray.core.precision`). The target
        index of ``label_mode="predicted"`` always comes from an fp32 forward.
    compile:
        ``torch.compile`` each checkpoint's forward (not with ``stacked``).
    name:
        The model's name in error messages (default: its class name).
    """

    def __init__(self, model: nn.Module, state_dicts: Sequence[dict[str, torch.Tensor]], *,
                 windows: dict[str, list[int]], targets: Sequence[str] = ("logit",),
                 label_mode: str = "true", checkpoint_ids: Sequence[int] | None = None,
                 num_checkpoints: int | None = None,
                 predict_state_dict: dict[str, torch.Tensor] | None = None,
                 device: str | torch.device = "cpu", accum_dtype: torch.dtype = torch.float32,
                 channels_last: bool | None = None, stacked: bool | str = False,
                 precision: str = "fp32", compile: bool = False, name: str | None = None):
        if not state_dicts:
            raise ValueError("zero checkpoints: the engine needs at least one")
        targets = [targets] if isinstance(targets, str) else list(targets)
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}; expected one of {TARGETS}")
        if not targets:
            raise ValueError(f"no target given; expected one or more of {TARGETS}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"unknown label mode {label_mode!r}; expected one of {LABEL_MODES}")
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.name = name or type(model).__name__
        self.targets = targets
        self.label_mode = label_mode
        self.accum_dtype = accum_dtype
        self.ids = list(checkpoint_ids) if checkpoint_ids is not None else list(range(len(state_dicts)))
        if len(self.ids) != len(state_dicts):
            raise ValueError("checkpoint_ids and state_dicts differ in length")
        self.num_checkpoints = num_checkpoints or (max(self.ids) + 1)
        self.windows = {w: [i for i in idx] for w, idx in windows.items()}
        for w, idx in self.windows.items():
            bad = [i for i in idx if not 0 <= i < self.num_checkpoints]
            if bad:
                raise ValueError(f"window {w!r} names checkpoints {bad} outside 0..{self.num_checkpoints - 1}")
        self.channels_last = (bool(channels_last) if channels_last is not None else
                              default_channels_last(model, self.device, precision))
        # a default (not asked-for) channels_last is dropped if the model cannot run on it
        self._channels_last_unverified = channels_last is None and self.channels_last
        self._load(model, state_dicts, predict_state_dict)
        # which local models feed which window (global index -> local position)
        self._local = {g: i for i, g in enumerate(self.ids)}
        self.window_members = {w: [self._local[g] for g in idx if g in self._local]
                               for w, idx in self.windows.items()}
        self._num_classes: int | None = None
        self.stager = Stager(self.device)
        # the largest batch known to fit in device memory (set by an out-of-memory split)
        self.max_rows: int | None = None
        self._announce_fit = False
        self._paths(stacked, compile)

    def _load(self, base: nn.Module, state_dicts: Sequence[dict[str, torch.Tensor]],
              predict_state_dict: dict[str, torch.Tensor] | None) -> None:
        """One frozen copy of ``base`` per checkpoint on the device, and the predictor."""
        self.models: list[nn.Module] = []
        for sd in state_dicts:
            m = copy.deepcopy(base)
            m.load_state_dict(sd, strict=True)
            self.models.append(_freeze(m, self.device, self.channels_last))
        last_global = self.num_checkpoints - 1
        self.predictor: nn.Module | None = None
        if self.label_mode == "predicted":
            if last_global in self.ids:
                self.predictor = self.models[self.ids.index(last_global)]
            elif predict_state_dict is not None:
                m = copy.deepcopy(base)
                m.load_state_dict(predict_state_dict, strict=True)
                self.predictor = _freeze(m, self.device, self.channels_last)
            else:
                raise ValueError("label_mode='predicted' needs the run's last checkpoint "
                                 "(pass predict_state_dict)")

    def _paths(self, stacked: bool | str, compile: bool) -> None:
        """The execution path: compiled forwards, or stacked checkpoints (decided now, or on the
        first large batch for ``"auto"``), or one checkpoint after the other."""
        if stacked not in (True, False, "auto"):
            raise ValueError(f"stacked must be True, False or 'auto', not {stacked!r}")
        if compile:
            if stacked is True:
                raise ValueError("compile=True runs the checkpoints one after the other: not with stacked=True")
            stacked = False
            for m in {id(m): m for m in self.models + [self.predictor] if m is not None}.values():
                m.compile()  # in place: the module and its state_dict keys stay as they are
        self.compiled = bool(compile)
        self._stack: StackedCheckpoints | None = None
        self.stack_timing: tuple[float, float] | None = None   # (unstacked s, stacked s) of "auto"
        if stacked is True or (stacked == "auto" and len(self.models) > 1
                               and param_bytes(self.models) <= STACK_AUTO_MAX_BYTES):
            try:
                self._stack = StackedCheckpoints(self.models)
            except Exception:  # noqa: BLE001 - e.g. a model torch.func cannot stack
                if stacked is True:
                    raise
        # None = not decided yet ("auto" before its first large batch)
        self._use_stacked: bool | None = (None if stacked == "auto" and self._stack is not None
                                          else self._stack is not None)

    @property
    def uses_stacked(self) -> bool | None:
        """Whether batches run all checkpoints as one vmapped call (``None``: ``"auto"`` has not
        timed its first large batch yet)."""
        return self._use_stacked

    # ------------------------------------------------------------------ helpers
    def keys(self) -> list[str]:
        """Output keys ``window_target`` in a stable order."""
        return [f"{w}_{t}" for w in self.windows for t in self.targets]

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)``; an input that does not fit the model is an :class:`InputError`."""
        try:
            out = model(x)
        except torch.cuda.OutOfMemoryError:
            raise  # the batch is too large, not the input wrong: run() splits it
        except RuntimeError as e:
            raise InputError(
                f"input of shape {tuple(x.shape[1:])} (per example) does not fit the model: {e}") from e
        if out.ndim != 2:
            raise InputError(f"model output must be [N, classes], got {tuple(out.shape)}")
        return out

    def prepare(self, x: Any) -> torch.Tensor:
        """A batch as a float32 tensor on the engine's device (channels-last where the engine runs so;
        on CUDA copied from a pinned host buffer, :class:`~vog_ray.core.transfer.Stager`)."""
        return self._layout(self.stager.stage(x).tensor())

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _verify_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """Run one example in channels_last; a model that cannot (e.g. ``.view(N, -1)`` after
        a convolution) goes back to the contiguous format, so the default never breaks a model."""
        try:
            with torch.no_grad():
                self.models[0](x[:1])
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            self.channels_last = False
            for m in self.models + ([self.predictor] if self.predictor is not None else []):
                m.to(memory_format=torch.contiguous_format)
            if self._stack is not None:
                self._stack = StackedCheckpoints(self.models)
            x = x.contiguous()
        self._channels_last_unverified = False
        return x

    def _check_targets(self, p: torch.Tensor, C: int) -> None:
        self._num_classes = C
        bad = np.flatnonzero(label_problems(p.cpu().numpy(), C, allow_missing=False) != None)  # noqa: E711
        if len(bad):
            vals = sorted(set(p.cpu().numpy()[bad].tolist()))[:5]
            raise InputError(f"labels outside [0, {C}) for {len(bad)} examples "
                             f"(e.g. {vals}); the model has {C} classes")

    def num_classes_for(self, x: Any) -> int:
        """The model's number of classes, learnt from one forward pass on the first example of
        ``x`` (once; also checks that the input fits the model)."""
        if self._num_classes is None:
            with torch.no_grad():
                self._num_classes = int(self.forward(self.models[0], self.prepare(x[:1])).shape[1])
        return self._num_classes

    def _compiled_ctx(self) -> Any:
        """Compiled forwards with two targets: two backward passes through one graph (the first
        retains it), which AOTAutograd's donated buffers forbid; they are off while such a forward
        compiles and while its backward runs (AOTAutograd reads the flag at both moments)."""
        if self.compiled and len(self.targets) > 1:
            import torch._functorch.config as aot_config

            return aot_config.patch(donated_buffer=False)
        return contextlib.nullcontext()

    def _unstacked(self, x: torch.Tensor, p: torch.Tensor):
        """Per checkpoint, in order: ``(local index, logits [N, C], {target: map})``."""
        xg = x.detach().requires_grad_(True)
        pi = p.view(-1, 1)
        for i, model in enumerate(self.models):
            with self._compiled_ctx():
                logits, grads = self._checkpoint_maps(model, xg, p, pi, first=i == 0)
            yield i, logits, grads

    def _checkpoint_maps(self, model: nn.Module, xg: torch.Tensor, p: torch.Tensor, pi: torch.Tensor,
                         first: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One checkpoint: logits ``[N, C]`` and the gradient map of each target."""
        with autocast(self.device, self.precision):
            logits = self.forward(model, xg)
        logits = logits.float()  # bf16 logits: targets and signals in float32 (fp32: the same tensor)
        if first:
            self._check_targets(p, logits.shape[1])
        grads: dict[str, torch.Tensor] = {}
        for j, t in enumerate(self.targets):
            if t == "logit":
                score = logits.gather(1, pi).sum()
            else:
                score = torch.softmax(logits, dim=1).gather(1, pi).sum()
            (g,) = torch.autograd.grad(score, xg, retain_graph=j < len(self.targets) - 1)
            # channel-averaged map [N, H, W]; a vector input's map is the gradient itself
            grads[t] = g if g.ndim == 2 else g.mean(dim=1)
        return logits.detach(), grads

    def _stacked(self, x: torch.Tensor, p: torch.Tensor):
        """The same as :meth:`_unstacked`, all checkpoints computed in one vmapped call."""
        assert self._stack is not None
        if self._num_classes is None:  # learn C (and check the input shape) on one example
            with torch.no_grad():
                self._num_classes = self.forward(self.models[0], x[:1]).shape[1]
        self._check_targets(p, self._num_classes)
        try:
            lg, grads = self._stack.input_grads(x, p, self.targets, self.precision)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise InputError(
                f"input of shape {tuple(x.shape[1:])} (per example) does not fit the model: {e}") from e
        if lg.ndim != 3 or lg.shape[2] != self._num_classes:
            raise InputError(f"model output must be [N, classes], got {tuple(lg.shape[1:])}")
        maps = {t: g if g.ndim == 3 else g.mean(dim=2) for t, g in grads.items()}
        for i in range(len(self.models)):
            yield i, lg[i], {t: m[i] for t, m in maps.items()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _checkpoint_grads(self, x: torch.Tensor, p: torch.Tensor):
        """Pick the path (stacked or not) and yield its per-checkpoint outputs."""
        N = x.shape[0]
        if self._use_stacked and N > 0:
            return self._stacked(x, p)
        if self._use_stacked is None and N >= STACK_AUTO_MIN_BATCH:
            return iter(self._choose_path(x, p))
        return self._unstacked(x, p)

    def _choose_path(self, x: torch.Tensor, p: torch.Tensor) -> list:
        """``stacked="auto"``: time both paths on this batch, keep the faster one.

        Returns this batch's outputs of the unstacked path (so the first batch's results do
        not depend on the timing). A model the stacked path cannot run stays unstacked.
        """
        outs = list(self._unstacked(x, p))  # also validates the input and the labels
        try:
            list(self._stacked(x, p))  # warm-up: vmap tracing, kernel selection
        except Exception:  # noqa: BLE001 - e.g. data-dependent control flow under vmap
            self._use_stacked, self._stack = False, None
            return outs

        def timed(path) -> float:
            self._sync()
            t0 = time.perf_counter()
            list(path(x, p))
            self._sync()
            return time.perf_counter() - t0

        # two alternating rounds, best of each: robust to a noisy neighbour on the machine
        t_s, t_u = float("inf"), float("inf")
        for _ in range(2):
            t_s = min(t_s, timed(self._stacked))
            t_u = min(t_u, timed(self._unstacked))
        self.stack_timing = (t_u, t_s)
        self._use_stacked = t_s < STACK_AUTO_MARGIN * t_u
        if not self._use_stacked:
            self._stack = None  # free the stacked copy of the parameters
        return outs

    # ------------------------------------------------------------------ main
    def run(self, x: Any, y: Any = None, *, emit: str = "vog") -> BatchResult:
        """Score one batch.

        ``x``: ``[N, C, H, W]`` images or ``[N, D]`` vectors; ``y``: true labels ``[N]`` (``-1``
        or ``None`` where unknown; required when ``label_mode="true"``). ``emit="vog"`` returns
        raw VoG per window and target; ``emit="moments"`` returns the pixel-moment states
        (for checkpoint-sharded or incremental audits); ``"both"`` returns both.
        """
        return self._run_tensor(self.prepare(x), y, emit)

    def run_batches(self, batches: Iterable[tuple[Any, Any]], *, emit: str = "vog") -> Iterator[BatchResult]:
        """:meth:`run` over ``(x, y)`` batches in order; on CUDA each batch's copy to the device runs
        (pinned buffer, side stream, background thread) while the batch before it computes."""
        for staged, y in self.stager.prefetch(batches):
            yield self._run_tensor(self._layout(staged.tensor()), y, emit)

    def _run_tensor(self, x: torch.Tensor, y: Any, emit: str) -> BatchResult:
        """Checks and the status of every row, then the result (:meth:`_fitting`)."""
        N = x.shape[0]
        if x.ndim < 2:
            raise InputError(f"a batch must have at least 2 dimensions [N, ...], got {tuple(x.shape)}")
        if self._channels_last_unverified and x.ndim == 4 and N > 0:
            x = self._verify_channels_last(x)
        if y is None:
            y_t = torch.full((N,), -1, dtype=torch.long, device=self.device)
        else:
            y_t = torch.as_tensor(np.asarray(y), dtype=torch.long).to(self.device)
            if y_t.shape != (N,):
                raise InputError(f"labels must have shape [{N}], got {tuple(y_t.shape)}")
        finite = torch.isfinite(x.reshape(N, -1)).all(dim=1)
        status = np.full(N, "ok", dtype=object)
        if not bool(finite.all()):
            bad = (~finite).cpu().numpy()
            status[bad] = "non_finite_input"
            x = torch.where(finite.view(-1, *([1] * (x.ndim - 1))), x, torch.zeros((), device=x.device))
        if self.label_mode == "true" and (y_t < 0).any():
            raise InputError("label_mode='true' needs a label for every example "
                             "(found -1 / missing labels); use label_mode='predicted'")
        return self._fitting(x, y_t, status, emit)

    def _fitting(self, x: torch.Tensor, y_t: torch.Tensor, status: np.ndarray, emit: str) -> BatchResult:
        """The batch's result, computed in parts that fit in device memory: a batch that runs out of
        it is split in two and retried, and the size that fits is kept for the batches after it.
        Examples do not interact (``eval()`` mode), so the parts' results are the batch's."""
        N = x.shape[0]
        m = self.max_rows
        if m is not None and N > m:
            return BatchResult.concat([self._fitting(x[a:a + m], y_t[a:a + m], status[a:a + m], emit)
                                      for a in range(0, N, m)])
        try:
            res = self._compute(x, y_t, status, emit)
        except torch.cuda.OutOfMemoryError as e:
            if N <= 1:
                raise DeviceMemoryError(
                    f"one example of shape {tuple(x.shape[1:])} does not fit in {self.device} memory with "
                    f"model {self.name} and {len(self.models)} checkpoints (precision {self.precision}"
                    f"{', stacked' if self._use_stacked else ''}): compute.batch_size cannot go below 1; "
                    "split the checkpoints over actors (compute.checkpoint_groups), use compute.precision: "
                    "bf16, or a device with more memory") from e
            res = None
        if res is None:  # outside the except block: the failed attempt's tensors are free now
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.max_rows = (N + 1) // 2
            self._announce_fit = True
            log.warning("%s: out of %s memory on a batch of %d examples: splitting it in two",
                        self.name, self.device, N)
            return self._fitting(x, y_t, status, emit)
        if self._announce_fit:
            self._announce_fit = False
            log.warning("%s: batches of %d examples fit in %s memory: larger batches are split into parts "
                        "of that size from now on (compute.batch_size: %d avoids the split)",
                        self.name, self.max_rows, self.device, self.max_rows)
        return res

    def _compute(self, x: torch.Tensor, y_t: torch.Tensor, status: np.ndarray, emit: str) -> BatchResult:
        """One batch on the device: target index, every checkpoint's maps folded into the windows,
        signals, results as numpy."""
        N = x.shape[0]
        if self.label_mode == "predicted":
            with torch.no_grad(), cuda_flags(self.device, "fp32"):
                p = self.forward(self.predictor, x).argmax(dim=1)
        else:
            p = y_t
        states: dict[str, PixelMoments] = {}
        all_logits: list[torch.Tensor] = []
        with cuda_flags(self.device, self.precision):
            for i, logits, grads in self._checkpoint_grads(x, p):
                gid = self.ids[i]
                for w, idx in self.windows.items():
                    if gid not in idx:
                        continue
                    for t in self.targets:
                        key = f"{w}_{t}"
                        st = states.get(key)
                        if st is None:
                            states[key] = _first_moments(grads[t], self.accum_dtype)
                        else:
                            _fold(st, grads[t])
                all_logits.append(logits)
        sig = _signals(torch.stack(all_logits), p, y_t)   # name -> [N, K_local]
        pred_last: torch.Tensor | None = None
        if self.num_checkpoints - 1 in self._local:
            pred_last = sig["pred"][:, self._local[self.num_checkpoints - 1]]
        elif self.predictor is not None and self.label_mode == "predicted":
            pred_last = p

        res = BatchResult(
            status=status,
            target_label=p.cpu().numpy().astype(np.int64),
            pred=None if pred_last is None else pred_last.cpu().numpy().astype(np.int64),
        )
        for s, vals in sig.items():
            res.signals[s] = vals.cpu().numpy()
        bad_rows = status != "ok"
        for key, st in states.items():
            if emit in ("vog", "both"):
                std = st.std()
                v = std.reshape(N, -1).double().mean(dim=1).cpu().numpy()
                v[bad_rows] = np.nan
                res.vog[key] = v
            if emit in ("moments", "both"):
                res.moments[key] = st.to_numpy()
        if bad_rows.any():
            res.target_label[bad_rows] = -1
        return res

    def compare_to_fp32(self, x: Any, y: Any = None, rows: int = PRECISION_CHECK_ROWS, *,
                        got: BatchResult | None = None) -> dict[str, dict[str, Any]]:
        """The first-batch precision check: this engine's raw VoG against fp32's on the first ``rows``
        examples of ``x``, per ``<window>_<target>`` key (:func:`~vog_ray.core.precision.fidelity`).
        ``got``: this engine's result for ``x`` when it is at hand (then only the fp32 pass runs).
        Keys whose window holds fewer than 2 of this engine's checkpoints (VoG 0) are left out."""
        x = x[:rows]
        y = None if y is None else np.asarray(y)[:rows]
        if got is None:
            got = self.run(x, y)
        mode = {k: v[:rows] for k, v in got.vog.items()} or {
            k: np.asarray(st.finalize(), np.float64)[:rows] for k, st in got.moments.items()}
        saved, self.precision = self.precision, "fp32"
        try:
            ref = self.run(x, y)
        finally:
            self.precision = saved
        return {k: fidelity(ref.vog[k], mode[k]) for k in ref.vog
                if len(self.window_members[k.rsplit("_", 1)[0]]) > 1}

    @property
    def num_classes(self) -> int | None:
        return self._num_classes


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when this process sees a GPU, else the CPU; ``cuda`` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available here")
    return torch.device(device)


def make_engine(model: nn.Module, state_dicts: Sequence[dict[str, torch.Tensor]], opts: VogOptions,
                device: str = "auto", *, indices: Sequence[int] | None = None,
                num_checkpoints: int | None = None,
                predict_state_dict: dict[str, torch.Tensor] | None = None,
                stacked: bool | str = False, precision: str = "fp32", compile: bool = False,
                channels_last: bool | None = None, name: str | None = None) -> GradientEngine:
    """An engine for the checkpoints ``state_dicts`` (global positions ``indices`` among
    ``num_checkpoints``; default: all of them) computing what ``opts`` asks for, with the execution
    options of :class:`GradientEngine`."""
    K = num_checkpoints or len(state_dicts)
    windows = resolve_windows(opts.windows, K)
    return GradientEngine(
        model, state_dicts, windows=windows, targets=opts.targets, label_mode=opts.label_mode,
        checkpoint_ids=indices, num_checkpoints=K, predict_state_dict=predict_state_dict,
        device=pick_device(device), accum_dtype=opts.torch_dtype, stacked=stacked, precision=precision,
        compile=compile, channels_last=channels_last, name=name)
