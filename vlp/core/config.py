"""The config schema family: one pydantic schema per command, side by side, and how they load.

    vlp train   RunConfig          sections data, model, loss, optim, train
    vlp demo    DemoRunConfig      RunConfig + demo
    vlp launch  LaunchRunConfig    RunConfig + launch
    vlp shards  ShardsBuildConfig, SynthConfig, InspectConfig, VerifyConfig, IndexConfig (flat)
    vlp eval    EvalConfig, CompareConfig (flat)

Every default and description exists once, here: the CLI generates each
command's flags and help from these schemas (vlp.app.flags), and
`vlp config show NAME --describe` prints them. Values come from the
defaults, then a YAML file (`--config`), then `key=value` overrides (dotted
for nested sections), then explicit flags, and are validated before any
work starts: a bad key or value is a one-line `ConfigError` that names the
key, so a typo fails in a second instead of an hour into a job.

One YAML run file may hold the sections of several commands (a preset for
`vlp demo` also carries `demo:`, a cluster file `launch:`); each command
validates the sibling sections it does not use and ignores them.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from vlp.core.errors import UserError
from vlp.core.shipped import resolve
from vlp.core.smallfiles import read_small


class ConfigError(UserError):
    """A config problem, phrased as one line that names the key."""


S = TypeVar("S", bound=BaseModel)


def cpu_cores() -> int:
    """Cores this process may use (the default worker count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Section(BaseModel):
    # extra="forbid": an unknown key is an error, not silently ignored. allow_inf_nan=False: every float
    # key must be a finite number (NaN or inf would make a run end in NaN losses, or a deadline endless).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _split_commas(value: Any) -> Any:
    """'a,b' -> ['a', 'b'] (the CLI's form of a list); lists pass through."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


CommaList = Annotated[list[str], BeforeValidator(_split_commas)]
# A switch that vlp may decide from the model: "auto" (on where it is exact and helps), or true / false.
Auto = Literal["auto"] | bool


def positional(description: str) -> dict:
    """Field(**positional(...)): the CLI takes this field as positional arguments."""
    return {"description": description, "json_schema_extra": {"positional": True}}


class DataSource(Section):
    """One stream of shards; several sources are mixed by weight."""

    shards: str = Field(description="brace spec, local path, http URL or 'pipe:' command")
    weight: float = Field(1.0, gt=0)
    manifest: str | None = Field(None, description="manifest.json with per-shard sample counts")


class AugmentConfig(Section):
    """Image augmentation in the loader, seeded per sample (vlp.train.loader.batches.TrainTransform)."""

    scale_min: float = Field(0.9, gt=0, le=1, description="random resized crop: smallest area fraction")
    scale_max: float = Field(1.0, gt=0, le=1)
    ratio_min: float = Field(3 / 4, gt=0)
    ratio_max: float = Field(4 / 3, gt=0)
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation jitter (hue a quarter)")
    flip: float = Field(0.0, ge=0, le=1, description="horizontal flip probability, for captions that name no "
                        "side (left/right) and no written text")
    grayscale: float = Field(0.0, ge=0, le=1, description="grayscale probability, for captions that name no colour")

    @model_validator(mode="after")
    def _ordered(self) -> AugmentConfig:
        if self.scale_min > self.scale_max:
            raise ValueError("scale_min must be <= scale_max")
        if self.ratio_min > self.ratio_max:
            raise ValueError("ratio_min must be <= ratio_max")
        return self


class TextAugmentConfig(Section):
    """EDA-style caption augmentation in the loader, seeded per sample (vlp.train.loader.augment)."""

    word_dropout: float = Field(0.0, ge=0, lt=1, description="each word dropped with this probability")
    word_mask: float = Field(0.0, ge=0, lt=1, description="each word replaced by mask_word with this probability")
    mask_word: str = Field("*", min_length=1)
    word_swap: float = Field(0.0, ge=0, le=1, description="probability that two words of a caption swap places")


class DataConfig(Section):
    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(shards="data/shards", manifest=None)]
    )
    split: Literal["exact", "resampled"] = "exact"
    samples_per_epoch: int | None = Field(None, gt=0, description="required for split=resampled")
    shuffle_buffer: int = Field(1000, ge=0, description="samples permuted together (a window of whole batches)")
    lanes: int = Field(16, ge=1, description="places in each loader worker's part of the epoch read in turn, a "
                       "block of each per shuffle window: an input sorted by source, or few large shards, still "
                       "gives mixed batches (1: read the part front to back)")
    workers: int = Field(2, ge=0)
    batch_plan: str | None = Field(None, description="a `vlp shards mine-batches` plan: each epoch's batches are "
                                   "made of whole communities of mutually hard samples (B3; local shards)")
    batch_plan_random: float = Field(0.2, ge=0, le=1, description="with data.batch_plan: the share of each epoch's "
                                     "batches drawn at random instead")
    worker_nice: int = Field(19, ge=0, le=19, description="niceness added to each loader worker process: where "
                             "the workers and the training step share the cores, the step (which the rest waits "
                             "on) goes first and the workers fill its gaps (0: the trainer's own priority)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    text_augment: TextAugmentConfig = Field(default_factory=TextAugmentConfig)
    multi_caption: bool = Field(False, description="pick one of the sample json's `captions` per sample per "
                                "epoch (vlp shards build --caption-cols; LaCLIP)")
    hard_negatives: int = Field(0, ge=0, description="extra negative captions per image")
    hard_negatives_from_step: int = Field(
        0, ge=0, description="first step whose batches carry hard negatives (learn the easy facts first)"
    )


class ModelConfig(Section):
    name: str = "vlp-tiny"
    pretrained: str | None = Field(None, description="weights: a local file, or one of open_clip's pretrained tags "
                                   "for model.name (laion2b_s34b_b79k, openai, ...: fetched into the Hugging Face "
                                   "cache by open_clip; HF_HUB_OFFLINE=1 uses the cache only); a model.name "
                                   "hf-hub:ORG/REPO or local-dir:DIR brings its own")
    config_file: str | None = Field(None, description="your own open_clip model JSON (embed_dim, vision_cfg, "
                                    "text_cfg); the model takes the file's name (my-vit.json -> my-vit)")
    tokenizer: str | None = Field(None, description="a local Hugging Face tokenizer folder (tokenizer.json, ...) "
                                  "instead of open_clip's tokenizer for the model (never downloaded)")
    lock_image: bool = Field(False, description="freeze the image tower (LiT), but its last "
                             "lock_image_unlocked_groups layer groups")
    lock_image_unlocked_groups: int = Field(0, ge=0, description="with lock_image: the last N layer groups stay "
                                            "trainable (open_clip's grouping)")
    lock_image_freeze_bn_stats: bool = Field(True, description="with lock_image: the locked groups' BatchNorm "
                                             "statistics frozen too (open_clip_train's default: false)")
    lock_text: bool = Field(False, description="freeze the text tower, but its last lock_text_unlocked_layers layers")
    lock_text_unlocked_layers: int = Field(0, ge=0, description="with lock_text: the last N layers stay trainable")
    lock_text_freeze_layer_norm: bool = Field(True, description="with lock_text: the locked layers' LayerNorms "
                                              "frozen too (open_clip_train's default: false)")
    grad_checkpointing: bool = False
    patch_dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _named_after_config_file(cls, data: Any) -> Any:
        """model.config_file names the model; a different model.name beside it is a mistake."""
        if isinstance(data, dict) and data.get("config_file"):
            stem = Path(str(data["config_file"])).stem
            if data.get("name", stem) != stem:
                raise ValueError(f"model.name {data['name']!r} and model.config_file {data['config_file']} "
                                 f"disagree: the model is named after its file; set model.name={stem} or drop it")
            data = {**data, "name": stem}
        return data


class LossConfig(Section):
    kind: Literal["softmax", "sigmoid"] = "softmax"
    gather_with_grad: bool = True
    local_loss: bool = False
    sigmoid_chunked: bool = True
    init_logit_scale: float | None = Field(None, description="default: log(1/0.07) softmax, log(10) sigmoid")
    init_logit_bias: float | None = Field(None, description="default: -10 (sigmoid only)")
    max_logit_scale: float = Field(100.0, ge=1, allow_inf_nan=False, description="the logit scale exp(t) is kept "
                                   "at or below this: t is clamped to [0, log max] after each update (open_clip_train)")
    decoupled: bool = Field(False, description="drop the positive from the softmax denominator (DCL)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="softmax only: eps of each row's target spread "
                                   "over the batch (as F.cross_entropy's label_smoothing)")
    align_uniform: float = Field(0.0, ge=0, description="weight of the alignment + uniformity term")
    hard_negative_weight: float = Field(1.0, ge=0)
    hard_negative_mode: Literal["denominator", "pairwise"] = Field(
        "denominator",
        description="denominator: extra columns of the image->text softmax; pairwise: a separate term "
        "-log(e^pos / (e^pos + sum e^neg)) per image, times hard_negative_weight (Paiss et al. 2023)",
    )
    distill_model: str | None = Field(None, description="a frozen teacher (an open_clip model name, hf-hub:ORG/REPO "
                                      "or local-dir:DIR) whose softmax over the batch the student also learns "
                                      "(open_clip_train's --distill-model); same tokenizer and image input")
    distill_pretrained: str | None = Field(None, description="the teacher's weights: a local file or an open_clip "
                                           "tag (open_clip_train's --distill-pretrained)")
    distill_weight: float = Field(1.0, ge=0, description="weight of the distillation term")
    ema_teacher: float | None = Field(None, gt=0, lt=1, description="the teacher is an exponential moving average "
                                      "of the model itself with this decay per step (DeGLA's self-distillation, "
                                      "for fine-tuning; e.g. 0.999): checkpointed with the run")
    feature_distill_weight: float = Field(0.0, ge=0, description="with a teacher: weight of the mean squared "
                                          "distance between the student's and the teacher's embedding of each "
                                          "image and caption (DeGLA's global self-distillation)")
    text_grounded_weight: float = Field(0.0, ge=0, description="with a teacher and hard negatives: weight of the "
                                        "text-grounded contrast (DeGLA's TGC): each caption against the teacher's "
                                        "embedding of itself and its own negatives")
    text_grounded_scale: float = Field(10.0, gt=0, description="the text-grounded contrast's fixed logit scale")

    @model_validator(mode="after")
    def _smoothing_is_softmax(self) -> LossConfig:
        if self.label_smoothing and (self.kind != "softmax" or self.decoupled):
            raise ValueError("label_smoothing works with kind=softmax and decoupled=false only")
        if self.ema_teacher is not None and self.distill_model is not None:
            raise ValueError("loss.ema_teacher and loss.distill_model: one teacher at a time")
        if (self.feature_distill_weight or self.text_grounded_weight) and self.ema_teacher is None \
                and self.distill_model is None:
            raise ValueError("loss.feature_distill_weight and loss.text_grounded_weight need a teacher "
                             "(loss.ema_teacher or loss.distill_model)")
        return self


class OptimConfig(Section):
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1, description="default: open_clip_train's, by model name: 0.98 "
                                "for names with 'vit', else 0.999")
    eps: float | None = Field(None, gt=0, allow_inf_nan=False, description="default: open_clip_train's, by model "
                              "name: 1e-6 for names with 'vit', else 1e-8")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    min_lr: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _min_below_peak(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return self


class TokenDropConfig(Section):
    """A first phase with fewer tokens (FLIP's patch dropout, CLIPA's short text and small images), then full
    size to the end."""

    until: float = Field(0.0, ge=0, le=1, description="fraction of the steps in the first phase (0: none)")
    patch_dropout: float = Field(0.0, ge=0, lt=1, description="image patches dropped in the first phase (ViT towers)")
    text_length: int | None = Field(None, ge=2, description="token ids kept per caption in the first phase "
                                    "(cut, with the end-of-text token kept)")
    image_size: int | None = Field(None, ge=1, description="image side in the first phase (CLIPA's image resizing: "
                                   "whole images at a lower resolution, the position embeddings interpolated; ViT "
                                   "towers, a multiple of the patch size)")


class TrainConfig(Section):
    batch_size: int = Field(128, gt=0, description="contrastive batch per rank")
    micro_batch_size: int | None = Field(
        None, gt=0, description="chunk for gradient caching; None = the whole batch at once"
    )
    samples: int | None = Field(20_000, gt=0, description="length in samples seen (global)")
    epochs: int | None = Field(None, gt=0, description="length in epochs of the data plan (overrides samples; "
                               "an epoch: every sample of the shards once with data.split=exact, "
                               "data.samples_per_epoch with resampled)")
    steps: int | None = Field(None, gt=0, description="length in optimizer steps (overrides epochs and samples)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    deepspeed_config: str | None = Field(
        None, description="DeepSpeed JSON merged over the generated config (launch/ds_zero*.json)"
    )
    seed: int = 0
    output_dir: str = Field("runs/default", description="the run folder, or an object-storage URL (s3://...: "
                            "trained in a local mirror, copied up at each checkpoint)")
    checkpoint_every: int = Field(200, gt=0, description="steps between checkpoints")
    keep_last: int = Field(2, gt=0)
    resume: str | None = Field(None, description="'auto', a checkpoint path, or None")
    eval_every: int | None = Field(None, gt=0, description="steps between zero-shot evals")
    eval_suite: str | None = None
    log_keys: bool = Field(False, description="write every step's sample keys to metrics.jsonl")
    log_every: int = Field(1, gt=0, description="steps between metrics lines; the loss is read off the device "
                           "(a host-device sync) and a stop request (signal, stop file) honoured only on these "
                           "steps and on checkpoint steps")
    compile: bool = Field(False, description="torch.compile the model as DeepSpeed trains it (inductor, CPU or "
                          "GPU; both gradient-cache passes); compile time is logged as compile_s")
    direct_attention: Auto = Field("auto", description="open_clip's attention blocks call "
                                   "scaled_dot_product_attention on batch-first views of their q/k/v (same weights; "
                                   "nn.MultiheadAttention's layout copies skipped; is_causal for causal text towers); "
                                   "auto: on (exact for every open_clip block)")
    channels_last: Auto = Field("auto", description="image tower and images in channels-last memory format "
                                "(faster convolutions); auto: on for convolutional towers (ResNet, ConvNeXt) at ZeRO "
                                "stage 0")
    flush_denormal: Auto = Field("auto", description="flush denormal floats to zero (torch.set_flush_denormal): "
                                 "on a CPU, arithmetic on them is many times slower (white-background images "
                                 "produce them); auto: on when training on the CPU; values below 1e-38 become 0")
    token_drop: TokenDropConfig = Field(default_factory=TokenDropConfig)
    trim_text: Auto = Field("auto", description="cut each batch's token ids after its longest caption (rounded up "
                            "to 8): exact for causal text towers that pool at the end-of-text token, and the text "
                            "tower does only the work the captions need; auto: on where exact")
    report_to: Annotated[list[Literal["tensorboard", "wandb"]], BeforeValidator(_split_commas)] = Field(
        default_factory=list, description="where metrics go besides metrics.jsonl (always written), rank 0: "
        "tensorboard, wandb (a,b; pip install 'vlp[tensorboard]' / 'vlp[wandb]')")
    wandb_project: str = Field("vlp", description="wandb project (wandb's mode from $WANDB_MODE, e.g. offline)")
    run_name: str | None = Field(None, description="the wandb run's name; default: the output folder's name")

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates checkpoints as it trains (both eval keys set)."""
        return bool(self.eval_every and self.eval_suite)

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
    """The cluster `vlp launch` starts this machine's part of (or, with --dry-run, prints every node's command for)."""

    launcher: Literal["torchrun", "deepspeed", "slurm", "accelerate"] = "torchrun"
    nodes: int = Field(1, gt=0)
    procs_per_node: int = Field(1, gt=0)
    node_rank: int = Field(0, ge=0, description="this machine's node number, 0 on the master (not for slurm)")
    master_addr: str = "127.0.0.1"
    master_port: int = Field(29500, gt=0, lt=65536)
    hostfile: str | None = Field(None, description="DeepSpeed hostfile ('host slots=N' per line), checked against "
                                                  "nodes and procs_per_node before anything starts")
    hosts: CommaList = Field(default_factory=list, description="the machines in node order, for DeepSpeed: vlp "
                             "writes logs/hostfile from them (under SLURM they come from the allocation)")
    partition: str | None = Field(None, description="SLURM: sbatch --partition")
    account: str | None = Field(None, description="SLURM: sbatch --account")
    time: str | None = Field(None, description="SLURM: sbatch --time (e.g. 24:00:00; the script's own default)")
    cpus_per_task: int | None = Field(None, gt=0, description="SLURM: sbatch --cpus-per-task")
    env_setup: str | None = Field(None, description="a shell line run first on every node before vlp, e.g. "
                                  "`source /path/to/venv/bin/activate` or `module load cuda` (SLURM: in the job)")

    @model_validator(mode="after")
    def _node_in_cluster(self) -> LaunchConfig:
        if self.node_rank >= self.nodes:
            raise ValueError(f"launch.node_rank ({self.node_rank}) must be < launch.nodes ({self.nodes})")
        return self


class DemoConfig(Section):
    """What `vlp demo` generates and evaluates around the training run."""

    pairs: int = Field(50_000, gt=0, description="synthetic training pairs")
    seed: int = 0
    image_size: int = Field(64, ge=16)
    shard_size: int = Field(2000, gt=0)
    data_dir: str = "data/demo"
    eval_suite: str = "default"


class RunConfig(Section):
    """`vlp train`: everything one training run uses."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class DemoRunConfig(RunConfig):
    """`vlp demo`: a training run plus the data it makes and the suite it evaluates on."""

    demo: DemoConfig = Field(default_factory=DemoConfig)


class LaunchRunConfig(RunConfig):
    """`vlp launch`: a training run plus the cluster it runs on."""

    launch: LaunchConfig = Field(default_factory=LaunchConfig)


# Sections a run file may carry for a sibling command (validated, then ignored).
SIBLING_SECTIONS: dict[str, type[Section]] = {"demo": DemoConfig, "launch": LaunchConfig}


class ShardsBuildConfig(Section):
    """`vlp shards build`: raw image/text pairs -> webdataset shards (flags follow img2dataset's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[str] = Field(default_factory=list, **positional(
        "CSV/TSV/Parquet/JSONL files (optionally .gz) or image folders"))
    output: str = Field("", description="output folder for the shards (required)")
    url_col: str = Field("url", description="column holding the image path or URL")
    caption_col: str = Field("caption", description="column holding the caption")
    keep_cols: CommaList = Field(default_factory=list, description="extra columns copied into each sample's json (a,b)")
    caption_cols: CommaList = Field(default_factory=list, description="more captions of the same image: columns "
                                    "holding a caption or a JSON list of captions (a,b); the sample json gets "
                                    "`captions`, the main caption first, for data.multi_caption (LaCLIP)")
    count_counterfactuals: bool = Field(False, description="captions that state a count (two..ten, 2..10) get "
                                        "the same caption with each other count as hard negatives (sample json "
                                        "`hard_negatives: {count: [...]}`), for data.hard_negatives; the manifest "
                                        "counts captions with and without a count")
    compositional_negatives: bool = Field(False, description="captions that bind attributes or relate two "
                                          "objects get rule-made false variants (attributes of one kind traded, "
                                          "the relation reversed, the objects traded) as hard negatives "
                                          "(`hard_negatives: {attribute_swap, relation_swap}`); the manifest "
                                          "counts captions with and without")
    image_size: int = Field(256, gt=0, description="target side in pixels")
    resize_mode: Literal["no", "border", "keep_ratio", "center_crop"] = Field(
        "border", description="border: pad to a square; keep_ratio: shorter side; center_crop; no")
    resize_only_if_bigger: bool = Field(False, description="never upscale")
    resize_filter: Literal["lanczos", "bicubic", "bilinear", "box"] = Field(
        "lanczos", description="resampling filter: lanczos (sharpest), bicubic, bilinear, or box (area averaging, "
                               "what img2dataset's cv2.INTER_AREA does when shrinking; the fastest)")
    encode_format: Literal["jpg", "webp", "png"] = Field("jpg", description="image format in the tar")
    encode_quality: int = Field(95, ge=1, le=100, description="jpg/webp quality")
    min_image_size: int = Field(0, ge=0, description="reject images whose smaller side is below this")
    max_aspect_ratio: float = Field(0.0, ge=0, description="reject images with longer/shorter above this "
                                    "(0: no limit; else at least 1)")
    max_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb limit (width x height)")
    caption_max_chars: int = Field(512, gt=0, description="captions are cut (at a word) to this length")
    caption_reject_chars: int = Field(10_000, gt=0, description="captions longer than this are rejected")
    dedup: bool = Field(True, description="write exact duplicate images (same sha256) once")
    shard_size: int = Field(10_000, gt=0, description="input rows per shard")
    workers: int = Field(default_factory=cpu_cores, ge=0, description="worker processes (0: in-process; default: all cores)")
    threads: int = Field(16, ge=1, description="concurrent fetches per worker")
    pin_workers: bool = Field(True, description="with one worker per core this build may use (the default), "
                              "each worker on a core of its own (with --engine ray: on nodes offering Ray every core)")
    host_concurrency: int = Field(16, ge=1, description="requests to one host at once, over all workers (each "
                                  "worker gets its share, at least 1)")
    host_rate: float = Field(0.0, ge=0, description="request starts per second to one host, over all workers "
                             "(0: no limit)")
    max_retry_after: float = Field(60.0, gt=0, description="a 429/503 Retry-After pauses its host (not the "
                                   "build) for at most this many seconds; the row is tried again")
    engine: Literal["local", "ray"] = Field(
        "local", description="local: a process pool on this machine; ray: tasks on a Ray cluster (same output)")
    ray_address: str | None = Field(
        None, description="Ray cluster to use with --engine ray (HEAD:PORT; default: $RAY_ADDRESS, "
        "else a Ray instance on this machine with --workers CPUs)")
    timeout: float = Field(10.0, gt=0, description="per-request timeout, seconds")
    retries: int = Field(2, ge=0, description="retries for transient http errors")
    max_bytes: int = Field(50_000_000, gt=0, description="largest image file accepted, bytes")
    disallowed_header_directives: CommaList = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out (failure reason opt_out); [] respects none")
    user_agent_token: str | None = Field(None, description="a name added to vlp's User-Agent; X-Robots-Tag "
                                         "directives for it (`name: noai`) apply too")
    overwrite: bool = Field(False, description="delete an existing build in the output folder and start over")
    append: bool = Field(False, description="add these inputs' rows to the finished build in --output as new "
                         "shards (same options; finished shards are not rewritten; rerun to resume)")
    quiet: bool = Field(False, description="no progress bar")

    @model_validator(mode="after")
    def _caption_limits(self) -> ShardsBuildConfig:
        if self.caption_reject_chars < self.caption_max_chars:
            raise ValueError("caption_reject_chars must be >= caption_max_chars")
        if 0 < self.max_aspect_ratio < 1:
            raise ValueError("max_aspect_ratio is 0 (no limit) or at least 1")
        return self


