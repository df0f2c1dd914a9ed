"""Helpers shared by the eval tests (a tiny open_clip model, image files, suites), plus their own checks.

Imported by the other eval test modules as `from test_eval_support import ...`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

TINY = "eval-test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_registered = False


def register_tiny() -> str:
    """Register the tiny config with open_clip (once per process) and return its name."""
    global _registered
    import open_clip

    if not _registered:
        folder = Path(tempfile.mkdtemp(prefix="eval-test-config-"))
        (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(folder / f"{TINY}.json")
        _registered = True
    return TINY


def tiny_model(seed: int = 0):
    """(model, preprocess, tokenizer) of the tiny config, random weights from `seed`, eval mode."""
    import open_clip

    register_tiny()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY)


def tiny_encoder(seed: int = 0, batch_size: int = 8):
    from vlp.eval.encoders import Encoder

    model, preprocess, tokenizer = tiny_model(seed)
    return Encoder(model, preprocess, tokenizer, batch_size=batch_size, workers=2)


def export_tiny(path: Path, seed: int = 0, with_config: bool = True) -> Path:
    """The tiny model saved the way our export does: open_clip state dict + vlp_* safetensors metadata."""
    from safetensors.torch import save_file

    model, _, _ = tiny_model(seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"vlp_model_name": TINY}
    if with_config:
        meta["vlp_model_config"] = json.dumps(TINY_CONFIG)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def solid(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def noise(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8), "RGB")


def save(image: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def write_suite(path: Path, tasks: list[dict], name: str = "test") -> Path:
    path.write_text(yaml.safe_dump({"name": name, "tasks": tasks}, sort_keys=False))
    return path


# ---------------------------------------------------------------------- the helpers' own checks


def test_tiny_model_is_deterministic_and_small():
    a, _, tok = tiny_model(seed=3)
    b, _, _ = tiny_model(seed=3)
    text = tok(["a red circle"])
    assert torch.equal(a.encode_text(text), b.encode_text(text))
    assert a.visual.image_size == (32, 32)


def test_export_carries_the_metadata(tmp_path):
    from safetensors import safe_open

    path = export_tiny(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        assert fh.get_tensor("logit_scale").dim() == 0
    assert meta["vlp_model_name"] == TINY and json.loads(meta["vlp_model_config"]) == TINY_CONFIG
