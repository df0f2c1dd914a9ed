"""Dual encoders from open_clip's factory, shaped for DeepSpeed and gradient caching.

We never rewrite encoders: every model is built by `open_clip.create_model_and_transforms`
from one of its own configs (ViT-B-32, RN50, convnext_base_w, ...) or from the small
configs shipped in `vlp/core/model_configs/` (registered with `open_clip.add_model_config`):

- `vlp-tiny`: 4-layer width-128 ViT at 64 px with patch 8 (64 patches), 4-layer width-128
  text tower, context 32, default 49408-token vocabulary: small enough to learn colour,
  shape, counting and binding on the synthetic set on a laptop CPU. Patch 8, not 16: the
  synthetic scenes hold 1-6 small shapes in
  64 px, and counting / spatial relations need patches smaller than an object; a 4x4 grid
  of 16 px patches puts several objects in one token.
- `vlp-tiny-p16`: the same with patch 16 (16 patches): the vision tower, most of the step,
  gets about 4x cheaper (a quarter of the tokens); for throughput-bound smoke runs.
- `vlp-tiny-rn`: open_clip's ModifiedResNet (stages [1,1,1,1], width 16, attention pooling)
  at 64 px with the same text tower. The demo's model: on the synthetic shapes it learns
  shape far sooner than vlp-tiny (ViT), and trains faster on a CPU (convolutions suit small
  images; a ViT needs far more data before its patches see shapes).
- `vlp-tiny-sigmoid`: `vlp-tiny` with the SigLIP init (t' = log 10, bias -10). Not named
  '*siglip*': open_clip gives such names a sentencepiece tokenizer it must download.
- `vlp-micro`: 32 px, 2 layers, width 64/32: for tests and CI only.

Two DeepSpeed-driven changes to the open_clip model:
`logit_scale` / `logit_bias` are built as shape-(1,) parameters (open_clip's
`nonscalar_logit_scale=True`) because `deepspeed.initialize` fails on 0-dim parameters;
`to_open_clip_state_dict` reshapes them back so exported weights load into stock open_clip.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from torch import nn

from vlp.core.config import LossConfig, ModelConfig
from vlp.core.errors import UserError, first_line
from vlp.core.smallfiles import read_small

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"  # our small configs for CPU runs
SOFTMAX_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGMOID_INIT_LOGIT_SCALE = math.log(10.0)
SIGMOID_INIT_LOGIT_BIAS = -10.0

HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"  # open_clip's model-name schemas: config and weights from there
MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")  # what every open_clip model config has
CONFIG_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,122}\.json$")  # the stem becomes the model's name
_registered = False


def register_model_configs() -> list[str]:
    """Make our JSON configs known to open_clip (idempotent); returns their names."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict | None:
    """open_clip's config for `name` (ours included), or None if it knows no such model."""
    register_model_configs()
    return open_clip.get_model_config(name)


def list_models() -> list[str]:
    """Every model name `create_model` accepts (open_clip's and ours)."""
    register_model_configs()
    return open_clip.list_models()


def _logit_init(name: str, loss_cfg: LossConfig | None) -> dict[str, float]:
    """Constructor overrides for the learnable temperature and bias.

    Softmax: t = log(1/0.07) unless the model config or loss config says otherwise.
    Sigmoid: t' = log 10 and b = -10 (SigLIP), and the model must have a bias.
    """
    if loss_cfg is None:
        return {}
    base = open_clip.get_model_config(name) or {}
    kwargs: dict[str, float] = {}
    if loss_cfg.init_logit_scale is not None:
        kwargs["init_logit_scale"] = loss_cfg.init_logit_scale
    elif loss_cfg.kind == "sigmoid":
        kwargs["init_logit_scale"] = base.get("init_logit_scale", SIGMOID_INIT_LOGIT_SCALE)
    if loss_cfg.init_logit_bias is not None:
        kwargs["init_logit_bias"] = loss_cfg.init_logit_bias
    elif loss_cfg.kind == "sigmoid":
        kwargs["init_logit_bias"] = base.get("init_logit_bias", SIGMOID_INIT_LOGIT_BIAS)
    return kwargs


