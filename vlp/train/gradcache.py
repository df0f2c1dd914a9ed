"""Exact gradient caching: a contrastive batch far larger than what fits in activation memory.

Effective batch = chunks x chunk size (per rank) x world size. One `GradCache.step`:

1. Pass 1, no grad: forward each chunk, capturing the RNG state (CPU and CUDA) before it,
   and keep only the embeddings and the logit scale/bias.
2. Loss on embeddings: the cached embeddings become leaf tensors; the loss (which gathers
   across ranks itself) is computed once for the whole effective batch and differentiated
   w.r.t. those leaves and the logit scale/bias. Memory here is embeddings + the loss's
   row-blocked logits; no encoder activations are alive.
3. Pass 2, with grad: re-forward each chunk under its replayed RNG state (dropout, patch
   dropout draw the same numbers, so the graph is the one pass 1 saw) and backpropagate
   the cached gradients through the surrogate
       (e_img * g_img).sum() + (e_txt * g_txt).sum() [+ hard negatives]
   plus, on the last chunk only, (scale * g_scale).sum() [+ (bias * g_bias).sum()].
   Activations are alive for one chunk at a time.

Why this is exact under DDP/DeepSpeed averaging: `vlp.train.losses.ContrastiveLoss` guarantees
that the gradient reaching a rank's embeddings is world_size x d(global loss)/d(local
embeddings) and that the scale gradients average over ranks to d(global loss)/d(scale).
The usual recipe gathers without grad, takes d(loss)/d(local embeddings) and multiplies
the embedding surrogate by W (not the scale term); here the factor W is produced by the
loss's gather instead of written in the surrogate.

DeepSpeed: the engine must have gradient_accumulation_steps=1;
before each pass-2 backward `engine.set_gradient_accumulation_boundary(i == last)` is set,
so ZeRO 0-3 reduce once, at the last chunk. Under DDP, `no_sync()` plays the same role.

Contract for the trainer, per optimizer step:
    result = gc.step(images, texts, hard_negatives)   # all forwards and backwards
    engine.step()                                      # DeepSpeed: clip, update, zero grads
  or, for a plain module / DDP:
    result = gc.step(...); optimizer.step(); optimizer.zero_grad(set_to_none=True)
Do not call engine.backward yourself; call engine.step() exactly once per gc.step().
With one chunk (chunk_size None or >= the batch) step() is a plain forward + backward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.core.models import ModelOutput, forward, unwrap
from vlp.train.losses import Teacher


@dataclass
class StepResult:
    """Loss of this rank (mean over ranks = global loss) and its logged parts.

    Held as detached tensors: reading them as floats (`loss`, `terms`) waits for the
    device, so a trainer reads them only on the steps it logs.
    """

    loss_tensor: torch.Tensor
    term_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    chunks: int = 1

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def terms(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.term_tensors.items()}


class RngState:
    """CPU (+ CUDA device) generator state, replayable without disturbing the live stream.

    CPU matters even on GPU: open_clip's PatchDropout draws its mask with the CPU generator.
    """

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_index: int | None = None
        self.cuda: torch.Tensor | None = None
        if device.type == "cuda" and torch.cuda.is_initialized():
            self.cuda_index = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda = torch.cuda.get_rng_state(self.cuda_index)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body with the captured state; the outer RNG state is restored afterwards."""
        devices = [self.cuda_index] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_index)
            yield


def is_deepspeed_engine(model: Any) -> bool:
    """True for a DeepSpeedEngine (checked without importing deepspeed)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def _dot(e: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    """(e * g).sum() in fp32: its gradient w.r.t. e is g, whatever e's dtype."""
    if e is None or g is None or not e.requires_grad:
        return None
    return (e.float().reshape(g.shape) * g).sum()


