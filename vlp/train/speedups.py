"""Faster training steps that keep the numbers (to float rounding): trimmed text, channels-last, compile.

Each is on by default wherever it is exact for the model at hand (`"auto"`, decided by
`choose_speedups`; the trainer prints one line of what is on); true / false force it.

- Trimmed text (`train.trim_text`): open_clip pads every caption to the model's context
  (77 for CLIP, 32 for vlp-tiny) and its text tower does the work for every pad. In a
  causal text tower that pools at the end-of-text token, no position attends to a later
  one, so the pads after a batch's longest caption change nothing the model returns: the
  batch is cut there (rounded up to a multiple of 8, so a compiled model sees a few shapes)
  and the text tower does only the work the captions need. open_clip's `CLIP.encode_text`
  adds the full-length positional embedding and mask, so such models get an
  `encode_text` that slices both to the length it is given (same modules, same weights).
- Direct attention (`train.direct_attention`): open_clip's blocks run self-attention through
  nn.MultiheadAttention, which takes sequence-first tensors: each block transposes its
  batch-first input, copies q/k/v into a head layout and the output back (a tenth of a
  small model's forward+backward on a CPU). The blocks here call scaled_dot_product_attention on
  views of the packed q/k/v projection instead, with the same weights, and tell it that a
  causal text tower's mask is causal (`is_causal`, which lets a GPU pick its flash kernel,
  as an explicit mask does not).
- Channels-last (`train.channels_last`): convolutions (ResNet, ConvNeXt towers) run
  faster on NHWC tensors with oneDNN and cuDNN; the image tower's weights and its input
  images take that layout, after `deepspeed.initialize` (its broadcast of the weights views
  them as dense bytes). ZeRO stage 0 only: ZeRO >= 1 points the weights into its own flat
  buffers, and a new layout would cut them loose from the optimizer's updates.
- Compile (`train.compile`): `engine.compile()` compiles the module DeepSpeed trains in
  place (state-dict keys unchanged), so both gradient-cache passes and every rank run the
  compiled graphs; `compile_seconds()` is what the trainer logs as compile_s.
- The optimizer step is already one fused kernel (vlp.train.schedule.make_optimizer).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch._dynamo
import torch._dynamo.utils
import torch._inductor.config
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, text_global_pool

from vlp.core.config import TrainConfig
from vlp.core.errors import UserError
from vlp.core.models import unwrap

PAD_ID = 0  # open_clip's tokenizers pad with 0
TRIM_MULTIPLE = 8


def _text_tower(model) -> tuple[object, torch.Tensor | None, str, bool] | None:
    """(tower, causal mask, pooling, appends a class token) of open_clip's own text towers; None for others."""
    m = unwrap(model)
    text = getattr(m, "text", None)
    if text is None:  # CLIP: the tower's parts live on the model itself
        return m, getattr(m, "attn_mask", None), getattr(m, "text_pool_type", "argmax"), False
    if isinstance(text, TextTransformer):  # CustomTextCLIP
        return text, text.attn_mask, text.pool_type, text.cls_emb is not None
    return None  # a Hugging Face text tower: bidirectional, its own padding


@dataclass(frozen=True)
class Speedups:
    """Which exact speed-ups a run uses (train.trim_text, train.direct_attention, train.channels_last)."""

    trim_text: bool
    direct_attention: bool
    channels_last: bool

    def line(self) -> str:
        on = [name for name, value in vars(self).items() if value]
        off = [name for name, value in vars(self).items() if not value]
        return f"speed-ups on: {', '.join(on) or 'none'}" + (f"; off: {', '.join(off)}" if off else "")


def choose_speedups(cfg: TrainConfig, model, name: str, zero_stage: int) -> Speedups:
    """The config's switches, with "auto" decided from the model: each on wherever it keeps the numbers
    (and, for channels-last, helps: convolutional image towers, ZeRO stage 0)."""
    trim = _trim_is_exact(model) if cfg.trim_text == "auto" else cfg.trim_text
    if trim:
        allow_trimmed_text(model, name)
    channels = cfg.channels_last
    if channels == "auto":
        channels = zero_stage == 0 and _convolutional(model)
    return Speedups(bool(trim), cfg.direct_attention is not False, bool(channels))