def register_config_file(cfg: ModelConfig) -> None:
    """Make `model.config_file` known to open_clip under its file's name, or a one-line UserError."""
    if not cfg.config_file:
        return
    path = Path(cfg.config_file)
    what = f"config key 'model.config_file': {path}"
    if not path.is_file():
        raise UserError(f"{what}: no such file")
    if not CONFIG_FILE_NAME.match(path.name):
        raise UserError(f"{what}: name the file <model name>.json (letters, digits, '.', '_', '+', '-')")
    try:
        loaded = json.loads(read_small(path, "model config", 16 << 20).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{what}: not a JSON model config ({type(err).__name__})") from None
    missing = [k for k in MODEL_CONFIG_KEYS if not isinstance(loaded, dict) or k not in loaded]
    if missing:
        raise UserError(f"{what}: an open_clip model config needs {', '.join(missing)}")
    wrong = [k for k in ("vision_cfg", "text_cfg") if not isinstance(loaded[k], dict)]
    if wrong or isinstance(loaded["embed_dim"], bool) or not isinstance(loaded["embed_dim"], int):
        raise UserError(f"{what}: {(wrong or ['embed_dim'])[0]} must be "
                        f"{'a mapping' if wrong else 'an integer'} (open_clip's model config layout)")
    register_model_configs()
    open_clip.add_model_config(path)


def make_tokenizer(cfg: ModelConfig) -> Callable:
    """The model's tokenizer: `model.tokenizer` (a local HF folder) if given, else open_clip's for the model.

    open_clip fetches a Hugging Face tokenizer from the Hub for some models (SigLIP, the
    HF text towers); on a machine without the Hub that fails deep inside transformers,
    so such a failure becomes one line naming `model.tokenizer`.
    """
    text_cfg = (model_config(cfg.name) or {}).get("text_cfg", {})
    if cfg.tokenizer:
        if not (Path(cfg.tokenizer) / "tokenizer_config.json").is_file():
            raise UserError(f"config key 'model.tokenizer': {cfg.tokenizer} is not a Hugging Face tokenizer folder "
                            "(no tokenizer_config.json; save one with tokenizer.save_pretrained(DIR))")
        try:
            tokenizer = HFTokenizer(cfg.tokenizer, context_length=text_cfg.get("context_length", 77),
                                    tokenizer_mode=text_cfg.get("tokenizer_mode"),
                                    **text_cfg.get("tokenizer_kwargs", {}))
            tokenizer(["a test caption"])  # a folder that loads but cannot tokenise fails here, not in a worker
        except Exception as err:  # transformers and tokenizers raise many types for a broken folder
            raise UserError(f"config key 'model.tokenizer': {cfg.tokenizer} is not a usable Hugging Face tokenizer "
                            f"folder ({type(err).__name__}: {first_line(err)[:150]})") from None
        return tokenizer
    hub = text_cfg.get("hf_tokenizer_name") or ("a SigLIP vocabulary" if "siglip" in cfg.name.lower() else None)
    try:
        return open_clip.get_tokenizer(cfg.name)
    except Exception as err:  # transformers / huggingface_hub / fsspec raise many types when offline
        if not hub:
            raise
        raise UserError(f"model {cfg.name!r} needs the Hugging Face tokenizer {hub!r}, which could not be loaded "
                        f"({type(err).__name__}; offline?): give a local copy as model.tokenizer=DIR "
                        f"(e.g. `huggingface-cli download {hub} --local-dir DIR` where the Hub is reachable)") from None


def check_model(cfg: ModelConfig) -> None:
    """What can be checked without building the model: the name is known (a `local-dir:` folder or an
    `hf-hub:` repository's config readable), the weights file exists or the pretrained tag is open_clip's."""
    register_config_file(cfg)
    if cfg.name.startswith((HF_HUB, LOCAL_DIR)):
        _check_model_source(cfg)
    elif model_config(cfg.name) is None:
        raise UserError(f"config key 'model.name': unknown model {cfg.name!r} (open_clip's names or ours: "
                        f"{', '.join(register_model_configs())})")
    check_pretrained(cfg.pretrained, cfg.name)
    make_tokenizer(cfg)  # cheap, and the one part that may need the Hub


def _check_model_source(cfg: ModelConfig) -> None:
    """A `local-dir:` folder has open_clip's config; an `hf-hub:` repository's config can be had (Hub or cache)."""
    if cfg.pretrained:
        raise UserError(f"config key 'model.pretrained': the weights come from the folder or repository "
                        f"{cfg.name!r}; drop model.pretrained")
    if cfg.name.startswith(LOCAL_DIR):
        folder = Path(cfg.name[len(LOCAL_DIR):])
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"config key 'model.name': {cfg.name!r}: no open_clip_config.json in {folder} "
                            "(`vlp export RUN --format open_clip-dir --out DIR` writes such a folder)")
    _from_hub(cfg.name, "model.name", open_clip.get_model_config, cfg.name)