class GradCache:
    """Exact big-batch contrastive gradients in O(chunk) activation memory (see module docstring).

    model: an open_clip module, a DDP wrapper or a DeepSpeed engine (gas must be 1).
    loss_fn: called as loss_fn(img, txt, logit_scale, logit_bias, hard_negatives) -> dict
        with 'loss' (e.g. vlp.train.losses.ContrastiveLoss), honouring its gradient contract.
    chunk_size: per-rank micro-batch; None = no caching.
    autocast_dtype: e.g. torch.bfloat16 for autocast forwards of a plain fp32 module (not
        needed for a DeepSpeed bf16 engine, whose module is already bf16: inputs are cast).
    replay_rng: keep True; False exists to show that without replay gradients are wrong.
    normalize_images: uint8 images -> model input, applied to each image chunk after it
        is moved to the device, so the full batch can be held compactly (uint8, on the
        host); the trainer passes `vlp.train.loader.batches.normalize` bound to the model's mean/std
        (`vlp.core.models.image_normalization`). None: images are model input already.
    teacher: a frozen teacher (vlp.train.distill.FrozenTeacher), called without grad on each
        chunk's images and captions in the first pass; its view reaches the loss as `teacher=`.
    image_size: set between steps (vlp.train.tokendrop's first phase): the model's images are
        resized to this side after normalising (antialiased bilinear; the teacher's are not).
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Any,
        chunk_size: int | None = None,
        *,
        autocast_dtype: torch.dtype | None = None,
        replay_rng: bool = True,
        normalize_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
        teacher: Callable[[torch.Tensor, torch.Tensor], Teacher] | None = None,
    ) -> None:
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype
        self.replay_rng = replay_rng
        self.normalize_images = normalize_images
        self.teacher = teacher
        self.image_size: int | None = None
        self.is_engine = is_deepspeed_engine(model)
        self.is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if self.is_engine and model.gradient_accumulation_steps() != 1:
            raise ValueError(
                "GradCache drives accumulation itself: set gradient_accumulation_steps=1 in the DeepSpeed config"
            )
        module = unwrap(model)
        self.device = model.device if self.is_engine else next(module.parameters()).device
        self.input_dtype = self._engine_input_dtype()
        self.image_trainable = self._trainable(getattr(module, "visual", None))
        self.text_trainable = self._text_trainable(module)

    # ---------------------------------------------------------------- setup helpers

    def _engine_input_dtype(self) -> torch.dtype | None:
        if self.is_engine and self.model.bfloat16_enabled():
            return torch.bfloat16
        if self.is_engine and self.model.fp16_enabled():
            return torch.float16
        return None

    @staticmethod
    def _trainable(module: nn.Module | None) -> bool:
        return module is None or any(p.requires_grad for p in module.parameters())

    @staticmethod
    def _text_trainable(module: nn.Module) -> bool:
        """Text tower = every parameter outside .visual and the logit scale/bias."""
        skip = ("visual.", "logit_scale", "logit_bias")
        return any(p.requires_grad for n, p in module.named_parameters() if not n.startswith(skip))

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _inputs(self, images: torch.Tensor, texts: torch.Tensor, hn: torch.Tensor | None):
        """Move one chunk to the model's device (the full batch may stay in host memory)."""
        images = images.to(self.device, non_blocking=True)
        if self.normalize_images is not None:
            images = self.normalize_images(images)
        if self.image_size is not None and images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        if self.input_dtype is not None and images.is_floating_point():
            images = images.to(self.input_dtype)
        texts = texts.to(self.device, non_blocking=True)
        if hn is not None:
            texts = torch.cat([texts, hn.to(self.device, non_blocking=True).flatten(0, 1)])
        return images, texts

    def _forward(self, images, texts, hn, with_image=True, with_text=True) -> ModelOutput:
        images, texts = self._inputs(images, texts, hn)
        with self._autocast():
            return forward(self.model, images if with_image else None, texts if with_text else None)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.is_engine:
            self.model.backward(loss)
        else:
            loss.backward()

    # ---------------------------------------------------------------- the step

    def step(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_mask: torch.Tensor | None = None,
    ) -> StepResult:
        """Forwards and backwards for one optimizer step; gradients are left for the optimizer.

        images [B, C, H, W], texts [B, L] token ids, hard_negatives [B, k, L] token ids or None,
        hard_negative_mask [B, k] bool (False: a padding slot the loss ignores) or None.
        """
        b = images.shape[0]
        if texts.shape[0] != b or (hard_negatives is not None and hard_negatives.shape[0] != b):
            raise ValueError("images, texts and hard_negatives must have the same batch size")
        if hard_negatives is not None and hard_negatives.shape[1] == 0:
            hard_negatives = hard_negative_mask = None
        extra = {} if hard_negative_mask is None else {"hard_negative_mask": hard_negative_mask}
        size = b if self.chunk_size is None else min(self.chunk_size, b)
        chunks = [slice(i, min(i + size, b)) for i in range(0, b, size)]
        if self.teacher is not None:
            extra["teacher"] = self._teacher_view(images, texts, chunks)
        if len(chunks) == 1:
            return self._plain_step(images, texts, hard_negatives, extra)
        return self._cached_step(images, texts, hard_negatives, chunks, extra)

    def _teacher_view(self, images: torch.Tensor, texts: torch.Tensor, chunks: list[slice]) -> Teacher:
        """The teacher's embeddings of the captions and images, chunk by chunk, without grad (fp32 inputs,
        under the run's autocast: the teacher is a plain module, not the engine)."""
        dtype = self.input_dtype or self.autocast_dtype
        views = []
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext():
            for sl in chunks:
                chunk = images[sl].to(self.device, non_blocking=True)
                chunk = self.normalize_images(chunk) if self.normalize_images is not None else chunk
                views.append(self.teacher(chunk.float(), texts[sl].to(self.device, non_blocking=True)))
        return Teacher(*(torch.cat([getattr(v, f) for v in views]) for f in ("image", "text")),
                       views[0].logit_scale)

    def _split_text(self, out: ModelOutput, n: int, hn: torch.Tensor | None):
        """Separate caption embeddings from hard-negative embeddings [n, k, D]."""
        if out.text is None or hn is None:
            return out.text, None
        return out.text[:n], out.text[n:].reshape(n, hn.shape[1], -1)

    def _plain_step(self, images, texts, hn, extra: dict) -> StepResult:
        if self.is_engine:
            self.model.set_gradient_accumulation_boundary(True)
        out = self._forward(images, texts, hn)
        txt, hn_emb = self._split_text(out, images.shape[0], hn)
        terms = self.loss_fn(out.image, txt, out.logit_scale, out.logit_bias, hn_emb, **extra)
        self._backward(terms["loss"])
        return _result(terms, 1)

    def _cached_step(self, images, texts, hn, chunks: list[slice], extra: dict) -> StepResult:
        states, outs = self._pass1(images, texts, hn, chunks)
        terms, grads = self._embedding_grads(outs, hn, extra)
        self._pass2(images, texts, hn, chunks, states, grads)
        return _result(terms, len(chunks))

    def _pass1(self, images, texts, hn, chunks):
        """No-grad forwards; RNG captured before each chunk so pass 2 can replay it."""
        states: list[RngState] = []
        outs: list[ModelOutput] = []
        with torch.no_grad():
            for sl in chunks:
                states.append(RngState(self.device))
                outs.append(self._forward(images[sl], texts[sl], None if hn is None else hn[sl]))
        return states, outs

    def _embedding_grads(self, outs: list[ModelOutput], hn, extra: dict):
        """Loss over the whole effective batch and its gradient w.r.t. the cached embeddings."""
        img = torch.cat([o.image for o in outs]).float().requires_grad_()
        txt_parts = [self._split_text(o, o.image.shape[0], hn) for o in outs]
        txt = torch.cat([t for t, _ in txt_parts]).float().requires_grad_()
        hn_emb = torch.cat([h for _, h in txt_parts]).float().requires_grad_() if hn is not None else None
        scale = outs[0].logit_scale.detach().float().requires_grad_()
        bias = (
            outs[0].logit_bias.detach().float().requires_grad_() if outs[0].logit_bias is not None else None
        )
        named = {"img": img, "txt": txt, "hn": hn_emb, "scale": scale, "bias": bias}
        present = {k: v for k, v in named.items() if v is not None}
        with torch.enable_grad():
            terms = self.loss_fn(img, txt, scale, bias, hn_emb, **extra)
            grads = torch.autograd.grad(terms["loss"], list(present.values()), allow_unused=True)
        grads_by_name: dict[str, torch.Tensor | None] = dict.fromkeys(named)
        grads_by_name.update(zip(present, grads, strict=True))
        return terms, grads_by_name

    @contextmanager
    def _chunk_context(self, i: int, last: int) -> Iterator[None]:
        """Reduce across ranks only on the last chunk (DeepSpeed boundary / DDP no_sync)."""
        if self.is_engine:
            self.model.set_gradient_accumulation_boundary(i == last)
        ctx = self.model.no_sync() if self.is_ddp and i != last else nullcontext()
        with ctx:
            yield

    def _pass2(self, images, texts, hn, chunks, states, grads) -> None:
        """Re-forward each chunk with grad under its replayed RNG and backprop the cached grads."""
        last = len(chunks) - 1
        for i, sl in enumerate(chunks):
            with self._chunk_context(i, last):
                replay = states[i].replay() if self.replay_rng else nullcontext()
                with replay:
                    out = self._forward(
                        images[sl],
                        texts[sl],
                        None if hn is None else hn[sl],
                        self.image_trainable,
                        self.text_trainable,
                    )
                txt, hn_emb = self._split_text(out, sl.stop - sl.start, hn)
                parts = [
                    _dot(out.image, _at(grads["img"], sl)),
                    _dot(txt, _at(grads["txt"], sl)),
                    _dot(hn_emb, _at(grads["hn"], sl)),
                ]
                if i == last:  # once, and on the synchronised backward so DDP sees every parameter used
                    parts += [
                        _dot(out.logit_scale, grads["scale"]),
                        _dot_or_zero(out.logit_bias, grads["bias"]),
                    ]
                parts = [p for p in parts if p is not None]
                if parts:
                    self._backward(torch.stack(parts).sum())


def _at(g: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if g is None else g[sl]


def _dot_or_zero(e: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    """A bias the loss ignores (softmax) still takes part with a zero gradient, as DDP requires."""
    if e is not None and e.requires_grad and g is None:
        return (e.float() * 0).sum()
    return _dot(e, g)


def _result(terms: dict[str, torch.Tensor], chunks: int) -> StepResult:
    return StepResult(
        loss_tensor=terms["loss"].detach(),
        term_tensors={k: v.detach() for k, v in terms.items() if k != "loss"},
        chunks=chunks,
    )
