"""Teachers for distillation: a frozen model (open_clip_train's `--distill-model` / `--distill-pretrained`),
or the model's own exponential moving average (DeGLA's self-distillation, `loss.ema_teacher`).

The teacher (any model `model.name` accepts, with its weights) sees the student's batch as the
student sees it: the same token ids and the same normalised images. It therefore has to read
them alike: the same tokenizer (kind, vocabulary, context length), image size and image
normalisation; any difference is a one-line error before training starts. Its embeddings and
logit scale enter the loss as constants (vlp.train.losses.distillation); under gradient caching
they are computed chunk by chunk in the first, gradient-free pass, so the teacher costs one
forward per sample and never holds activations.

The EMA teacher starts as the model (a fine-tuning run's pretrained weights) and after every
update moves a (1 - decay) share of the way to it: a slowly moving copy of what the model knew,
which the feature and text-grounded terms hold the model near while it learns compositions.
It is a plain fp32 module in eval mode (no dropout), kept whole on every rank (each rank applies
the same update to the same weights: ZeRO-3, which splits the weights, is refused), and saved in
every checkpoint as `ema.safetensors` (open_clip's layout: it loads as weights anywhere), so a
resumed run continues from the same teacher.

CLIP-KD's feature-mimicking term against another model is not here: it needs the student's and
the teacher's embedding widths tied by a learned projection, a second model change for a gain its
paper reports only beside the logit term this module provides.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vlp.core.config import LossConfig, ModelConfig
from vlp.core.errors import UserError
from vlp.core.models import check_model, create_model, forward, image_normalization, model_config
from vlp.core.weights import write_weights
from vlp.train.losses import Teacher

KEY = "config key 'loss.distill_model'"


def teacher_config(cfg: LossConfig) -> ModelConfig:
    return ModelConfig(name=cfg.distill_model, pretrained=cfg.distill_pretrained)


def check_teacher(cfg: LossConfig, student: ModelConfig) -> None:
    """Before any model is built: the teacher exists and reads the student's inputs alike."""
    if cfg.distill_model is None:
        if cfg.distill_pretrained is not None:
            raise UserError("config key 'loss.distill_pretrained': goes with loss.distill_model (the teacher)")
        return
    check_model(teacher_config(cfg))
    mine, theirs = model_config(student.name) or {}, model_config(cfg.distill_model) or {}
    for tower, key in (("text_cfg", "context_length"), ("text_cfg", "vocab_size"), ("text_cfg", "hf_tokenizer_name"),
                       ("vision_cfg", "image_size")):
        a, b = mine.get(tower, {}).get(key), theirs.get(tower, {}).get(key)
        if a != b:
            raise UserError(f"{KEY}: the teacher {cfg.distill_model!r} reads other inputs than the student "
                            f"{student.name!r} ({tower}.{key}: {b} against {a}); distillation feeds both the same "
                            "token ids and images")


class FrozenTeacher:
    """The teacher, frozen and in eval mode, called as `teacher(images, texts) -> Teacher` (no grad by caller)."""

    def __init__(self, cfg: LossConfig, student: torch.nn.Module, device: torch.device):
        self.model = create_model(teacher_config(cfg), device=device)[0].eval().requires_grad_(False)
        if image_normalization(self.model) != image_normalization(student):
            raise UserError(f"{KEY}: the teacher {cfg.distill_model!r} normalises images otherwise than the student "
                            f"({image_normalization(self.model)} against {image_normalization(student)})")
        text = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps its text tower apart
        self.context = int(getattr(text, "context_length", 0) or 0)

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> Teacher:
        if texts.shape[1] < self.context:  # the student's trimmed ids: the pads it left out, back
            texts = F.pad(texts, (0, self.context - texts.shape[1]))
        out = forward(self.model, images, texts)
        return Teacher(out.image.float(), out.text.float(), out.logit_scale.float())


EMA_FILE = "ema.safetensors"


class EmaTeacher:
    """The model's exponential moving average, called as `teacher(images, texts) -> Teacher` (no grad by caller)."""

    def __init__(self, student: torch.nn.Module, decay: float, model_name: str):
        self.model = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.decay, self.model_name = decay, model_name

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * student, for every weight; buffers copied."""
        for ema, now in zip(self.model.parameters(), student.parameters(), strict=True):
            ema.lerp_(now.detach().float(), 1 - self.decay)
        for ema, now in zip(self.model.buffers(), student.buffers(), strict=True):
            ema.copy_(now)

    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> Teacher:
        out = forward(self.model, images, texts)
        return Teacher(out.image.float(), out.text.float(), out.logit_scale.float())

    def save(self, folder: Path) -> None:
        write_weights(self.model.state_dict(), folder / EMA_FILE, self.model_name)

    def load(self, folder: Path) -> None:
        path = folder / EMA_FILE
        if not path.is_file():
            raise UserError(f"config key 'loss.ema_teacher': {folder} holds no {EMA_FILE} (a run trained without an "
                            "EMA teacher); resume it without one, or start a new run")
        own = self.model.state_dict()  # the file holds open_clip's 0-dim logit scale; a model may keep it as [1]
        state = {k: v.reshape(own[k].shape) if k in own else v for k, v in load_file(path).items()}
        self.model.load_state_dict(state, strict=True)