class SynthConfig(Section):
    """`vlp shards synth`: synthetic shape/caption pairs (the embedded default's data)."""

    out: str = Field("", description="output folder for pairs.csv and images/ (required)")
    n: int = Field(10_000, ge=0, description="number of pairs")
    seed: int = Field(0, description="data set seed (each item has its own RNG from (seed, index))")
    image_size: int = Field(64, ge=16, description="image side in pixels")
    workers: int = Field(default_factory=cpu_cores, ge=0, description="worker processes (default: all cores)")


class InspectConfig(Section):
    """`vlp shards inspect`: counts, failure reasons, histograms and sample captions of a shard folder."""

    dir: str = Field("", **positional("a shard folder (with manifest.json)"))
    samples: int = Field(5, ge=0, description="sample captions to show")


class ShardsRetryConfig(Section):
    """`vlp shards retry`: fetch again the rows of a finished build that failed for a passing reason, into new shards."""

    output: str = Field("", **positional("a finished `vlp shards build` output folder or URL"))
    reasons: CommaList = Field(
        default_factory=lambda: ["timeout", "connection_error", "connection_refused", "http_429", "http_5xx",
                                 "storage_error"],
        description="failure reasons to retry (http_5xx: every 5xx); never missing files, 404s, opt-outs or "
                    "decode errors, which another try does not change")
    timeout: float | None = Field(None, gt=0, description="per-request timeout, seconds (default: the build's)")
    retries: int | None = Field(None, ge=0, description="retries for transient http errors (default: the build's)")
    workers: int = Field(default_factory=cpu_cores, ge=0, description="worker processes (0: in-process)")
    threads: int = Field(16, ge=1, description="concurrent fetches per worker")
    host_concurrency: int = Field(16, ge=1, description="requests to one host at once, over all workers")
    host_rate: float = Field(0.0, ge=0, description="request starts per second to one host (0: no limit)")
    max_retry_after: float = Field(60.0, gt=0, description="longest Retry-After pause honoured, seconds")
    engine: Literal["local", "ray"] = Field("local", description="local: a process pool; ray: tasks on a Ray cluster")
    ray_address: str | None = Field(None, description="Ray cluster to use with --engine ray (HEAD:PORT)")
    quiet: bool = Field(False, description="no progress bar")


