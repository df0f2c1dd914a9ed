"""Load the model under test, whatever form it comes in, and wrap it as an `Encoder`.

`--model` may be:

(a) an open_clip model name (ours from vlp/core/model_configs included) with a local
    weights file (`--weights`), or with random weights only when `--random-init`
    is given explicitly: a report of an untrained model by accident would be
    worse than an error;
(b) an exported `.safetensors` file whose metadata carries `vlp_model_name`
    and, for configs open_clip does not ship (our tiny ones), `vlp_model_config`
    (the open_clip model config as JSON);
(c) a training checkpoint directory holding `model.safetensors` in format (b).

Weights are read with safetensors or `torch.load(weights_only=True)` (by
open_clip's `load_checkpoint`): nothing is ever unpickled. Every mistake is a
one-line `UserError`, raised before any weights are read where possible.

The `Encoder` is the only thing tasks see: lists of images or texts in,
L2-normalised float32 CPU features out, in batches, under `torch.no_grad`,
optionally under bf16 autocast on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from vlp.core.config import ModelConfig
from vlp.core.errors import UserError, first_line
from vlp.core.models import (
    HF_HUB,
    LOCAL_DIR,
    MODEL_CONFIG_KEYS,
    check_model,
    check_pretrained,
    make_tokenizer,
    register_model_configs,
)
from vlp.core.weights import META_CONFIG, META_NAME, checked_model_name, find_weights, read_metadata

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    """What to build and what to load into it, resolved from the command line."""

    name: str  # an open_clip model name, registered by the time this exists
    weights: str | None  # local weights file, None for random init
    source: str  # what the user passed, for the report


def _register_config(name: str, config_json: str, path: Path) -> str:
    """Register the config stored in an export; return the name to create the model under.

    If open_clip already knows `name` with exactly this config, that name is used.
    Otherwise the config is registered (through open_clip's public `add_model_config`)
    under `name` plus a hash of the config, so a changed tiny config never
    overwrites the one the rest of the process sees under the plain name.
    """
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata '{META_CONFIG}' is not valid JSON") from None
    if config == {}:  # vlp.train.export writes {} for a model open_clip knows by name
        return name
    if not isinstance(config, dict) or not all(k in config for k in MODEL_CONFIG_KEYS):
        raise UserError(f"{path}: metadata '{META_CONFIG}' is not an open_clip model config")
    if open_clip.get_model_config(name) == config:
        return name
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    unique = f"{name}-{digest}"
    if open_clip.get_model_config(unique) is None:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / f"{unique}.json"
            file.write_text(json.dumps(config))
            open_clip.add_model_config(file)  # the registry keeps the entry after the file is gone
    return unique


def _from_export(path: Path, source: str) -> ModelSpec:
    meta = read_metadata(path)
    name = meta.get(META_NAME)
    if not name:
        raise UserError(
            f"{path} has no '{META_NAME}' metadata; pass the architecture: --model NAME --weights {path}"
        )
    name = checked_model_name(name, path)
    register_model_configs()
    if META_CONFIG in meta:
        name = _register_config(name, meta[META_CONFIG], path)
    if open_clip.get_model_config(name) is None:
        raise UserError(f"{path}: model '{name}' is unknown to open_clip and the file carries no config")
    return ModelSpec(name=name, weights=str(path), source=source)


def resolve_model(model: str, weights: str | None = None, random_init: bool = False) -> ModelSpec:
    """Turn `--model/--weights/--random-init` into a ModelSpec, or a one-line UserError."""
    path = Path(model).expanduser()
    if path.is_dir():
        if weights or random_init:
            raise UserError("--weights/--random-init go with a model name, not a checkpoint directory")
        # a checkpoint folder, or a training run's folder (its newest checkpoint)
        return _from_export(find_weights(path).resolve(), model)
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        if weights or random_init:
            raise UserError("--weights/--random-init go with a model name, not an exported weights file")
        return _from_export(path.resolve(), model)
    if model.startswith((HF_HUB, LOCAL_DIR)):  # open_clip reads config and weights from there
        if weights or random_init:
            raise UserError(f"--weights/--random-init: {model} brings its own weights")
        check_model(ModelConfig(name=model))
        return ModelSpec(name=model, weights=None, source=model)
    register_model_configs()
    if open_clip.get_model_config(model) is None:
        raise UserError(
            f"unknown model {model!r}: not a file, a checkpoint directory or an open_clip model name"
        )
    if weights and random_init:
        raise UserError("give either --weights or --random-init, not both")
    if not weights and not random_init:
        raise UserError(f"model {model!r} needs --weights FILE (or --random-init for an untrained model)")
    if weights:  # a file (made absolute) or one of open_clip's tags for the model
        weights = check_pretrained(str(Path(weights).expanduser()) if Path(weights).expanduser().is_file()
                                   else weights, model, key="--weights")
    return ModelSpec(name=model, weights=weights, source=model)


def _create(spec: ModelSpec) -> tuple[torch.nn.Module, Callable]:
    """open_clip's factory, weights included: safetensors or weights_only torch.load, strict keys,
    0-dim vs (1,) logit scale reconciled. Its errors become one-line UserErrors."""
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.weights, device="cpu", weights_only=True
        )
    except Exception as err:
        if _brings_weights(spec) or (spec.weights is not None and not Path(spec.weights).is_file()):  # a tag
            raise UserError(f"--model {spec.source}{' --weights ' + spec.weights if spec.weights else ''}: could "
                            f"not be loaded from the Hugging Face Hub or its cache ({type(err).__name__}: "
                            f"{first_line(err)[:160]}); with HF_HUB_OFFLINE=1 only what is cached is used") from None
        return _weights_error(spec, err)
    return model, preprocess


def _brings_weights(spec: ModelSpec) -> bool:
    """An hf-hub: or local-dir: model: config and weights come from there."""
    return spec.name.startswith((HF_HUB, LOCAL_DIR))


def _weights_error(spec: ModelSpec, err: Exception):
    """A local weights file that did not load, in one line."""
    if isinstance(err, RuntimeError | AssertionError):  # load_state_dict / open_clip's resize checks
        raise UserError(f"weights {spec.weights} do not fit model {spec.name}: {first_line(err)}") from None
    # a corrupt file, or a pickle weights_only refuses
    raise UserError(f"cannot load weights {spec.weights}: {type(err).__name__}: {err}") from None


class Encoder:
    """A dual encoder behind two calls: images -> features, texts -> features (normalised, float32, CPU).

    Batched and under no_grad; `bf16=True` adds bf16 autocast (GPU only). Images
    may be PIL images or paths; loading and the model's preprocessing of a batch
    run on `workers` threads (PIL releases the GIL while decoding and resizing).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str = "cpu",
        batch_size: int = 256,
        bf16: bool = False,
        workers: int = 4,
    ):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.workers = max(1, workers)
        scale = getattr(model, "logit_scale", None)  # open_clip keeps log(scale): the loss uses exp
        self.logit_scale = float(scale.detach().float().exp().reshape(-1)[0]) if isinstance(scale, torch.Tensor) \
            else None
        self.dim = int(self._probe_dim())

    def _probe_dim(self) -> int:
        """Embedding width, known before any real input (gathers across ranks need it up front)."""
        return self.encode_texts(["a"]).shape[1]

    def _autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def prepare(self, image: Image.Image | str | Path) -> torch.Tensor:
        """The model's preprocessing of one image: the tensor `encode_prepared` takes."""
        if not isinstance(image, Image.Image):
            with Image.open(image) as fh:
                image = fh.convert("RGB")
        return self.preprocess(image)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """(n, dim) normalised image features."""
        out = []
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(images), self.batch_size):
                out.append(self.encode_prepared(list(pool.map(self.prepare, images[start : start + self.batch_size]))))
        return torch.cat(out) if out else torch.empty(0, getattr(self, "dim", 0))

    @torch.no_grad()
    def encode_prepared(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """(n, dim) normalised features of images already through `prepare` (at most a batch)."""
        with self._autocast():
            feats = self.model.encode_image(torch.stack(list(tensors)).to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) normalised text features."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            with self._autocast():
                feats = self.model.encode_text(tokens)
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, getattr(self, "dim", 0))


