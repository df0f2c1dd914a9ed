"""Contrastive losses over the global batch, as functions of embeddings.

`ContrastiveLoss(img, txt, logit_scale, logit_bias, hard_negatives)` takes this rank's
L2-normalised embeddings (and k hard-negative caption embeddings per image, [B, k, D]),
gathers what it needs across ranks, and returns this rank's loss term. Because it only
sees embeddings, gradient caching can call it once on the cached embeddings of the whole
effective batch (see vlp/gradcache.py).

Kinds:
- softmax: CLIP's symmetric InfoNCE. `exp(t)` is used as the model gives it: the trainer keeps
  t in [0, log max_logit_scale] by clamping the parameter after each update, as open_clip_train
  does (vlp.train.schedule.clamp_logit_scale); a cap here would stop t's gradient at the cap.
  `local_loss=False` computes the full N x N logits on every rank (value = the global
  loss on every rank); `local_loss=True` only this rank's rows, B x N in each direction
  (value averaged over ranks = the global loss). Values equal open_clip's `ClipLoss`.
- sigmoid: SigLIP (`sum of -log sigmoid(z_ij * logit_ij) / N`), full form (this rank's
  images x all gathered texts) or chunked neighbour exchange (`sigmoid_chunked`: texts
  travel around the ring, B x B logits per step), like open_clip's `SigLipLoss`.
Opt-in terms:
- decoupled (DCL): the positive pair is removed from the softmax denominators.
- label_smoothing (softmax): each row's target keeps 1 - eps on its positive and spreads eps
  evenly over the batch's columns, as `F.cross_entropy(..., label_smoothing=eps)` does
  ("Improved Baselines for Vision-Language Pre-training": a regulariser for small data).
- hard negatives: k extra captions per image enter the image->text softmax denominator
  (each counted `hard_negative_weight` times, i.e. logit + log w) or the sigmoid
  negatives (their pair losses weighted by w); or, with hard_negative_mode="pairwise",
  a separate term per image over just its caption and its negatives (weight w).
- align_uniform: weight x (alignment + mean of image/text uniformity), Wang & Isola 2020,
  on the gathered global batch.
- distillation (`teacher=` a frozen teacher's embeddings and logit scale of the same pairs):
  weight x the cross-entropy of the student's image->text and text->image softmax rows against
  the teacher's, averaged over both directions, on the global batch: open_clip_train's
  `--distill-model` (its DistillClipLoss, weight 1).
- feature distillation (with `teacher=`): weight x the mean over this rank's pairs of
  ||img - teacher img||^2 + ||txt - teacher txt||^2 (DeGLA's self-distillation against an EMA
  of the model; DeGLA sums over the batch, here it is a mean so the weight does not scale with it).
- text-grounded contrast (with `teacher=` and hard negatives; DeGLA's TGC): per caption,
  -log(e^(s t.t') / (e^(s t.t') + sum_k e^(s t.n_k))) with t' the teacher's embedding of the same
  caption, n_k the caption's own negatives (student), s a fixed scale: the caption is pulled to
  what it meant before fine-tuning and pushed from its rule-made negatives. (DeGLA's image-grounded
  contrast is the pairwise hard-negative term above.)
Both are means over this rank's rows, like the pairwise term, which keeps the gradient contract.

Gradient contract (what makes it safe under DDP / DeepSpeed and in gradient caching): in
every mode, `loss.backward()` on each rank followed by averaging gradients over ranks yields
exactly the gradient of the global-batch loss. Equivalently, the gradient that reaches a
rank's local embeddings is world_size x d(global loss)/d(local embeddings) and the one that
reaches `logit_scale` averages over ranks to d(global loss)/d(scale). open_clip's
`gather_with_grad=False` (without local loss) gives 1/W of that; here it means "gather
without a backward collective", which is exact because every rank computes the same loss.
`local_loss=True` needs `gather_with_grad=True` (otherwise gradients would miss the other
ranks' terms), and the full sigmoid form always gathers with grad.

Memory: logits are built in row blocks under activation checkpointing, so the loss holds
O(block x N) floats at a time rather than several N x N matrices (at N = 4096 an N x N fp32
matrix is 64 MiB and autograd would keep ~4 of them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.core import distributed as vdist
from vlp.core.config import LossConfig

BLOCK_ELEMENTS = 1 << 22  # logits per row block (16 MiB in fp32)


class Teacher(NamedTuple):
    """A frozen teacher's L2-normalised embeddings of this rank's pairs, and its logit scale exp(t)."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor


def distillation(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """Cross-entropy of the student's softmax rows against the teacher's, both directions averaged."""
    student = scale * img @ txt.T
    t_img, t_txt = teacher.image.float(), teacher.text.float()
    target = teacher.logit_scale.float().reshape(()) * t_img @ t_txt.T

    def rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -(t.softmax(dim=1) * s.log_softmax(dim=1)).sum(dim=1).mean()

    return (rows(student, target) + rows(student.T, target.T)) / 2


def _blocks(n_rows: int, n_cols: int) -> list[slice]:
    """Row slices so that one block of logits holds about BLOCK_ELEMENTS values."""
    step = max(1, BLOCK_ELEMENTS // max(1, n_cols))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _sum_over_row_blocks(fn, rows: tuple, shared: tuple) -> torch.Tensor:
    """sum_b fn(*(r[b] for r in rows), *shared), each block recomputed in backward.

    One block runs plainly (no recompute cost at small batches); several run under
    non-reentrant checkpointing so only one block of logits is alive at a time.
    """
    n = next(r.shape[0] for r in rows if r is not None)
    n_cols = max((s.shape[0] for s in shared if isinstance(s, torch.Tensor) and s.dim() == 2), default=1)
    blocks = _blocks(n, n_cols)
    if len(blocks) == 1:
        return fn(*rows, *shared)
    total = None
    for b in blocks:
        args = tuple(r[b] if r is not None else None for r in rows)
        part = checkpoint(fn, *args, *shared, use_reentrant=False, preserve_rng_state=False)
        total = part if total is None else total + part
    return total


def _softmax_rows(
    q: torch.Tensor,
    pos: torch.Tensor,
    negatives: torch.Tensor | None,
    negative_log_weights: torch.Tensor | None,
    k: torch.Tensor,
    scale: torch.Tensor,
    decoupled: bool,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum over rows of -log softmax(positive) for queries q against keys k (+ hard negatives).

    negative_log_weights [rows, k]: log of each hard negative's weight; -inf drops a padding slot.
    smoothing eps: the target is (1 - eps) x the positive + eps x the mean over the batch's
    columns (hard negatives get no share).
    """
    logits = scale * (q @ k.T)
    positive = logits.gather(1, pos[:, None]).squeeze(1)
    if smoothing:
        positive = (1 - smoothing) * positive + smoothing * logits.mean(dim=1)
    if decoupled:
        logits = logits.scatter(1, pos[:, None], float("-inf"))
    if negatives is not None:
        logits = torch.cat([logits, scale * torch.einsum("rd,rkd->rk", q, negatives) + negative_log_weights], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive).sum()


def _sigmoid_rows(
    q: torch.Tensor,
    pos: torch.Tensor | None,
    negatives: torch.Tensor | None,
    negative_weights: torch.Tensor | None,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Sum of -log sigmoid(z * logit) over a block; z = +1 at (row, pos[row]), -1 elsewhere.

    -log sigmoid(-l) = softplus(l) for negatives and softplus(l) - l for positives, so no
    label matrix is built.
    """
    logits = scale * (q @ k.T) + bias
    loss = F.softplus(logits).sum()
    if pos is not None:
        loss = loss - logits.gather(1, pos[:, None]).sum()
    if negatives is not None:
        loss = loss + (negative_weights * F.softplus(scale * torch.einsum("rd,rkd->rk", q, negatives) + bias)).sum()
    return loss


def _pairwise_term(
    img: torch.Tensor, txt: torch.Tensor, negatives: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Mean over this rank's anchors `img` of -log(e^pos / (e^pos + sum_k e^neg_k)), padding slots left out
    (pos: the anchor with `txt`; the text-grounded contrast passes captions as anchors, the teacher's as `txt`).

    The counting loss of "Teaching CLIP to Count" (Paiss et al. 2023), for any
    counterfactual: only the true caption and its own negatives compete, so
    the term is about the fact that differs, not about the rest of the batch.
    Local rows only: each rank's mean, averaged over ranks by DDP/DeepSpeed,
    is the global mean, which keeps the gradient contract of this module.
    """
    pos = scale * (img * txt).sum(-1, keepdim=True)
    neg = (scale * torch.einsum("bd,bkd->bk", img, negatives)).masked_fill(~keep, float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos.squeeze(1)).mean()


def _lse_offdiag_rows(
    q: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, sq_k: torch.Tensor
) -> torch.Tensor:
    """logsumexp over j != i of -2 ||q_i - k_j||^2 for a block of rows (uniformity)."""
    d2 = (q * q).sum(1, keepdim=True) + sq_k[None, :] - 2 * (q @ k.T)
    d2 = d2.scatter(1, idx[:, None], float("inf"))
    return torch.logsumexp(-2 * d2, dim=1).logsumexp(0, keepdim=True)


def uniformity(x: torch.Tensor) -> torch.Tensor:
    """log mean_{i != j} exp(-2 ||x_i - x_j||^2) (Wang & Isola, t = 2), in checkpointed row blocks."""
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0
    idx = torch.arange(n, device=x.device)
    sq = (x * x).sum(1)
    blocks = _blocks(n, n)
    if len(blocks) == 1:
        lse = _lse_offdiag_rows(x, idx, x, sq)
    else:
        lse = torch.cat(
            [
                checkpoint(
                    _lse_offdiag_rows, x[b], idx[b], x, sq, use_reentrant=False, preserve_rng_state=False
                )
                for b in blocks
            ]
        )
    return lse.logsumexp(0) - math.log(n * (n - 1))


def alignment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i ||x_i - y_i||^2 over positive pairs (Wang & Isola, alpha = 2)."""
    return (x - y).pow(2).sum(1).mean()


class ContrastiveLoss(nn.Module):
    """Softmax (CLIP) or sigmoid (SigLIP) loss over the global batch, with opt-in DCL,
    hard-negative and alignment/uniformity terms. See the module docstring for semantics.

    `rank` / `world_size` default to the current process group at call time; pass
    `world_size=1` to compute the single-process loss on whatever tensors are given.
    """

    def __init__(
        self,
        kind: str = "softmax",
        *,
        gather_with_grad: bool = True,
        local_loss: bool = False,
        sigmoid_chunked: bool = True,
        decoupled: bool = False,
        label_smoothing: float = 0.0,
        align_uniform: float = 0.0,
        hard_negative_weight: float = 1.0,
        hard_negative_mode: str = "denominator",
        distill_weight: float = 1.0,
        feature_distill_weight: float = 0.0,
        text_grounded_weight: float = 0.0,
        text_grounded_scale: float = 10.0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"loss kind must be 'softmax' or 'sigmoid', got {kind!r}")
        if kind == "softmax" and local_loss and not gather_with_grad:
            raise ValueError(
                "local_loss=True needs gather_with_grad=True: without it gradients miss other ranks' terms"
            )
        self.kind = kind
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.sigmoid_chunked = sigmoid_chunked
        if label_smoothing and (kind != "softmax" or decoupled):
            raise ValueError("label_smoothing works with the softmax loss without decoupled (DCL)")
        self.decoupled = decoupled
        self.label_smoothing = label_smoothing
        self.align_uniform = align_uniform
        self.hard_negative_weight = hard_negative_weight
        if hard_negative_mode not in ("denominator", "pairwise"):
            raise ValueError(f"hard_negative_mode must be 'denominator' or 'pairwise', got {hard_negative_mode!r}")
        self.hard_negative_mode = hard_negative_mode
        self.distill_weight = distill_weight
        self.feature_distill_weight = feature_distill_weight
        self.text_grounded_weight = text_grounded_weight
        self.text_grounded_scale = text_grounded_scale
        self._rank = rank
        self._world_size = world_size

    @classmethod
    def from_config(cls, cfg: LossConfig, **kwargs) -> ContrastiveLoss:
        """Build from the `loss` section of the run config."""
        return cls(
            cfg.kind,
            gather_with_grad=cfg.gather_with_grad,
            local_loss=cfg.local_loss,
            sigmoid_chunked=cfg.sigmoid_chunked,
            decoupled=cfg.decoupled,
            label_smoothing=cfg.label_smoothing,
            align_uniform=cfg.align_uniform,
            hard_negative_weight=cfg.hard_negative_weight,
            hard_negative_mode=cfg.hard_negative_mode,
            distill_weight=cfg.distill_weight,
            feature_distill_weight=cfg.feature_distill_weight,
            text_grounded_weight=cfg.text_grounded_weight,
            text_grounded_scale=cfg.text_grounded_scale,
            **kwargs,
        )

    @property
    def rank(self) -> int:
        return vdist.get_rank() if self._rank is None else self._rank

    @property
    def world_size(self) -> int:
        return vdist.get_world_size() if self._world_size is None else self._world_size

    def _gather_global(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Gather for the global (non-local) softmax, which every rank computes identically."""
        if x is None or self.world_size == 1:
            return x
        if self.gather_with_grad:
            return vdist.all_gather_with_grad(x)
        return vdist.all_gather_replicated(x)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        hard_negative_mask: torch.Tensor | None = None,
        teacher: Teacher | None = None,
    ) -> dict[str, torch.Tensor]:
        """This rank's loss term; returns {'loss': total (with grad), plus detached parts}.

        logit_scale is exp(t) as open_clip models return it (any shape with one element);
        hard_negatives are [B, k, D] text embeddings, k may be 0 or None;
        hard_negative_mask [B, k] (bool) marks the real ones: False slots are padding
        (an image with fewer than k negatives) and take no part in the loss; teacher: a frozen
        teacher's view of the same pairs, for the distillation term.
        """
        img, txt = image_features.float(), text_features.float()
        negatives = negative_weights = None
        if hard_negatives is not None and hard_negatives.shape[1] > 0 and self.hard_negative_weight > 0:
            negatives = hard_negatives.float()
            negative_weights = torch.full(negatives.shape[:2], self.hard_negative_weight, device=negatives.device)
            if hard_negative_mask is not None:
                negative_weights = negative_weights * hard_negative_mask.to(negatives.device, torch.float32)
        scale = logit_scale.float().reshape(())
        terms: dict[str, torch.Tensor] = {}
        keep = None if negatives is None else negative_weights > 0  # real negatives, not padding
        pairwise = None
        if negatives is not None and self.hard_negative_mode == "pairwise":
            pairwise = self.hard_negative_weight * _pairwise_term(img, txt, negatives, keep, scale)
            negatives = negative_weights = None  # the contrastive part runs without them
        if self.kind == "softmax":
            loss = self._softmax(img, txt, scale, negatives, negative_weights)
        else:
            if logit_bias is None:
                raise ValueError("the sigmoid loss needs a logit_bias (build the model with init_logit_bias)")
            bias = logit_bias.float().reshape(())
            loss = self._sigmoid(img, txt, scale, bias, negatives, negative_weights)
            terms["logit_bias"] = bias.detach()
        terms["contrastive"] = loss.detach()
        if pairwise is not None:
            loss = loss + pairwise
            terms["hard_negative"] = pairwise.detach()
        if self.align_uniform > 0:
            # every rank computes the same global term, so the comm-free replicated gather is exact
            all_img, all_txt = img, txt
            if self.world_size > 1:
                all_img, all_txt = vdist.all_gather_replicated(img), vdist.all_gather_replicated(txt)
            align = alignment(all_img, all_txt)
            unif = (uniformity(all_img) + uniformity(all_txt)) / 2
            loss = loss + self.align_uniform * (align + unif)
            terms["alignment"], terms["uniformity"] = align.detach(), unif.detach()
        if teacher is not None and self.distill_weight > 0:
            # the same global term on every rank: the comm-free replicated gather is exact (as above)
            gather = vdist.all_gather_replicated if self.world_size > 1 else (lambda x: x)
            distill = distillation(gather(img), gather(txt), scale, Teacher(
                gather(teacher.image.detach()), gather(teacher.text.detach()), teacher.logit_scale.detach()))
            loss = loss + self.distill_weight * distill
            terms["distill"] = distill.detach()
        if teacher is not None:
            loss = loss + self._teacher_terms(img, txt, hard_negatives, hard_negative_mask, teacher, terms)
        terms["logit_scale"] = scale.detach()
        terms["loss"] = loss
        return terms

    def _teacher_terms(self, img, txt, hard_negatives, mask, teacher: Teacher, terms: dict) -> torch.Tensor:
        """DeGLA's feature distillation and text-grounded contrast, on this rank's rows."""
        total = img.new_zeros(())
        t_img, t_txt = teacher.image.detach().float(), teacher.text.detach().float()
        if self.feature_distill_weight > 0:
            feature = ((img - t_img).pow(2).sum(1) + (txt - t_txt).pow(2).sum(1)).mean()
            total = total + self.feature_distill_weight * feature
            terms["feature_distill"] = feature.detach()
        if self.text_grounded_weight > 0 and hard_negatives is not None and hard_negatives.shape[1] > 0:
            scale = txt.new_tensor(self.text_grounded_scale)
            keep = (torch.ones(hard_negatives.shape[:2], dtype=torch.bool, device=txt.device) if mask is None
                    else mask.to(txt.device, torch.bool))
            grounded = _pairwise_term(txt, t_txt, hard_negatives.float(), keep, scale)
            total = total + self.text_grounded_weight * grounded
            terms["text_grounded"] = grounded.detach()
        return total

    # ---------------------------------------------------------------- softmax

    def _softmax(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        negatives: torch.Tensor | None,
        negative_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """Symmetric InfoNCE; rows = all N pairs (global) or this rank's B pairs (local_loss)."""
        b, world = img.shape[0], self.world_size
        negative_log_weights = None if negative_weights is None else negative_weights.log()  # weight 0 (padding) -> -inf: no share
        if world > 1 and self.local_loss:
            all_img, all_txt = vdist.all_gather_with_grad(img), vdist.all_gather_with_grad(txt)
            q_img, q_txt, q_negatives = img, txt, negatives
            pos = torch.arange(b, device=img.device) + b * self.rank
        else:
            all_img, all_txt = self._gather_global(img), self._gather_global(txt)
            q_img, q_txt, q_negatives = all_img, all_txt, self._gather_global(negatives)
            if negative_log_weights is not None and world > 1:
                negative_log_weights = vdist.all_gather_nograd(negative_log_weights)
            pos = torch.arange(all_img.shape[0], device=img.device)
        n = q_img.shape[0]

        def rows(q, p, h, h_log_w, keys):
            return _sum_over_row_blocks(_softmax_rows, (q, p, h, h_log_w), (keys, scale, self.decoupled, self.label_smoothing))

        i2t = rows(q_img, pos, q_negatives, negative_log_weights, all_txt) / n
        t2i = rows(q_txt, pos, None, None, all_img) / n
        return (i2t + t2i) / 2

    # ---------------------------------------------------------------- sigmoid

    def _sigmoid(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        negatives: torch.Tensor | None,
        negative_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        """SigLIP: this rank's images against every text; divided by the local batch like open_clip."""
        b, world, rank = img.shape[0], self.world_size, self.rank

        def rows(keys, pos, h, h_w):
            return _sum_over_row_blocks(_sigmoid_rows, (img, pos, h, h_w), (keys, scale, bias))

        arange = torch.arange(b, device=img.device)
        if world == 1:
            return rows(txt, arange, negatives, negative_weights) / b
        if not self.sigmoid_chunked:
            return rows(vdist.all_gather_with_grad(txt), arange + b * rank, negatives, negative_weights) / b
        loss = rows(txt, arange, negatives, negative_weights)
        for other in self._exchanged_texts(txt):
            loss = loss + rows(other, None, None, None)
        return loss / b

    def _exchanged_texts(self, txt: torch.Tensor):
        """Yield every other rank's texts, passed around the ring (bidirectionally where possible)."""
        world, rank = self.world_size, self.rank
        right, left = (rank + 1) % world, (rank - 1 + world) % world
        to_left = to_right = txt
        n_bidir, remainder = divmod(world - 1, 2)
        for _ in range(n_bidir):
            from_right, from_left = vdist.neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
            yield from_right
            yield from_left
            to_left, to_right = from_right, from_left
        if remainder:
            yield vdist.neighbour_exchange_with_grad(left, right, to_right)
