"""Token dropping as a schedule: a first phase on fewer tokens, then full size to the end.

FLIP (Li et al. 2023) drops a random half or more of the image patches, so a step costs
about half; CLIPA (Li et al. 2023, "An Inverse Scaling Law for CLIP Training") also cuts
the captions short, and both finish with a short phase at full size that recovers what the
model lost to the mismatch. Here `train.token_drop.until` is that first phase's share of
the steps; in it the image tower drops `patch_dropout` of its patches (open_clip's
PatchDropout, which the gradient cache replays exactly) and captions keep `text_length`
token ids (cut, with the end-of-text token moved into the last kept place). The phase is a
function of the step, so a resumed run is in the phase the original was.

CLIPA's low-resolution phase is not offered: open_clip's towers have position embeddings
of a fixed size, and patch dropout removes the same share of image tokens.
"""

from __future__ import annotations

import torch
from open_clip.transformer import PatchDropout

from vlp.core.config import RunConfig
from vlp.core.errors import UserError
from vlp.core.models import unwrap
from vlp.train.speedups import PAD_ID, allow_trimmed_text


class TokenDrop:
    """The schedule for one run: `prepare(model)` before DeepSpeed wraps it, then `at(step)` every step."""

    def __init__(self, cfg: RunConfig, total_steps: int):
        self.cfg = cfg.train.token_drop
        self.name = cfg.model.name
        self.full_patch_dropout = cfg.model.patch_dropout  # the second phase's (usually 0)
        self.first_phase_steps = round(self.cfg.until * total_steps)

    @property
    def enabled(self) -> bool:
        return self.first_phase_steps > 0 and (self.cfg.patch_dropout > 0 or self.cfg.text_length is not None)

    def prepare(self, model) -> None:
        """Give the image tower a PatchDropout to schedule, and the text tower short inputs; or a one-line error."""
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

    def in_first_phase(self, step: int) -> bool:
        return self.enabled and step < self.first_phase_steps

    def at(self, step: int, model) -> int | None:
        """Set the model's patch dropout for optimizer step `step` (0-based); the text length to cut to, or None."""
        if not self.enabled:
            return None
        first = self.in_first_phase(step)
        if self.cfg.patch_dropout > 0:
            unwrap(model).visual.patch_dropout.prob = self.cfg.patch_dropout if first else self.full_patch_dropout
        return self.cfg.text_length if first else None


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
