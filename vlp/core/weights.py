"""Trained weights on disk: the safetensors file vlp writes, its metadata, and where a run keeps it.

A vlp weights file is an open_clip state dict in safetensors whose metadata
names the model (`vlp_model_name`) and carries its open_clip config as JSON
(`vlp_model_config`), so the file alone rebuilds the model. Training writes
one into every checkpoint (`<run>/checkpoints/step_N/model.safetensors`);
export, eval and any other reader find it through `find_weights`. A
checkpoint is complete once its `vlp_state.json` exists (written last).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from vlp.core.atomic import write_atomic
from vlp.core.errors import UserError
from vlp.core.models import model_config, to_open_clip_state_dict

META_NAME = "vlp_model_name"
META_CONFIG = "vlp_model_config"
STATE_FILE = "vlp_state.json"  # a checkpoint's completion mark
WEIGHTS_FILE = "model.safetensors"
OPEN_CLIP_DIR_WEIGHTS = "open_clip_model.safetensors"  # in `vlp export --format open_clip-dir` folders
# A model name read from a file is a name, never a path: it names files (`<name>.json`) later.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_weights(source: str | Path) -> Path:
    """A .safetensors file, a checkpoint folder, or a run folder (its newest checkpoint)."""
    source = Path(source)
    if source.is_file():
        return source
    for name in (WEIGHTS_FILE, OPEN_CLIP_DIR_WEIGHTS):
        if (source / name).is_file():
            return source / name
    done = complete_checkpoints(source / "checkpoints") or complete_checkpoints(source)
    if done and (done[-1] / WEIGHTS_FILE).is_file():
        return done[-1] / WEIGHTS_FILE
    raise UserError(f"{source}: no {WEIGHTS_FILE} (expected a checkpoint, a run folder or a weights file)")


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of `path` (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise UserError(f"cannot read safetensors file {path}: {err}") from None


def checked_model_name(name: str, path: Path) -> str:
    """`name` (read from `path`'s metadata) if it is a plain model name; a one-line UserError otherwise."""
    if not MODEL_NAME.match(name) or ".." in name:
        raise UserError(f"{path}: metadata {META_NAME} {name[:80]!r} is not a model name "
                        "(letters, digits, '.', '_', '+', '-'); the file is not usable as is")
    return name


def write_weights(
    state: Mapping[str, torch.Tensor], path: Path, model_name: str, metadata: dict[str, str] | None = None
) -> Path:
    """Write an open_clip state dict with vlp's metadata, atomically."""
    meta = metadata or {
        "format": "pt",
        META_NAME: model_name,
        META_CONFIG: json.dumps(model_config(model_name) or {}),
    }
    write_atomic(path, safetensors_bytes(to_open_clip_state_dict(state), metadata=meta))
    return Path(path)
