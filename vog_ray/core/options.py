"""What an audit computes: targets, label mode, windows, normalisation (and the split it may be
taken against), the ranked key, the accumulation dtype (:class:`VogOptions`), and the names of
the per-checkpoint signals. Imports neither torch nor Ray (the config and the reduce workers use it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .moments import NORMALIZATIONS

__all__ = ["VogOptions", "TARGETS", "LABEL_MODES", "SIGNALS", "NORMALIZATIONS", "ACCUM_DTYPES", "PRECISIONS",
           "WRITTEN_COLUMNS", "WRITTEN_PREFIXES", "written_column"]

TARGETS = ("logit", "softmax")
LABEL_MODES = ("true", "predicted")
ACCUM_DTYPES = ("float32", "float64")
# the engine's arithmetic for the forward and backward passes (vog_ray.core.precision)
PRECISIONS = ("fp32", "tf32", "bf16")
# per-checkpoint signals, all computed at the target index p unless the name says otherwise:
# el2n = ||softmax - one_hot(p)||_2 (Paul et al., 2021), entropy = -sum softmax * log softmax
SIGNALS = ("loss", "label_logit", "label_prob", "margin", "pred", "correct", "max_prob",
           "max_logit", "energy", "el2n", "entropy")

# the columns an audit writes into its tables (raw, score and rejected rows): a carried
# (``keep_columns``) column of one of these names would overwrite a computed value or be
# mistaken for one (the merges of partial moments select columns by these prefixes)
WRITTEN_COLUMNS = ("id", "split", "label", "target_label", "pred", "correct", "status", "group", "score", "rank",
                   "class_rank", "percentile", "decile", "reason", "x", "image", "flagged")
WRITTEN_PREFIXES = ("vog_", "z_", "sig_", "mn_", "mmean_", "mm2_")


def written_column(name: str) -> bool:
    """Whether ``name`` is (or may be) a column the audit writes itself."""
    return name in WRITTEN_COLUMNS or name.startswith(WRITTEN_PREFIXES)


@dataclass
class VogOptions:
    """What to compute. ``windows`` maps names to specs (see :mod:`vog_ray.core.windows`)."""

    windows: dict[str, Any] = field(default_factory=lambda: {"all": "all"})
    targets: Sequence[str] = ("logit",)
    label_mode: str = "true"
    normalization: str = "zscore"
    rank_by: str | None = None          # "<window>_<target>"; default: late/all/first window, first target
    accum_dtype: str = "float32"
    normalize_against: str | None = None  # a split: every split's z uses that split's class moments

    def __post_init__(self) -> None:
        self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"unknown target {t!r}; expected one or more of {TARGETS}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"unknown label mode {self.label_mode!r}; expected one of {LABEL_MODES}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected one of {NORMALIZATIONS}")
        if self.accum_dtype not in ACCUM_DTYPES:
            raise ValueError("accum_dtype must be 'float32' or 'float64'")
        if self.normalize_against is not None and self.normalization == "none":
            raise ValueError("normalize_against needs normalization 'zscore' or 'abs_zscore' "
                             "(with 'none', z is raw VoG and there is nothing to normalise against)")

    def keys(self, windows: dict[str, list[int]]) -> list[str]:
        """The ``<window>_<target>`` keys, windows in order, then targets."""
        return [f"{w}_{t}" for w in windows for t in self.targets]

    def primary(self, windows: dict[str, list[int]]) -> str:
        """The key the ranks use: ``rank_by``, else the late, all or first window's first target."""
        keys = self.keys(windows)
        if self.rank_by:
            if self.rank_by not in keys:
                raise ValueError(f"rank_by {self.rank_by!r} is not one of {keys}")
            return self.rank_by
        for w in ("late", "all"):
            if w in windows:
                return f"{w}_{self.targets[0]}"
        return keys[0]

    def as_kwargs(self) -> dict[str, Any]:
        """Plain values (e.g. for a Ray actor's constructor)."""
        return {"windows": dict(self.windows), "targets": list(self.targets), "label_mode": self.label_mode,
                "normalization": self.normalization, "rank_by": self.rank_by, "accum_dtype": self.accum_dtype,
                "normalize_against": self.normalize_against}

    @property
    def torch_dtype(self) -> Any:
        import torch

        return torch.float64 if self.accum_dtype == "float64" else torch.float32
