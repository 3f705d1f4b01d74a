"""The audit config: one YAML file, validated, overridable from the CLI (``--set a.b=value``).

An unknown key or a wrong type is an error naming the key and the file. Credentials never
appear here: they come from the environment (``AWS_ACCESS_KEY_ID`` …).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .core.options import WRITTEN_COLUMNS, WRITTEN_PREFIXES, VogOptions, written_column
from .core.windows import check_window_spec
from .models.factories import check_factory, is_factory_name
from .storage import StorageOptions as _StorageOptions
from .storage import redact_url

__all__ = ["AuditConfig", "ConfigError", "DataError", "load_config", "apply_overrides", "SplitSpec", "redact"]


class ConfigError(ValueError):
    """The config file is invalid; the message names the file and the key."""


class DataError(ValueError):
    """Input data that can never be scored as configured (a split's file lacks a column the config
    names, labels that are not class indices); the message names the file and the column. The CLI
    exits 2 for it, as for a :class:`ConfigError`, also when it was raised inside a Ray task."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


IMAGE_FOLDER_COLUMNS = ("class_name", "path")  # what an image-folder split can carry
# score-table columns a report setting may name besides the carried ones
REPORTABLE_COLUMNS = ("split", "label", "target_label", "pred", "correct")


class WebDatasetSpec(_Strict):
    """``format: webdataset``: which members of a sample hold its image and its label."""

    image_keys: list[str] = Field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "npy"], min_length=1,
        description="the image is the sample's first member with one of these extensions")
    label_key: str = Field(
        default="cls", description="the member whose text is the integer label (an extension, e.g. cls), "
        "or json:<key> for a key of the sample's json member")


class ManifestSpec(_Strict):
    """``format: manifest``: a table of image URIs; how the images are fetched."""

    table_format: Literal["auto", "parquet", "csv", "jsonl"] = Field(
        default="auto", description="the manifest's format (auto: from the file extension)")
    fetch_threads: int = Field(default=16, ge=1, le=256,
                               description="concurrent image fetches in each read task")
    fetch_retries: int = Field(default=3, ge=0, le=20,
                               description="retries of a failed fetch (a missing object is not retried)")
    rows_per_task: int = Field(default=2000, ge=1,
                               description="manifest rows (images fetched) per read task of a Parquet manifest")


class SplitSpec(_Strict):
    """One data split: where it lives and how to read it."""

    format: Literal["parquet", "image_folder", "cifar", "npz", "webdataset", "manifest"]
    url: Union[str, list[str]] = Field(description="a file, a directory, a glob, or a list of them")
    image_column: str = "image"
    label_column: Optional[str] = "label"
    id_column: Optional[str] = None
    keep_columns: list[str] = Field(default_factory=list,
                                    description="extra columns carried into the score table (e.g. is_noisy)")
    image_shape: Optional[list[int]] = Field(
        default=None, description="shape of raw-array images (C,H,W) / (H,W) when not encoded")
    cifar_batches: Optional[Literal["train", "test"]] = Field(
        default=None, description="cifar: which batches (train = data_batch_*, test = test_batch)")
    group: Optional[str] = Field(default=None, description="a group name for reports (e.g. OoD groups)")
    webdataset: Optional[WebDatasetSpec] = Field(default=None, description="format webdataset: its options")
    manifest: Optional[ManifestSpec] = Field(default=None, description="format manifest: its options")

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, v: Any) -> Any:
        """A webdataset / manifest split gets its options block (defaults) when it has none."""
        if isinstance(v, dict) and v.get("format") in ("webdataset", "manifest") and v.get(v["format"]) is None:
            v = {**v, v["format"]: {}}
        return v

    @model_validator(mode="after")
    def _format_options(self) -> "SplitSpec":
        for opt in ("webdataset", "manifest"):
            if getattr(self, opt) is not None and self.format != opt:
                raise ValueError(f"{opt} options are for format: {opt} (this split is {self.format})")
        if self.format == "webdataset" and self.id_column:
            raise ValueError("a webdataset split takes its ids from the samples' keys ('<shard>.tar:<key>'; "
                             "no id_column)")
        return self

    @model_validator(mode="after")
    def _carried(self) -> "SplitSpec":
        seen = [c for i, c in enumerate(self.keep_columns) if c in self.keep_columns[:i]]
        if seen:
            raise ValueError(f"keep_columns names {seen[0]!r} twice")
        clash = [c for c in self.keep_columns if written_column(c)]
        if clash:
            raise ValueError(
                f"keep_columns: {clash[0]!r} is a column the audit writes itself (reserved: "
                f"{', '.join(WRITTEN_COLUMNS)} and names starting with {', '.join(WRITTEN_PREFIXES)}); "
                "rename that column in the data")
        if self.format == "image_folder":
            bad = [k for k in self.keep_columns if k not in IMAGE_FOLDER_COLUMNS]
            if bad:
                raise ValueError(f"keep_columns: an image_folder split can keep only "
                                 f"{' and '.join(map(repr, IMAGE_FOLDER_COLUMNS))}, not {bad[0]!r}")
            if self.id_column:
                raise ValueError("id_column: an image_folder split takes its ids from the paths")
        return self