def _from_hub(what: str, key: str, call: Callable, *args, **kwargs):
    """`call(...)`, which may read the Hugging Face Hub (or its cache); its failure in one line."""
    try:
        return call(*args, **kwargs)
    except UserError:
        raise
    except Exception as err:  # huggingface_hub, open_clip and the OS raise many types offline
        raise UserError(f"config key '{key}': {what} could not be loaded from the Hugging Face Hub or its cache "
                        f"({type(err).__name__}: {first_line(err)[:160]}); with HF_HUB_OFFLINE=1 only what is "
                        "cached under HF_HOME is used") from None


def check_pretrained(pretrained: str | None, name: str, key: str = "config key 'model.pretrained'") -> str | None:
    """A local weights file, or one of open_clip's pretrained tags for the model (resolved and cached by
    open_clip through the Hugging Face Hub)."""
    if pretrained is None:
        return None
    p = Path(pretrained)
    if p.is_file():
        if p.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
            raise UserError(f"{key}: expected .safetensors/.pt/.pth/.bin, got {p.name}")
        return str(p.resolve())  # absolute: open_clip tries a string without '/' as a tag first
    if not name.startswith((HF_HUB, LOCAL_DIR)) and open_clip.get_pretrained_cfg(name, pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name) if model_config(name) else []
    if tags and not ("/" in pretrained or p.suffix):
        raise UserError(f"{key}: {pretrained!r} is neither a file nor one of open_clip's "
                        f"tags for {name} ({', '.join(tags)})")
    raise UserError(f"{key}: weights file not found: {pretrained}"
                    + (f" (open_clip's tags for {name}: {', '.join(tags)})" if tags else ""))


def create_model(
    cfg: ModelConfig,
    loss_cfg: LossConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    aug_cfg: dict[str, Any] | None = None,
) -> tuple[nn.Module, Callable, Callable, Callable]:
    """Build (model, preprocess_train, preprocess_val, tokenizer) from the typed config.

    The model is fp32 (DeepSpeed or autocast handle lower precision), with shape-(1,)
    logit scale/bias. `cfg.pretrained` must be a local weights file; it is read with
    safetensors or `torch.load(weights_only=True)` by open_clip (no arbitrary unpickling),
    and 0-dim or (1,)-shaped logit params both load.
    """
    register_model_configs()
    register_config_file(cfg)
    if not cfg.name.startswith((HF_HUB, LOCAL_DIR)) and open_clip.get_model_config(cfg.name) is None:
        raise UserError(f"config key 'model.name': unknown model {cfg.name!r} (see vlp.core.models.list_models())")
    pretrained = check_pretrained(cfg.pretrained, cfg.name)
    build = partial(
        _hub_errors_in_one_line,
        cfg.name,
        open_clip.create_model_and_transforms,
        cfg.name,
        pretrained=pretrained,
        precision="fp32",
        device=device,
        force_patch_dropout=cfg.patch_dropout if cfg.patch_dropout > 0 else None,
        aug_cfg=aug_cfg,
        weights_only=True,
        nonscalar_logit_scale=True,
        **_logit_init(cfg.name, loss_cfg),
    )
    # a tag, an hf-hub: repository or a local-dir: folder: open_clip resolves it (the Hub or its cache)
    fetched = cfg.name.startswith((HF_HUB, LOCAL_DIR)) or (pretrained is not None and not Path(pretrained).is_file())
    where = ("model.pretrained", repr(cfg.pretrained)) if cfg.pretrained else ("model.name", repr(cfg.name))
    model, preprocess_train, preprocess_val = _from_hub(where[1], where[0], build) if fetched else _local(build, cfg)
    _lock_towers(model, cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, preprocess_train, preprocess_val, make_tokenizer(cfg)


def _local(build: Callable, cfg: ModelConfig):
    """`build()` for a model with local weights (or none): weights that do not load, in one line."""
    try:
        return build()
    except UserError:
        raise
    except Exception as err:  # a pickle weights_only refuses, a corrupt file, another model's weights
        if cfg.pretrained is None:
            raise
        why = re.sub(r"\x1b\[[0-9;]*m", "", first_line(err))[:200]  # torch's message carries terminal colours
        raise UserError(f"config key 'model.pretrained': {cfg.pretrained} could not be loaded into model "
                        f"{cfg.name!r} ({type(err).__name__}: {why}); vlp reads tensors only "
                        "(safetensors, or a torch file of plain tensors)") from None


def _lock_towers(model: nn.Module, cfg: ModelConfig) -> None:
    """open_clip's own (partial) locking, as open_clip_train's --lock-image-* / --lock-text-* flags do it."""
    try:
        if cfg.lock_image:
            model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                                   freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
        if cfg.lock_text:
            model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers,
                                  freeze_layer_norm=cfg.lock_text_freeze_layer_norm)
    except (AssertionError, NotImplementedError) as err:  # open_clip asserts where a tower cannot be partly locked
        raise UserError(f"config keys 'model.lock_*': open_clip cannot lock model {cfg.name!r} that way "
                        f"({first_line(err) or type(err).__name__}); lock the whole tower (unlocked groups/layers 0)"
                        ) from None