class VerifyConfig(Section):
    """`vlp shards verify`: read every sample back with webdataset and check it against the manifest."""

    dir: str = Field("", **positional("a shard folder (with manifest.json)"))
    quiet: bool = Field(False, description="no progress bar")


class IndexConfig(Section):
    """`vlp shards index`: write manifest.json for webdataset shards another tool wrote (img2dataset, bare tars)."""

    dir: str = Field("", **positional("a folder or URL prefix (s3://...) of .tar shards (img2dataset's output: with .parquet and "
                                        "_stats.json)"))
    overwrite: bool = Field(False, description="replace an existing manifest.json")


class EmbedConfig(Section):
    """`vlp shards embed`: image and text embeddings and the CLIP score of every sample, for curation."""

    shards: list[str] = Field(default_factory=list, **positional(
        "shard folders, URL prefixes or brace specs (as data.sources.N.shards)"))
    out: str = Field("", description="output folder: img_emb/, text_emb/, metadata/, embed.json (required)")
    model: str = Field("", description="a run or checkpoint folder, an exported .safetensors, or an open_clip name "
                                       "with --weights (required)")
    weights: str | None = Field(None, description="weights file for an open_clip model name")
    random_init: bool = Field(False, description="an untrained model (tests and smoke runs only)")
    batch_size: int = Field(256, gt=0, description="images per forward pass")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: this rank's GPU when there is one)")
    workers: int = Field(4, ge=1, description="threads decoding and preprocessing images")
    quiet: bool = Field(False, description="no progress bar")