def _convolutional(model) -> bool:
    """An image tower of convolutions (a ViT has one: its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in unwrap(model).visual.modules()) > 1


def _trim_is_exact(model) -> bool:
    tower = _text_tower(model)
    return not (tower is None or tower[1] is None or tower[2] not in ("argmax", "eos") or tower[3])


def allow_trimmed_text(model, name: str) -> None:
    """Make the model take token ids shorter than its context, or a one-line UserError if that is not exact."""
    if not _trim_is_exact(model):
        raise UserError(f"config key 'train.trim_text': model {name!r}'s text tower is not causal with end-of-text "
                        "pooling, so cutting its padding would change what it computes; set train.trim_text=false")
    module = unwrap(model)
    if getattr(module, "text", None) is None:  # TextTransformer slices its own embedding and mask
        module.encode_text = types.MethodType(_encode_text_any_length, module)


def _encode_text_any_length(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's CLIP.encode_text, with the positional embedding and causal mask cut to the input's length."""
    cast_dtype = self.transformer.get_cast_dtype()
    n = text.shape[1]
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:n].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def trim_tokens(texts: torch.Tensor, hard_negatives: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids [B, L] (and hard negatives [B, k, L]) cut after the last column any caption uses.

    Both are cut to the same length (the step encodes them together). Call it on the host tensors
    the loader made: finding the length reads them, which on a device would be a sync.
    """
    used = (texts != PAD_ID).any(0)
    if hard_negatives is not None:
        used |= (hard_negatives != PAD_ID).flatten(0, 1).any(0)
    nonzero = used.nonzero()
    last = int(nonzero.max()) + 1 if len(nonzero) else 1
    length = min(texts.shape[1], -(-last // TRIM_MULTIPLE) * TRIM_MULTIPLE)
    return texts[:, :length], None if hard_negatives is None else hard_negatives[..., :length]


def use_direct_attention(model) -> int:
    """Self-attention of open_clip's blocks straight through SDPA (same weights); returns how many blocks."""
    tower = _text_tower(model)
    causal = set()
    if tower is not None and _is_causal_mask(tower[1]) and not tower[3]:  # an appended class token adds a mask
        causal = {id(block) for block in tower[0].transformer.resblocks}
    count = 0
    for module in unwrap(model).modules():
        if isinstance(module, ResidualAttentionBlock) and module.attn.batch_first:
            module.attention = types.MethodType(_direct_attention, module)
            module.causal_mask = id(module) in causal  # every mask it is given is the causal one (maybe cut)
            count += 1
    return count


def _is_causal_mask(mask: torch.Tensor | None) -> bool:
    """open_clip's causal mask: -inf above the diagonal, 0 elsewhere."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())


def _direct_attention(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ResidualAttentionBlock.attention for batch-first self-attention, without nn.MultiheadAttention's copies."""
    if k_x is not None or v_x is not None:  # cross-attention: open_clip's own path
        return ResidualAttentionBlock.attention(self, q_x, k_x, v_x, attn_mask)
    attn = self.attn
    batch, length, width = q_x.shape
    qkv = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias).view(batch, length, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, length, head width], views
    causal = attn_mask is not None and self.causal_mask and attn_mask.shape == (length, length)
    if causal or attn_mask is None:
        mask = None
    else:  # as open_clip passes it: additive, in the activations' dtype; per-head masks come [batch*heads, L, L]
        mask = attn_mask.to(q_x.dtype)
        mask = mask.view(batch, -1, length, length) if mask.dim() == 3 else mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                         dropout_p=attn.dropout if self.training else 0.0)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))


def use_channels_last(model) -> None:
    """The image tower's weights in NHWC layout (its inputs must be made channels-last too)."""
    unwrap(model).visual.to(memory_format=torch.channels_last)


def compile_engine(engine) -> None:
    """torch.compile the engine's module in place (inductor on CPU and GPU)."""
    # Each text length (trimmed batches), grad mode (the two gradient-cache passes) and tower
    # subset is its own graph; the default limit of 8 would fall back to eager partway.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Random ops (patch dropout's mask) drawn as eager draws them, from the global generator: the
    # gradient cache's replay of pass 1's RNG and the equality with an eager run both rely on it.
    torch._inductor.config.fallback_random = True
    engine.compile()


def compile_seconds() -> float:
    """Seconds spent compiling so far in this process (forward and backward graphs)."""
    try:
        return float(torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # a private API: its absence costs only the metric
        return 0.0