def load_encoder(
    spec: ModelSpec,
    device: str = "cpu",
    batch_size: int = 256,
    bf16: bool = False,
    workers: int = 4,
    seed: int = 0,
) -> tuple[Encoder, dict[str, Any]]:
    """Build the model, load its weights, and return (encoder, description for the report)."""
    if bf16 and not device.startswith("cuda"):
        raise UserError("--precision bf16 needs a CUDA device (autocast on CPU is not used here)")
    torch.manual_seed(seed)  # random init is reproducible
    model, preprocess = _create(spec)
    tokenizer = make_tokenizer(ModelConfig(name=spec.name))  # a Hub tokenizer offline: one line
    encoder = Encoder(
        model, preprocess, tokenizer, device=device, batch_size=batch_size, bf16=bf16, workers=workers
    )
    info = {
        "source": spec.source,
        "name": spec.name,
        "weights": spec.weights,
        "random_init": spec.weights is None and not _brings_weights(spec),
        "seed": seed if spec.weights is None and not _brings_weights(spec) else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "embed_dim": encoder.dim,
        "image_size": _image_size(model),
    }
    return encoder, info


def _image_size(model: torch.nn.Module) -> int | list[int] | None:
    size = getattr(getattr(model, "visual", None), "image_size", None)
    return list(size) if isinstance(size, tuple) else size