class MineBatchesConfig(Section):
    """`vlp shards mine-batches`: B3 batch mining, communities of mutually hard samples from a teacher's embeddings."""

    shards: list[str] = Field(default_factory=list, **positional(
        "shard folders, URL prefixes or brace specs: the set embedded by `vlp shards embed`, in the same order"))
    embeddings: str = Field("", description="the `vlp shards embed` output of these shards (the teacher; required)")
    out: str = Field("", description="the plan file to write, e.g. shards/batch_plan.npz (required); train with "
                                     "data.batch_plan=FILE")
    cluster_size: int = Field(32, ge=2, description="most samples in one community (batches are made of whole "
                                                    "communities)")
    skip_nearest: int = Field(10, ge=0, description="each image's nearest captions left out of its edges (likely "
                                                    "false negatives)")
    neighbors: int = Field(20, ge=1, description="each image's next-nearest captions linked to it")
    seed: int = Field(0, description="Leiden's seed")
    quiet: bool = Field(False, description="no progress output")


COPY_DISTANCE = 6.0  # thumbnails' mean grey-level difference that still counts as a copy (measured: docs' results)


class CurateConfig(Section):
    """`vlp shards curate`: new shards with only the samples that pass the filters, and removed.jsonl."""

    shards: list[str] = Field(default_factory=list, **positional(
        "shard folders, URL prefixes or brace specs: the set embedded by `vlp shards embed`, in the same order"))
    output: str = Field("", description="output folder or URL for the curated shards (required)")
    embeddings: str | None = Field(None, description="the `vlp shards embed` output of these shards (needed by "
                                                     "the CLIP-score, semantic-dedup and decontamination filters)")
    min_words: int = Field(0, ge=0, description="caption filter: fewer words are removed (caption_too_short)")
    min_chars: int = Field(0, ge=0, description="caption filter: fewer characters are removed (caption_too_short)")
    max_chars: int = Field(0, ge=0, description="caption filter: more characters are removed (0: no limit)")
    languages: CommaList = Field(default_factory=list, description="caption filter: keep these languages only "
                                 "(ISO 639-1, e.g. en,de; detected with langdetect; [] = any)")
    language_min_words: int = Field(4, ge=1, description="languages filter: shorter captions are not judged "
                                                         "(kept): detectors misjudge a few words")
    language_min_confidence: float = Field(0.9, ge=0, le=1, description="languages filter: a caption is removed "
                                           "only when the detector is at least this sure")
    min_image_size: int = Field(0, ge=0, description="image filter: a smaller side is removed (image_too_small)")
    max_aspect_ratio: float = Field(0.0, ge=0, description="image filter: a larger long/short side ratio is "
                                                           "removed (0: no limit)")
    dedup: bool = Field(True, description="remove exact duplicate images (same bytes) across all the shard sets, "
                                          "keeping the first in shard order")
    min_clip_score: float | None = Field(None, description="CLIP-score filter: remove pairs whose image-text "
                                                           "cosine is below this (LAION-400M used 0.28 with ViT-B/32)")
    clip_score_top: float | None = Field(None, gt=0, le=1, description="CLIP-score filter: keep this fraction of "
                                         "the pairs left, the highest scores (DataComp's baseline: 0.3)")
    decontaminate_suite: str | None = Field(None, description="eval decontamination: remove training images "
                                            "that are near-duplicates of an image of this eval suite (a name "
                                            "like `default`, or a suite file)")
    decontaminate_threshold: float = Field(0.9, gt=0, le=1, description="eval decontamination: the cosine "
                                           "(image embeddings) at which a training image matches an eval image")
    decontaminate_hash_distance: int | None = Field(None, ge=0, le=63, description="eval decontamination: also "
                                                    "require the perceptual hashes within this many bits (e.g. 4): for "
                                                    "a model that embeds alike pictures as closely as copies")
    decontaminate_copy_distance: float | None = Field(COPY_DISTANCE, ge=0, le=255, description="eval "
                                                      "decontamination: also require the images' 16x16 thumbnails "
                                                      "within this mean difference in grey levels (copies, re-encodes, "
                                                      "resizes and small crops are; null: embeddings alone decide)")
    semdedup_threshold: float | None = Field(None, gt=0, le=1, description="semantic dedup: remove an image whose "
                                             "cosine to a kept image of its cluster is at least this (e.g. 0.95)")
    semdedup_hash_distance: int | None = Field(None, ge=0, le=63, description="semantic dedup: also require the "
                                               "perceptual hashes within this many bits (near-copies only)")
    semdedup_copy_distance: float | None = Field(None, ge=0, le=255, description="semantic dedup: also require "
                                                 "the images' thumbnails within this mean difference in grey levels "
                                                 "(near-copies only, flat drawings included; e.g. the decontamination "
                                                 "default)")
    semdedup_caption_threshold: float | None = Field(None, gt=0, le=1, description="semantic dedup: keep a "
                                                     "near-duplicate image whose caption says something else: "
                                                     "caption cosine (text embeddings) to the kept one's below "
                                                     "this (e.g. 0.9); off: images alone decide")
    semdedup_same_caption: bool = Field(False, description="semantic dedup: also require the two captions to have "
                                        "the same words (case folded, punctuation dropped): a copy that repeats its "
                                        "alt text goes, a variant named otherwise stays, whatever the model")
    metadata: str | None = Field(None, description="MetaCLIP balancing: a text file of metadata entries, one per "
                                 "line; a pair is matched by the entries its caption contains (whole words, as "
                                 "MetaCLIP); unmatched pairs are removed (no_metadata_entry), and an entry matched more "
                                 "than metadata_cap times keeps a random metadata_cap of them (metadata_balance)")
    metadata_cap: int = Field(20_000, gt=0, description="MetaCLIP's t: pairs kept per metadata entry (20k at 400M)")
    metadata_seed: int = Field(0, description="MetaCLIP balancing's draws (deterministic from seed and sample key)")
    metadata_case_sensitive: bool = Field(False, description="match metadata entries in their own case, as "
                                          "MetaCLIP does (default: any case)")
    semdedup_clusters: int = Field(0, ge=0, description="k-means clusters for semantic dedup (0: about one per "
                                                        "1,000 samples)")
    engine: Literal["local", "ray"] = Field("local", description="where semantic dedup's cluster buckets are "
                                            "deduplicated: here, or as tasks on a Ray cluster (same decisions)")
    ray_address: str | None = Field(None, description="Ray cluster for --engine ray (HEAD:PORT; default: "
                                    "$RAY_ADDRESS, else a Ray instance on this machine with --workers CPUs)")
    workers: int = Field(default_factory=cpu_cores, ge=1, description="CPUs of the Ray instance --engine ray "
                         "starts here")
    shard_size: int = Field(10_000, gt=0, description="samples per output shard")
    overwrite: bool = Field(False, description="replace an existing curated folder")
    quiet: bool = Field(False, description="no progress bar")

    @model_validator(mode="after")
    def _one_clip_rule(self) -> CurateConfig:
        if self.min_clip_score is not None and self.clip_score_top is not None:
            raise ValueError("give min_clip_score or clip_score_top, not both")
        return self


