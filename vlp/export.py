"""Export: trained weights as an open_clip state dict in safetensors.

The file loads in stock open_clip:

    open_clip.create_model_and_transforms(name, pretrained="model.safetensors")

(for our own model configs, register them first: `import vlp.models;
vlp.models.register_model_configs()`, or `open_clip.add_model_config` on the
`<name>.json` written next to the export). Its safetensors metadata names the
model (`vlp_model_name`) and carries the full model config
(`vlp_model_config`), so `vlp eval` can rebuild the model from the file alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlp.checkpoint import complete_checkpoints
from vlp.errors import UserError


def write_weights(state: Mapping[str, torch.Tensor], path: Path, model_name: str) -> Path:
    """Write an open_clip state dict (see vlp.models.to_open_clip_state_dict) with our metadata."""
    import open_clip

    from vlp.models import register_model_configs, to_open_clip_state_dict

    register_model_configs()
    config = open_clip.get_model_config(model_name)
    metadata = {"format": "pt", "vlp_model_name": model_name, "vlp_model_config": json.dumps(config or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(to_open_clip_state_dict(state), str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def find_weights(source: str | Path) -> Path:
    """A .safetensors file, a checkpoint folder, or a run folder (its newest checkpoint)."""
    source = Path(source)
    if source.is_file():
        return source
    if (source / "model.safetensors").is_file():
        return source / "model.safetensors"
    done = complete_checkpoints(source / "checkpoints") or complete_checkpoints(source)
    if done and (done[-1] / "model.safetensors").is_file():
        return done[-1] / "model.safetensors"
    raise UserError(f"{source}: no model.safetensors (expected a checkpoint, a run folder or a weights file)")


def export(source: str | Path, out: str | Path) -> tuple[Path, str]:
    """Copy the weights of `source` to `out` (atomically) plus `<name>.json` for custom configs."""
    src = find_weights(source)
    meta = read_metadata(src)
    name = meta.get("vlp_model_name")
    if not name:
        raise UserError(f"{src}: not written by vlp (no vlp_model_name in its metadata)")
    from safetensors.torch import load_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(load_file(str(src)), str(tmp), metadata=meta)
    os.replace(tmp, out)
    import open_clip

    from vlp.models import MODEL_CONFIG_DIR

    if (MODEL_CONFIG_DIR / f"{name}.json").is_file() or name not in open_clip.list_models():
        (out.parent / f"{name}.json").write_text(meta.get("vlp_model_config", "{}"))
    return out, name
