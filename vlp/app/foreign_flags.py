"""Other tools' flags, as their users type them, mapped to vlp's keys: one table per tool.

`vlp train` (and `vlp launch`, `vlp demo`) accept open_clip_train's flags, `vlp shards build`
img2dataset's: each one with a vlp counterpart becomes that key's override and the command
prints which (`vlp: --lr is open_clip_train's flag: optim.lr=0.001`), so the user learns vlp's
spelling; a flag with none stops with one line naming what to use instead. The tables are
also the docs' "Coming from open_clip_train / img2dataset" page (generated), so they cannot
drift apart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from vlp.core.errors import UserError


@dataclass(frozen=True)
class Flag:
    flag: str  # the other tool's spelling
    key: str | None  # the vlp key it sets ("": a positional word; ".": checked, nothing to set; "=": vlp's
    # own flag of the same name and meaning, passed on as typed; None: no counterpart, `note` says what to do)
    value: Callable[[str], str] | None = None  # the tool's value -> vlp's (None: as typed)
    switch: bool = False  # takes no value (store_true)
    note: str = ""


def _sources(value: str) -> str:
    return f"[{{shards: '{value}'}}]"


PRECISION = {"fp32": "fp32", "amp_bf16": "bf16", "bf16": "bf16", "pure_bf16": "bf16", "amp": "fp16", "fp16": "fp16",
             "pure_fp16": "fp16"}

FLAGS = (
    Flag("--train-data", "data.sources", _sources, note="a brace spec, folder or URL prefix; several: list "
         "data.sources in a config file, each with a weight"),
    Flag("--train-data-upsampling-factors", None, note="give each of data.sources a weight (data.split=resampled)"),
    Flag("--train-num-samples", "data.samples_per_epoch", note="with data.split=resampled; with the default "
         "exact split an epoch is every sample of the shards' manifests"),
    Flag("--dataset-type", None, note="vlp reads webdataset shards (vlp shards build makes them from CSV, Parquet "
         "and the like; vlp shards index takes someone else's)"),
    Flag("--dataset-resampled", "data.split", lambda _v: "resampled", switch=True),
    Flag("--batch-size", "train.batch_size"),
    Flag("--epochs", "train.epochs"),
    Flag("--lr", "optim.lr"),
    Flag("--wd", "optim.weight_decay"),
    Flag("--beta1", "optim.beta1"),
    Flag("--beta2", "optim.beta2"),
    Flag("--eps", "optim.eps"),
    Flag("--warmup", "optim.warmup_steps"),
    Flag("--lr-scheduler", "optim.schedule", lambda v: {"const": "constant"}.get(v, v),
         note="cosine or const; const-cooldown has no counterpart"),
    Flag("--grad-clip-norm", "optim.grad_clip"),
    Flag("--model", "model.name"),
    Flag("--pretrained", "model.pretrained"),
    Flag("--precision", "train.precision", lambda v: PRECISION.get(v, v), note="amp_bf16 -> bf16, amp -> fp16"),
    Flag("--workers", "data.workers"),
    Flag("--seed", "train.seed"),
    Flag("--logs", None, note="vlp writes one run folder: train.output_dir=LOGS/NAME"),
    Flag("--name", None, note="vlp writes one run folder: train.output_dir=LOGS/NAME"),
    Flag("--save-frequency", None, note="vlp checkpoints by steps: train.checkpoint_every=N"),
    Flag("--resume", "train.resume", lambda v: "auto" if v == "latest" else v, note="latest -> auto"),
    Flag("--local-loss", "loss.local_loss", lambda _v: "true", switch=True),
    Flag("--gather-with-grad", "loss.gather_with_grad", lambda _v: "true", switch=True),
    Flag("--siglip", "loss.kind", lambda _v: "sigmoid", switch=True),
    Flag("--grad-checkpointing", "model.grad_checkpointing", lambda _v: "true", switch=True),
    Flag("--lock-image", "model.lock_image", lambda _v: "true", switch=True),
    Flag("--lock-text", "model.lock_text", lambda _v: "true", switch=True),
    Flag("--lock-image-unlocked-groups", "model.lock_image_unlocked_groups"),
    Flag("--lock-image-freeze-bn-stats", "model.lock_image_freeze_bn_stats", lambda _v: "true", switch=True,
         note="vlp's default is true: a locked tower's BatchNorm statistics are frozen unless this is false"),
    Flag("--lock-text-unlocked-layers", "model.lock_text_unlocked_layers"),
    Flag("--lock-text-freeze-layer-norm", "model.lock_text_freeze_layer_norm", lambda _v: "true", switch=True,
         note="vlp's default is true: a locked tower's LayerNorms are frozen unless this is false"),
    Flag("--force-patch-dropout", "model.patch_dropout"),
    Flag("--distill-model", "loss.distill_model"),
    Flag("--distill-pretrained", "loss.distill_pretrained"),
    Flag("--torchcompile", "train.compile", lambda _v: "true", switch=True),
    Flag("--report-to", "train.report_to", lambda v: v.replace("all", "tensorboard,wandb")),
    Flag("--wandb-project-name", "train.wandb_project"),
    Flag("--log-every-n-steps", "train.log_every"),
    Flag("--accum-freq", None, note="vlp's large batch is exact gradient caching: train.batch_size=B*N "
         "train.micro_batch_size=B"),
    Flag("--val-data", None, note="give the validation shards as a retrieval task of an eval suite (dataset "
         "format wds; loss_batch_size: B adds its clip_val_loss): train.eval_suite=FILE train.eval_every=N"),
    Flag("--zeroshot-frequency", None, note="train.eval_every=N steps with train.eval_suite=FILE"),
    Flag("--imagenet-val", None, note="a zeroshot_classification task in an eval suite (train.eval_suite)"),
    Flag("--dist-backend", None, note="vlp picks nccl with GPUs and gloo without"),
    Flag("--dist-url", None, note="the launcher sets it: vlp launch, torchrun, srun, deepspeed"),
    Flag("--device", None, note="vlp uses the GPUs when there are any, else the CPU"),
    Flag("--ddp-static-graph", None, note="vlp trains under DeepSpeed, not DDP"),
)


def _python_list(value: str) -> str:
    """img2dataset's `['a','b']` (a Python list in a string) -> `a,b`."""
    return ",".join(v.strip().strip("'\"") for v in value.strip("[]").split(",") if v.strip().strip("'\""))