class EvalConfig(Section):
    """`vlp eval`: one model on a suite -> report.json + report.html."""

    model: str = Field("", description="open_clip model name, hf-hub:ORG/REPO, local-dir:DIR, exported .safetensors, "
                       "checkpoint or run folder (required)")
    weights: str | None = Field(None, description="for a model given by name: a local weights file or one of "
                                "open_clip's pretrained tags")
    pretrained: str | None = Field(None, description="the same as --weights (open_clip's and CLIP_benchmark's name)")
    random_init: bool = Field(False, description="allow a model given by name to run untrained")
    suite: str = Field("default", description="suite YAML, or a shipped suite name")
    out: str = Field("", description="output folder for report.json, report.html, skipped.jsonl (required)")
    cache_dir: str | None = Field(None, description="where synthetic sets are written (default: $VLP_CACHE_DIR or ~/.cache/vlp/eval)")
    only: CommaList | None = Field(None, description="task names to run from the suite (a,b)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast on a GPU")
    batch_size: int = Field(256, gt=0, description="images or texts encoded at once")
    workers: int = Field(4, ge=1, description="threads loading and preprocessing images")
    seed: int = Field(0, description="seed for --random-init")
    quiet: bool = Field(False, description="no progress bars")

    @model_validator(mode="after")
    def _pretrained_is_weights(self) -> EvalConfig:
        if self.pretrained is not None:
            if self.weights is not None and self.weights != self.pretrained:
                raise ValueError("give --weights or --pretrained (the same thing), not both")
            object.__setattr__(self, "weights", self.pretrained)
        return self


