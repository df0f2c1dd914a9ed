"""Run configuration: YAML files plus dotted command-line overrides, validated up front.

Every value a run uses lives in one typed tree (`RunConfig`). It is built from
the defaults below, then a YAML file, then `section.key=value` overrides, and
validated before any work starts: a bad key or value is a one-line
`ConfigError` that names the key, so a typo fails in a second instead of an
hour into a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlp.errors import UserError


class ConfigError(UserError):
    """A config problem, phrased as one line that names the key."""


class Section(BaseModel):
    # extra="forbid": an unknown key is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(Section):
    """One stream of shards; several sources are mixed by weight."""

    shards: str = Field(description="brace spec, local path, http URL or 'pipe:' command")
    weight: float = Field(1.0, gt=0)
    manifest: str | None = Field(None, description="manifest.json with per-shard sample counts")


class AugmentConfig(Section):
    scale_min: float = Field(0.9, gt=0, le=1)
    scale_max: float = Field(1.0, gt=0, le=1)
    ratio_min: float = Field(3 / 4, gt=0)
    ratio_max: float = Field(4 / 3, gt=0)
    color_jitter: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> AugmentConfig:
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must be <= scale_max")
        if self.ratio_min > self.ratio_max:
            raise ValueError("ratio_min must be <= ratio_max")
        return self


class DataConfig(Section):
    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(shards="data/shards", manifest=None)]
    )
    split: Literal["exact", "resampled"] = "exact"
    samples_per_epoch: int | None = Field(None, gt=0, description="required for split=resampled")
    shuffle_buffer: int = Field(1000, ge=0)
    workers: int = Field(2, ge=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    hard_negatives: int = Field(0, ge=0, description="extra negative captions per image")
    hard_negatives_from_step: int = Field(
        0, ge=0, description="first step whose batches carry hard negatives (learn the easy facts first)"
    )


class ModelConfig(Section):
    name: str = "vlp-tiny"
    pretrained: str | None = Field(None, description="local weights file for the model")
    lock_image: bool = False
    lock_text: bool = False
    grad_checkpointing: bool = False
    patch_dropout: float = Field(0.0, ge=0, lt=1)


class LossConfig(Section):
    kind: Literal["softmax", "sigmoid"] = "softmax"
    gather_with_grad: bool = True
    local_loss: bool = False
    sigmoid_chunked: bool = True
    init_logit_scale: float | None = Field(None, description="default: log(1/0.07) softmax, log(10) sigmoid")
    init_logit_bias: float | None = Field(None, description="default: -10 (sigmoid only)")
    max_logit_scale: float = Field(100.0, gt=0)
    decoupled: bool = Field(False, description="drop the positive from the softmax denominator (DCL)")
    align_uniform: float = Field(0.0, ge=0, description="weight of the alignment + uniformity term")
    hard_negative_weight: float = Field(1.0, ge=0)
    hard_negative_mode: Literal["denominator", "pairwise"] = Field(
        "denominator",
        description="denominator: extra columns of the image->text softmax; pairwise: a separate term "
        "-log(e^pos / (e^pos + sum e^neg)) per image, times hard_negative_weight (Paiss et al. 2023)",
    )


class OptimConfig(Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    min_lr: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)


class TrainConfig(Section):
    batch_size: int = Field(128, gt=0, description="contrastive batch per rank")
    micro_batch_size: int | None = Field(
        None, gt=0, description="chunk for gradient caching; None = the whole batch at once"
    )
    samples: int | None = Field(20_000, gt=0, description="length in samples seen (global)")
    steps: int | None = Field(None, gt=0, description="length in optimizer steps (overrides samples)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    deepspeed_config: str | None = Field(
        None, description="DeepSpeed JSON merged over the generated config (launch/ds_zero*.json)"
    )
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0, description="steps between checkpoints")
    keep_last: int = Field(2, gt=0)
    resume: str | None = Field(None, description="'auto', a checkpoint path, or None")
    eval_every: int | None = Field(None, gt=0, description="steps between zero-shot evals")
    eval_suite: str | None = None
    log_keys: bool = Field(False, description="write every step's sample keys to metrics.jsonl")

    @model_validator(mode="after")
    def _chunks_divide(self) -> TrainConfig:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide batch_size ({self.batch_size})"
            )
        if self.samples is None and self.steps is None:
            raise ValueError("set samples or steps")
        return self


class LaunchConfig(Section):
    """The cluster `vlp launch --dry-run` prints commands for."""

    launcher: Literal["torchrun", "deepspeed", "slurm", "accelerate"] = "torchrun"
    nodes: int = Field(1, gt=0)
    procs_per_node: int = Field(1, gt=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, gt=0, lt=65536)
    hostfile: str | None = None


class DemoConfig(Section):
    """What `vlp demo` generates and evaluates around the training run (ignored by `vlp train`)."""

    pairs: int = Field(50_000, gt=0, description="synthetic training pairs")
    seed: int = 0
    image_size: int = Field(64, ge=16)
    shard_size: int = Field(2000, gt=0)
    data_dir: str = "data/demo"
    eval_suite: str = "default"


class RunConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)


# ---------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001). Values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # PyYAML (YAML 1.1) reads '1e-3' as a string; pydantic turns it into a float
    # where a float is wanted, so strings are left for validation to coerce.
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(path[: i + 1])}' is not a section (override {text!r})")
        node = child
    node[path[-1]] = value


def _key_name(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section that holds loc[-1], for 'unknown key' errors."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if inner:  # list[DataSource] and the like
            ann = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _format_error(err: ValidationError, model: type[BaseModel]) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = _key_name(loc) or "<top level>"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown config key '{key}'{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict) or first["type"] == "value_error" else f" (got {got!r})"
    more = len(err.errors()) - 1
    tail = f"; and {more} more problem(s)" if more > 0 else ""
    return f"config key '{key}': {msg}{shown}{tail}"


def validate_tree(tree: dict, model: type[BaseModel] = RunConfig) -> BaseModel:
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, model)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated. Raises ConfigError (one line)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where}: not valid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        tree = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value, text)
    return validate_tree(tree)  # type: ignore[return-value]


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (stored in checkpoints and run folders)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
