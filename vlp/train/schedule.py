"""Optimizer and learning-rate schedule, as open_clip's trainer sets them up.

AdamW with two parameter groups: weight decay on weight matrices only; none on
gains (norm weights), biases, the logit scale and the sigmoid bias (every
parameter with fewer than 2 dimensions, plus names open_clip excludes); betas
and eps by model name unless set; the logit scale clamped after each update.
The schedule is a pure function of the step (linear warmup, then cosine to
`min_lr`, or constant), so resuming needs only the step count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlp.core.config import OptimConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adam_settings(cfg: OptimConfig, model_name: str) -> tuple[tuple[float, float], float]:
    """(betas, eps): what the config says, else open_clip_train's defaults for the model's name
    (the CLIP paper's 0.98 / 1e-6 for ViTs; Adam's own 0.999 / 1e-8 for every other name)."""
    vit = "vit" in model_name.lower()
    beta2 = cfg.beta2 if cfg.beta2 is not None else (0.98 if vit else 0.999)
    eps = cfg.eps if cfg.eps is not None else (1e-6 if vit else 1e-8)
    return (cfg.beta1, beta2), eps


def make_optimizer(model: nn.Module, cfg: OptimConfig, model_name: str) -> torch.optim.Optimizer:
    """torch AdamW, fused (one kernel per step, CPU and CUDA; the foreach version is slower)."""
    betas, eps = adam_settings(cfg, model_name)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=eps, fused=True)


def clamp_logit_scale(model: nn.Module, max_scale: float) -> None:
    """After each update, as open_clip_train does: the learnable log-temperature back into [0, log max_scale].

    The loss also caps exp(t) at max_scale, but a parameter left above the cap gets no gradient
    there and could never come back down; clamping the parameter keeps it where the gradient
    reaches it. Under ZeRO or bf16 the optimizer's fp32 copy is the one clamped (the model's copy
    is refreshed from it), so every rank calls this (ZeRO-3 gathers the parameter).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = getattr(model, "logit_scale", None)
    if param is None:
        return
    top = math.log(max_scale)
    with torch.no_grad():
        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(0, top))
        if param.numel():  # a ZeRO-3 parameter is empty outside its forward
            param.clamp_(0, top)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