def _only(expected: str, what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value != expected:
            raise UserError(f"{what} {value}: vlp writes {expected} only")
        return value
    return check


IMG2DATASET = (
    Flag("--url_list", "", note="an input file or a folder of them (parquet, CSV, TSV, JSONL; also .gz)"),
    Flag("--output_folder", "output"),
    Flag("--input_format", None, note="vlp reads the format from each input's suffix: drop the flag"),
    Flag("--output_format", ".", _only("webdataset", "--output_format"),
         note="webdataset only (vlp's shards are img2dataset's webdataset layout)"),
    Flag("--url_col", "url_col"),
    Flag("--caption_col", "caption_col"),
    Flag("--save_additional_columns", "keep_cols", _python_list),
    Flag("--image_size", "image_size"),
    Flag("--resize_mode", "resize_mode", note="no, border, keep_ratio, center_crop (keep_ratio_largest: none)"),
    Flag("--resize_only_if_bigger", "resize_only_if_bigger"),
    Flag("--encode_format", "encode_format"),
    Flag("--encode_quality", "encode_quality"),
    Flag("--min_image_size", "min_image_size"),
    Flag("--max_aspect_ratio", "max_aspect_ratio"),
    Flag("--max_image_area", "max_pixels"),
    Flag("--number_sample_per_shard", "shard_size"),
    Flag("--processes_count", "workers"),
    Flag("--thread_count", "threads"),
    Flag("--timeout", "=", note="the same flag (seconds per request, total, finite)"),
    Flag("--retries", "=", note="the same flag"),
    Flag("--distributor", "engine", lambda v: {"multiprocessing": "local", "ray": "ray"}.get(v, v),
         note="multiprocessing -> local, ray -> ray (pyspark: none)"),
    Flag("--incremental_mode", None, note="vlp resumes a build in the same --output by itself; --overwrite starts "
         "over"),
    Flag("--enable_wandb", None, note="vlp prints its progress and writes manifest.json and failures.jsonl"),
    Flag("--disallowed_header_directives", "disallowed_header_directives", _python_list),
    Flag("--user_agent_token", "user_agent_token"),
)
TABLES = {"train": ("open_clip_train", FLAGS), "launch": ("open_clip_train", FLAGS), "demo": ("open_clip_train", FLAGS),
          "build": ("img2dataset", IMG2DATASET)}


def translate(argv: list[str], command: str = "train") -> tuple[list[str], list[str]]:
    """(argv without the other tool's flags, the `key=value` overrides and positional words they stand for).
    A flag that has no vlp counterpart is a UserError naming what to use instead; each translation is printed."""
    tool, table = TABLES[command]
    by_flag = {f.flag: f for f in table}
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, inline = word.partition("=")
        spec = by_flag.get(name) if word.startswith("--") else None
        if spec is None or spec.key == "=":
            rest.append(word)
            i += 1
            continue
        if spec.switch:
            raw, i = "", i + 1
        elif eq:
            raw, i = inline, i + 1
        elif i + 1 < len(argv):
            raw, i = argv[i + 1], i + 2
        else:
            raise UserError(f"{name}: {tool}'s flag needs a value")
        if spec.key is None:
            raise UserError(f"{name} is {tool}'s flag, with no vlp counterpart: {spec.note}")
        value = spec.value(raw) if spec.value else raw
        if spec.key == ".":  # what vlp does anyway
            continue
        override = f"{spec.key}={value}" if spec.key else value
        print(f"vlp: {name} is {tool}'s flag: {override}", file=sys.stderr)
        overrides.append(override)
    return rest, overrides


def mapping_table(flags: tuple[Flag, ...] = FLAGS, tool: str = "open_clip_train") -> str:
    """The docs' table: every flag, its vlp key and what to know."""
    lines = [f"| {tool} | vlp | note |", "|---|---|---|"]
    for f in flags:
        key = {"": "the input (positional)", ".": "(what vlp does)", "=": f"`{f.flag}`", None: "-"}.get(f.key, f"`{f.key}`")
        lines.append(f"| `{f.flag}` | {key} | {f.note.replace('|', '/')} |")
    return "\n".join(lines)