def _hub_errors_in_one_line(name: str, build: Callable, *args, **kwargs):
    """`build(...)`; a model whose text tower comes from the Hugging Face Hub fails in one line offline."""
    hub = (model_config(name) or {}).get("text_cfg", {}).get("hf_model_name")
    try:
        return build(*args, **kwargs)
    except OSError as err:  # transformers and huggingface_hub report an unreachable Hub as OSError subclasses
        if not hub:
            raise
        raise UserError(f"model {name!r} builds its text tower from the Hugging Face model {hub!r}, which could not "
                        f"be loaded ({type(err).__name__}; offline?): fetch it into the Hugging Face cache "
                        "(HF_HOME) where the Hub is reachable, or use a model without an HF text tower") from None


@dataclass
class ModelOutput:
    """What one forward returns, whatever the model class: normalised embeddings + logit params."""

    image: torch.Tensor | None
    text: torch.Tensor | None
    logit_scale: torch.Tensor  # exp(t), shape (1,)
    logit_bias: torch.Tensor | None


def parse_output(out: Any) -> ModelOutput:
    """Normalise open_clip's tuple or dict forward output."""
    if isinstance(out, Mapping):
        return ModelOutput(
            out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias")
        )
    if len(out) == 4:
        return ModelOutput(out[0], out[1], out[2], out[3])
    return ModelOutput(out[0], out[1], out[2], None)


def forward(model: Any, images: torch.Tensor | None, texts: torch.Tensor | None) -> ModelOutput:
    """One call of the model (module, DDP or DeepSpeed engine) through `__call__`.

    Going through `__call__` matters: DDP and ZeRO-3 hang their hooks on it, and ZeRO-3
    gathers the top-level parameters (logit scale, text projection) only there.
    """
    return parse_output(model(images, texts))


def encode(model: Any, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (image, text) embeddings; the model's mode (train/eval) is left as it is."""
    out = forward(model, images, texts)
    return out.image, out.text


def unwrap(model: Any) -> nn.Module:
    """The bare open_clip module inside DDP / DeepSpeed wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def image_normalization(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) the model's image tower expects its input normalised with.

    The one place they are decided: open_clip records them on the vision tower
    (`visual.image_mean` / `image_std`, from the model's preprocess config); a model
    without them gets open_clip's default, the OpenAI CLIP statistics. `model` may be
    wrapped (DDP, DeepSpeed engine).
    """
    visual = unwrap(model).visual
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def to_open_clip_state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict stock open_clip loads: CPU fp32 copies, 0-dim logit scale/bias, no wrapper prefix.

    Accepts the model (or a wrapper around it) or an already gathered state dict, e.g. from
    a DeepSpeed checkpoint consolidated to fp32.
    """
    state = model if isinstance(model, Mapping) else unwrap(model).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        value = value.detach().to("cpu").clone().contiguous()
        if value.is_floating_point():
            value = value.float()
        if key in ("logit_scale", "logit_bias"):
            value = value.reshape(())
        out[key] = value
    return out