class CompareConfig(Section):
    """`vlp eval compare`: two reports side by side with deltas -> compare.html."""

    reports: list[str] = Field(default_factory=list, **positional("two report.json files (or folders holding one)"))
    out: str | None = Field(None, description="folder for compare.html (default: the working directory)")

    @model_validator(mode="after")
    def _two(self) -> CompareConfig:
        if len(self.reports) != 2:
            raise ValueError(f"give exactly two reports, got {len(self.reports)}")
        return self


class ExportConfig(Section):
    """`vlp export`: a run's trained weights as open_clip loads them: a safetensors file or a local-dir: folder."""

    checkpoint: str = Field("", **positional("a checkpoint folder, a run folder (its newest checkpoint) or a .safetensors"))
    out: str = Field("", description="output .safetensors path, or folder for open_clip-dir (required)")
    format: Literal["safetensors", "open_clip-dir"] = Field(
        "safetensors", description="open_clip-dir: open_clip_config.json + weights, for create_model('local-dir:OUT')")
    tokenizer: str | None = Field(None, description="a local Hugging Face tokenizer folder copied into an open_clip-dir "
                                  "(models trained with model.tokenizer)")


# What `vlp config show NAME` prints.
COMMAND_SCHEMAS: dict[str, type[Section]] = {
    "train": RunConfig,
    "demo": DemoRunConfig,
    "launch": LaunchRunConfig,
    "shards": ShardsBuildConfig,
    "synth": SynthConfig,
    "embed": EmbedConfig,
    "curate": CurateConfig,
    "mine-batches": MineBatchesConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
}


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


