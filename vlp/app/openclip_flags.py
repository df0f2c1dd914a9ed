"""open_clip_train's flags, as its users type them, mapped to vlp's keys: one table.

`vlp train` (and `vlp launch`, `vlp demo`) accept open_clip_train's flags: each one with a vlp
key becomes that key's override and the command prints which (`vlp: --lr is open_clip_train's
flag: optim.lr=0.001`), so the user learns vlp's spelling; a flag with no vlp counterpart stops
with one line naming what to use instead. The table is also the docs' "Coming from
open_clip_train" page (generated), so the two cannot drift apart.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from vlp.core.errors import UserError


@dataclass(frozen=True)
class Flag:
    flag: str  # open_clip_train's spelling
    key: str | None  # the vlp key it sets (None: no counterpart; `note` says what to do)
    value: Callable[[str], str] | None = None  # open_clip_train's value -> vlp's (None: as typed)
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
    Flag("--force-patch-dropout", "model.patch_dropout"),
    Flag("--torchcompile", "train.compile", lambda _v: "true", switch=True),
    Flag("--report-to", "train.report_to", lambda v: v.replace("all", "tensorboard,wandb")),
    Flag("--wandb-project-name", "train.wandb_project"),
    Flag("--log-every-n-steps", "train.log_every"),
    Flag("--accum-freq", None, note="vlp's large batch is exact gradient caching: train.batch_size=B*N "
         "train.micro_batch_size=B"),
    Flag("--val-data", None, note="give the validation pairs as an eval suite task: train.eval_suite=FILE "
         "train.eval_every=N"),
    Flag("--zeroshot-frequency", None, note="train.eval_every=N steps with train.eval_suite=FILE"),
    Flag("--imagenet-val", None, note="a zeroshot_classification task in an eval suite (train.eval_suite)"),
    Flag("--dist-backend", None, note="vlp picks nccl with GPUs and gloo without"),
    Flag("--dist-url", None, note="the launcher sets it: vlp launch, torchrun, srun, deepspeed"),
    Flag("--device", None, note="vlp uses the GPUs when there are any, else the CPU"),
    Flag("--ddp-static-graph", None, note="vlp trains under DeepSpeed, not DDP"),
)
BY_FLAG = {f.flag: f for f in FLAGS}


def translate(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without open_clip_train's flags, the `key=value` overrides they stand for). A flag that has no
    vlp counterpart is a UserError naming what to use instead; each translation is printed."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, inline = word.partition("=")
        spec = BY_FLAG.get(name) if word.startswith("--") else None
        if spec is None:
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
            raise UserError(f"{name}: open_clip_train's flag needs a value")
        if spec.key is None:
            raise UserError(f"{name} is open_clip_train's flag, with no vlp counterpart: {spec.note}")
        override = f"{spec.key}={spec.value(raw) if spec.value else raw}"
        print(f"vlp: {name} is open_clip_train's flag: {override}", file=sys.stderr)
        overrides.append(override)
    return rest, overrides


def mapping_table() -> str:
    """The docs' table: every flag, its vlp key and what to know."""
    lines = ["| open_clip_train | vlp | note |", "|---|---|---|"]
    for f in FLAGS:
        key = f"`{f.key}`" if f.key else "-"
        lines.append(f"| `{f.flag}` | {key} | {f.note.replace('|', '/')} |")
    return "\n".join(lines)
