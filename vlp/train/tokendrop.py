"""Token dropping as a schedule: a first phase on fewer tokens, then full size to the end.

FLIP (Li et al. 2023) drops a random half or more of the image patches, so a step costs
about half; CLIPA (Li et al. 2023, "An Inverse Scaling Law for CLIP Training") also cuts
the captions short and shrinks the images, and both finish with a short phase at full size
that recovers what the model lost to the mismatch. Here `train.token_drop.until` is that
first phase's share of the steps; in it the image tower drops `patch_dropout` of its
patches (open_clip's PatchDropout, which the gradient cache replays exactly), sees images
resized to `image_size` (the gradient cache resizes each chunk after normalising it) and
captions keep `text_length` token ids (cut, with the end-of-text token moved into the last
kept place). The phase is a function of the step, so a resumed run is in the phase the
original was.

Why shrink rather than drop: CLIPA found resizing the best of its ways to cut image
tokens, and it keeps the whole picture, where dropping three patches in four of a drawing
on a plain background leaves the model little of the drawing. A ViT's position embeddings
come in one grid size, so for a smaller grid they are interpolated (bicubic, as open_clip
does when it loads weights at another size) and the gradient flows back through that
interpolation to the one set of embeddings; at the full size the tower computes exactly
what open_clip's does.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout, VisionTransformer, _expand_token

from vlp.core.config import RunConfig
from vlp.core.errors import UserError
from vlp.core.models import unwrap
from vlp.train.speedups import PAD_ID, allow_trimmed_text


@dataclass(frozen=True)
class Phase:
    """What one step's inputs are cut to (None: full size)."""

    text_length: int | None = None
    image_size: int | None = None


FULL = Phase()


class TokenDrop:
    """The schedule for one run: `prepare(model)` before DeepSpeed wraps it, then `at(step)` every step."""

    def __init__(self, cfg: RunConfig, total_steps: int):
        self.cfg = cfg.train.token_drop
        self.name = cfg.model.name
        self.full_patch_dropout = cfg.model.patch_dropout  # the second phase's (usually 0)
        self.first_phase_steps = round(self.cfg.until * total_steps)

    @property
    def enabled(self) -> bool:
        cut = self.cfg.patch_dropout > 0 or self.cfg.text_length is not None or self.cfg.image_size is not None
        return self.first_phase_steps > 0 and cut

    def prepare(self, model) -> None:
        """Give the image tower a PatchDropout to schedule and smaller images, and the text tower short inputs;
        or a one-line error."""
        if not self.enabled:
            return
        visual = unwrap(model).visual
        if self.cfg.patch_dropout > 0:
            if not hasattr(visual, "patch_dropout"):
                raise UserError(f"config key 'train.token_drop.patch_dropout': model {self.name!r}'s image tower "
                                "has no patches to drop (a ViT tower has); set it to 0")
            if not isinstance(visual.patch_dropout, PatchDropout):
                visual.patch_dropout = PatchDropout(0.0)
        if self.cfg.text_length is not None:
            if getattr(unwrap(model), "text_pool_type", "argmax") != "argmax":
                raise UserError("config key 'train.token_drop.text_length': cutting captions needs a text tower "
                                f"that pools at its largest token id (end of text); {self.name!r} does not")
            allow_trimmed_text(model, self.name)
        if self.cfg.image_size is not None:
            allow_smaller_images(visual, self.cfg.image_size, self.name)

    def in_first_phase(self, step: int) -> bool:
        return self.enabled and step < self.first_phase_steps

    def at(self, step: int, model) -> Phase:
        """Set the model's patch dropout for optimizer step `step` (0-based); what the step's inputs are cut to."""
        if not self.enabled:
            return FULL
        first = self.in_first_phase(step)
        if self.cfg.patch_dropout > 0:
            unwrap(model).visual.patch_dropout.prob = self.cfg.patch_dropout if first else self.full_patch_dropout
        return Phase(self.cfg.text_length, self.cfg.image_size) if first else FULL


def allow_smaller_images(visual, size: int, name: str) -> None:
    """Make an open_clip ViT tower take images of side `size` (its position embeddings interpolated), or a
    one-line UserError."""
    key = "config key 'train.token_drop.image_size'"
    if not isinstance(visual, VisionTransformer) or getattr(visual, "positional_embedding", None) is None:
        raise UserError(f"{key}: model {name!r}'s image tower is not open_clip's ViT with learnt position "
                        "embeddings; leave image_size unset")
    patch = visual.conv1.kernel_size
    full = tuple(g * p for g, p in zip(visual.grid_size, patch, strict=True))
    if any(size % p for p in patch) or size >= min(full):
        raise UserError(f"{key}: {size} must be a multiple of {name!r}'s patch size {patch[0]} and smaller than its "
                        f"image size {full[0]}")
    visual._embeds = types.MethodType(_embeds_any_size, visual)


def _embeds_any_size(self, x: torch.Tensor) -> torch.Tensor:
    """open_clip's VisionTransformer._embeds, with the position embeddings interpolated to the input's grid."""
    x = self.conv1(x)  # [batch, width, grid h, grid w]
    grid = tuple(x.shape[-2:])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([_expand_token(self.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
    x = x + _positions(self, grid).to(x.dtype)
    x = self.patch_dropout(x)
    return self.ln_pre(x)


def _positions(visual, grid: tuple[int, int]) -> torch.Tensor:
    """The tower's position embeddings [1 + h*w, width] for a grid of h x w patches (its own at its own size)."""
    pos = visual.positional_embedding
    if grid == tuple(visual.grid_size):
        return pos
    patches = pos[1:].reshape(1, *visual.grid_size, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])


def truncate_tokens(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Token ids [..., L] cut to `length`; a caption that was longer ends with its end-of-text id in the last place.

    The end-of-text id is each caption's largest (open_clip's tokenizer, argmax pooling).
    """
    if tokens.shape[-1] <= length:
        return tokens
    cut = tokens[..., :length].clone()
    longer = tokens[..., length:].ne(PAD_ID).any(-1)
    cut[..., length - 1] = torch.where(longer, tokens.max(-1).values, cut[..., length - 1])
    return cut