def _set_dotted(tree: dict, path: list[str], value: Any, text: str, defaults: Any = None) -> None:
    """Set tree[a][b]... = value. A number names an item of a list (`data.sources.0.shards=...`, the form
    vlp's own errors print): the list comes from the tree, else from the schema's defaults."""
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        defaults = _child(defaults, part)
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config key '{'.'.join(path[: i + 1])}': no item {part} in a list of "
                                  f"{len(node)} (override {text!r})")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and index not in node:
                default = defaults if isinstance(defaults, list) else {}
                node[index] = [dict(d) if isinstance(d, dict) else d for d in default] if isinstance(default, list) \
                    else {}
        else:
            raise ConfigError(f"config key '{'.'.join(path[:i])}' is not a section (override {text!r})")
        if last:
            node[index] = value
        else:
            node = node[index]


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


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


def validate_tree(tree: dict, model: type[S]) -> S:
    """`tree` validated against `model`; sibling run-file sections are checked, then dropped."""
    if issubclass(model, RunConfig):
        tree = dict(tree)
        for name, section in SIBLING_SECTIONS.items():
            if name in tree and name not in model.model_fields:
                _validate(section, tree.pop(name) or {}, prefix=name)
    return _validate(model, tree)


def _validate(model: type[S], tree: Any, prefix: str = "") -> S:
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        message = _format_error(err, model)
        if prefix:
            message = message.replace("key '", f"key '{prefix}.", 1)
        if model is RunConfig or issubclass(model, RunConfig):
            extra = sorted(set(model.model_fields) | set(SIBLING_SECTIONS))
            message = re.sub(r"unknown config key '([^'.]+)' \(allowed: [^)]*\)",
                             lambda m: f"unknown config key '{m.group(1)}' (allowed: {', '.join(extra)})", message)
        raise ConfigError(message) from None


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping ({} for an empty file), or a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = read_small(path, "config file", 16 << 20).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of keys")
    return loaded or {}


def load(
    model: type[S], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> S:
    """Defaults <- YAML file <- `key=value` overrides <- explicit flags, validated (one-line ConfigError).

    `path` may name a shipped preset (`configs/demo.yaml`, or just `demo`; see vlp.core.shipped).
    """
    if path is not None:
        path = resolve(path)
    tree = read_yaml(path) if path is not None else {}
    if path is not None and not tree:
        print(f"vlp: warning: config file {path} is empty; using the defaults", file=sys.stderr)
    defaults = model.model_construct().model_dump(mode="json") if overrides else None  # lists to index into
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value, text, defaults)
    for key, value in (flags or {}).items():
        _set_dotted(tree, key.split("."), value, key)
    return validate_tree(tree, model)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), model: type[S] = RunConfig
) -> S:
    """A run file (`vlp train`'s schema unless another is named): defaults <- YAML <- overrides."""
    return load(model, path, overrides)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (stored in checkpoints and run folders)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