class TransformSpec(_Strict):
    """Decoding and normalisation, run as CPU tasks before the scorer stage."""

    channels: Optional[Literal[1, 3]] = Field(default=None, description="convert to gray (1) or RGB (3)")
    resize: Optional[int] = None
    center_crop: Optional[int] = None
    scale: float = Field(default=1 / 255, description="pixel values are multiplied by this first")
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    flatten: bool = Field(default=False, description="flatten images into vectors (MLP / tabular)")
    decode_on: Literal["cpu", "gpu"] = Field(
        default="cpu", description="where JPEG images are decoded: in the CPU decode tasks (cpu), or by nvJPEG "
        "inside GPU scorer actors (gpu: the decode tasks pass the encoded bytes through; other formats and "
        "CPU actors still decode on the CPU)")


class DataSpec(_Strict):
    splits: dict[str, SplitSpec]
    transform: TransformSpec = Field(default_factory=TransformSpec)
    class_names: Optional[list[str]] = None

    @field_validator("splits")
    @classmethod
    def _nonempty(cls, v: dict[str, SplitSpec]) -> dict[str, SplitSpec]:
        if not v:
            raise ValueError("at least one split is needed")
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"split name {name!r} may hold only letters, digits, '_', '-', '.'")
        return v


class VogSpec(_Strict):
    targets: list[Literal["logit", "softmax"]] = Field(default_factory=lambda: ["logit"])
    label: Literal["true", "predicted"] = "true"
    windows: dict[str, Union[str, list[int]]] = Field(default_factory=lambda: {"all": "all"})
    normalization: Literal["zscore", "abs_zscore", "none"] = "zscore"
    rank_by: Optional[str] = None
    accum_dtype: Literal["float32", "float64"] = "float32"
    normalize_against: Optional[str] = Field(
        default=None, description="a split of data.splits: every split's z uses that split's class moments "
        "(how unusual an example is for the reference distribution); null: each split its own")
    state_dtype: Literal["float16", "float32", "float64"] = Field(
        default="float32", description="incremental audits: how the persisted per-pixel moments are stored "
        "(float16: half the bytes, each example's moments scaled into [-1, 1]; float64 for accum_dtype float64)")

    @field_validator("targets", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("label", mode="before")
    @classmethod
    def _label_bool(cls, v: Any) -> Any:
        return "true" if v is True else v

    def options(self) -> VogOptions:
        return VogOptions(windows=dict(self.windows), targets=list(self.targets), label_mode=self.label,
                          normalization=self.normalization, rank_by=self.rank_by,
                          accum_dtype=self.accum_dtype, normalize_against=self.normalize_against)


class ActorPool(_Strict):
    min: int = Field(default=1, ge=1)
    max: int = Field(default=1, ge=1)
    tasks_in_flight: Optional[int] = Field(
        default=None, ge=1, description="blocks queued per actor (Ray Data's default when unset); 1 spreads "
        "few large blocks over every actor")
    wait_for_min_s: int = Field(
        default=0, ge=0, description="wait up to this many seconds for `min` actors before scoring starts "
        "(0: start with the first actor ready)")

    @model_validator(mode="after")
    def _order(self) -> "ActorPool":
        if self.max < self.min:
            raise ValueError(f"actors.max ({self.max}) is below actors.min ({self.min})")
        return self


# engine batches per scorer call on GPU actors: the copy of each batch overlaps the gradients of the
# one before it, so a call of B batches hides all copies but the first (B = 4: 3/4 of them)
GPU_BATCHES_PER_CALL = 4


class ComputeSpec(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=256, ge=1)
    actors: ActorPool = Field(default_factory=ActorPool)
    gpus_per_actor: float = Field(default=1.0, gt=0)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    threads_per_actor: Optional[int] = Field(
        default=None, ge=1, description="torch threads in each scorer actor (default: Ray's OMP_NUM_THREADS, "
        "i.e. cpus_per_actor rounded down, at least 1)")
    checkpoint_groups: int = Field(default=1, ge=1)
    read_blocks: Optional[int] = Field(default=None, ge=1, description="override the number of read blocks")
    decode_batch_size: int = Field(default=512, ge=1)
    max_errored_blocks: int = Field(default=0, ge=0)
    stack_checkpoints: Literal["off", "on", "auto"] = Field(
        default="off", description="run the K checkpoints of a small model as one vmapped call (on), time both "
        "paths on the first batch and keep the faster (auto), or one checkpoint after the other (off: every "
        "actor takes the same path, so reruns are bit-identical)")
    gpu_wait_s: int = Field(
        default=0, ge=0, description="on an autoscaling cluster with no GPU node up yet: ask the autoscaler for "
        "actors.min GPU bundles and wait up to this many seconds for them (device cuda fails after it; auto falls "
        "back to the CPU); 0: decide from the GPUs the cluster has now")

    @field_validator("stack_checkpoints", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as bools

    # --- the GPU fast path (vog_ray.core.precision, vog_ray.core.transfer; README "GPU")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        default="fp32", description="the forward/backward arithmetic: fp32, tf32 (CUDA tensor cores; no effect on "
        "the CPU) or bf16 (autocast); pixel moments stay float32/64. The first batch of each actor is also "
        "scored in fp32 and the audit warns for every window whose ranking moved (Spearman < 0.99)")
    compile: bool = Field(default=False, description="torch.compile each checkpoint's forward (not with "
                          "stack_checkpoints: on)")
    channels_last: Literal["auto", "on", "off"] = Field(
        default="auto", description="NHWC convolutions: auto = on for convnets on the CPU and in tf32/bf16 on "
        "CUDA, off otherwise")
    batches_per_call: Optional[int] = Field(
        default=None, ge=1, description="engine batches of batch_size per scorer call; on a GPU each batch's "
        "host-to-device copy then overlaps the previous batch's gradients (default: 4 on GPU actors, 1 on CPUs)")

    @field_validator("channels_last", mode="before")
    @classmethod
    def _yaml_on_off_cl(cls, v: Any) -> Any:
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    def stacked_option(self) -> bool | str:
        """``stack_checkpoints`` as the engine's ``stacked`` argument."""
        return {"off": False, "on": True, "auto": "auto"}[self.stack_checkpoints]

    def engine_options(self) -> dict[str, Any]:
        """The engine's execution options (``make_engine`` keywords) from this section."""
        return {"stacked": self.stacked_option(), "precision": self.precision, "compile": self.compile,
                "channels_last": {"auto": None, "on": True, "off": False}[self.channels_last]}

    def calls_of(self, gpus: float) -> int:
        """Engine batches per scorer call (``batches_per_call``, or its default for GPU/CPU actors)."""
        return self.batches_per_call or (GPU_BATCHES_PER_CALL if gpus else 1)

    @model_validator(mode="after")
    def _compile_stacked(self) -> "ComputeSpec":
        if self.compile and self.stack_checkpoints == "on":
            raise ValueError("compute.compile runs the checkpoints one after the other: it cannot be combined "
                             "with compute.stack_checkpoints: on")
        return self


class StorageSpec(_Strict):
    endpoint_url: Optional[str] = None
    anonymous: bool = False
    region: Optional[str] = None

    def options(self) -> _StorageOptions:
        return _StorageOptions(endpoint_url=self.endpoint_url, anonymous=self.anonymous, region=self.region)


class OutputSpec(_Strict):
    url: str
    keep_work: bool = Field(
        default=False, description="keep <url>/_work/<key>/ (stage 1's raw table) after the run is published; a "
        "rerun with the same config, checkpoints and input files then reuses it instead of scoring again")


class OodSpec(_Strict):
    in_distribution: str
    ood_splits: list[str] = Field(default_factory=list)
    group_column: Optional[str] = None


class ReportSpec(_Strict):
    enabled: bool = True
    flag_columns: list[str] = Field(default_factory=list, description="boolean columns, e.g. is_noisy")
    ood: Optional[OodSpec] = None
    classes_to_show: list[int] = Field(default_factory=list)
    heatmaps: bool = Field(default=True, description="a grid of the VoG heat maps of the highest-VoG examples "
                           "of each split (computed with the run's model and checkpoints)")
    bootstrap: int = Field(default=1000, ge=0)
    seed: int = 0


class FlagRuleSpec(_Strict):
    """Which ranked rows of a split are flagged: every criterion given must hold."""

    top_percent: Optional[float] = Field(
        default=None, gt=0, le=100, description="the top share of the split by rank (5: the 5% highest scores)")
    z_above: Optional[float] = Field(default=None, description="the ranked score (z of rank_by) above this")
    label_mismatch: bool = Field(default=False, description="require a known label that differs from the "
                                 "last checkpoint's prediction")


class FlagsSpec(FlagRuleSpec):
    """``flags``: the ``flagged`` column of the score table and ``flagged.parquet``. The top-level
    rule applies to every split; ``splits.<name>`` overrides its keys for one split."""

    splits: dict[str, FlagRuleSpec] = Field(default_factory=dict)
    ground_truth: Optional[str] = Field(
        default=None, description="a boolean keep column (e.g. is_noisy): the report shows the flags' "
        "precision and recall against it")

    def rules(self, split_names: list[str]) -> dict[str, dict[str, Any]]:
        """split -> its rule (the top-level keys, overridden by the keys set in ``splits.<name>``)."""
        base = FlagRuleSpec(**{k: getattr(self, k) for k in FlagRuleSpec.model_fields}).model_dump()
        return {s: {**base, **(self.splits[s].model_dump(exclude_unset=True) if s in self.splits else {})}
                for s in split_names}


class AuditConfig(_Strict):
    name: str = "audit"
    data: DataSpec
    model: Union[str, dict[str, Any]]
    checkpoints: Union[str, list[str]]
    vog: VogSpec = Field(default_factory=VogSpec)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    output: OutputSpec
    report: ReportSpec = Field(default_factory=ReportSpec)
    flags: Optional[FlagsSpec] = None
    _source: str = PrivateAttr(default="<dict>")

    @model_validator(mode="after")
    def _flags_names(self) -> "AuditConfig":
        if self.flags is None:
            return self
        for s in self.flags.splits:
            if s not in self.data.splits:
                raise ValueError(f"flags.splits.{s}: not a split of data.splits ({sorted(self.data.splits)})")
        gt = self.flags.ground_truth
        if gt and not any(gt in sp.keep_columns for sp in self.data.splits.values()):
            raise ValueError(f"flags.ground_truth: {gt!r} is not a keep_columns entry of any split")
        return self

    @field_validator("model")
    @classmethod
    def _trusted_factory(cls, v: Union[str, dict[str, Any]]) -> Union[str, dict[str, Any]]:
        # a factory this process would refuse is an invalid config, caught before any work
        name = v if isinstance(v, str) else v.get("name")
        if isinstance(name, str) and is_factory_name(name):
            check_factory(name)
        return v

    @model_validator(mode="after")
    def _windows_parse(self) -> "AuditConfig":
        # syntax only here; counts are checked once the checkpoints are listed
        for name, spec in self.vog.windows.items():
            try:
                check_window_spec(name, spec)
            except ValueError as e:
                raise ValueError(f"vog.windows: {e}") from e
        keys = [f"{w}_{t}" for w in self.vog.windows for t in self.vog.targets]
        if self.vog.rank_by is not None and self.vog.rank_by not in keys:
            raise ValueError(f"vog.rank_by: {self.vog.rank_by!r} is not one of the audit's <window>_<target> "
                             f"keys {keys}")
        return self

    @model_validator(mode="after")
    def _reference_split(self) -> "AuditConfig":
        ref = self.vog.normalize_against
        if ref is not None and ref not in self.data.splits:
            raise ValueError(f"vog.normalize_against: {ref!r} is not a split of data.splits "
                             f"(splits: {sorted(self.data.splits)})")
        if ref is not None and self.vog.normalization == "none":
            raise ValueError("vog.normalize_against needs vog.normalization zscore or abs_zscore "
                             "(with none, z is raw VoG)")
        return self

    @model_validator(mode="after")
    def _report_fits(self) -> "AuditConfig":
        """Report settings that name splits or columns the audit will not have are refused here,
        not after the run is published."""
        splits = list(self.data.splits)
        carried = list(dict.fromkeys(c for s in self.data.splits.values() for c in s.keep_columns))
        columns = carried + list(REPORTABLE_COLUMNS)
        for c in self.report.flag_columns:
            if c not in columns:
                raise ValueError(f"report.flag_columns: {c!r} is not carried by any split (add it to a split's "
                                 f"keep_columns); carried: {carried}")
        ood = self.report.ood
        if ood is not None:
            for key, s in [("in_distribution", ood.in_distribution)] + [("ood_splits", x) for x in ood.ood_splits]:
                if s not in splits:
                    raise ValueError(f"report.ood.{key}: {s!r} is not a split of data.splits {splits}")
            if ood.in_distribution in ood.ood_splits:
                raise ValueError(f"report.ood: split {ood.in_distribution!r} is both in_distribution and in ood_splits")
            if not ood.ood_splits and not ood.group_column:
                raise ValueError("report.ood needs ood_splits and/or group_column")
            if ood.group_column is not None and ood.group_column not in columns:
                raise ValueError(f"report.ood.group_column: {ood.group_column!r} is not carried by any split "
                                 f"(add it to a split's keep_columns); carried: {carried}")
        return self

    @property
    def source(self) -> str:
        """The file this config was read from (``<dict>`` when built from a dict)."""
        return self._source

    def error(self, key: str, message: str) -> "ConfigError":
        """An invalid-config error naming this config's file and ``key`` (for checks that need the
        checkpoints or the data, made while planning)."""
        return ConfigError(f"invalid config {self._source}:\n  {key}: {message}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_SECRET_KEYS = re.compile(r"(secret|password|token|credential|access_key|session_key)", re.I)


def redact(obj: Any) -> Any:
    """A copy of a config dict with anything secret-looking replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_KEYS.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_url(obj)
    return obj


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(d: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a config dict."""
    d = copy.deepcopy(d)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        cur = d
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {ov!r}: {p!r} is not a section")
            cur = nxt
        cur[parts[-1]] = _parse_value(raw)
    return d


def _format_errors(e: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's wrapper around our ValueErrors
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            m = re.match(r"([a-z_][a-z_.]*): ", msg)
            if m:  # a model check names its key first
                loc = m.group(1) if loc == "(top level)" else f"{loc}.{m.group(1)}"
                msg = msg[m.end():]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate(d: dict[str, Any], source: str = "<dict>") -> AuditConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    try:
        cfg = AuditConfig.model_validate(d)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    cfg._source = source
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> AuditConfig:
    """Read, override and validate a YAML config file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    return validate(apply_overrides(d, overrides), str(p))
