"""`vlp export`: a run's trained weights as an open_clip state dict in safetensors.

The file loads in stock open_clip:

    open_clip.create_model_and_transforms(name, pretrained="model.safetensors")

(for our own model configs, add the `<name>.json` written next to the export
with `open_clip.add_model_config`). Its metadata names the model and carries
the full model config (vlp.core.weights), so `vlp eval` rebuilds the model
from the file alone.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
from safetensors.torch import load_file

from vlp.core.atomic import write_atomic
from vlp.core.errors import UserError
from vlp.core.models import MODEL_CONFIG_DIR, register_model_configs
from vlp.core.weights import (
    META_CONFIG,
    META_NAME,
    checked_model_name,
    find_weights,
    read_metadata,
    write_weights,
)


def export(source: str | Path, out: str | Path) -> tuple[Path, str]:
    """Copy the weights of `source` to `out` (atomically) plus `<name>.json` for custom configs."""
    src = find_weights(source)
    meta = read_metadata(src)
    name = meta.get(META_NAME)
    if not name:
        raise UserError(f"{src}: not written by vlp (no {META_NAME} in its metadata)")
    name = checked_model_name(name, src)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_weights(load_file(str(src)), out, name, metadata=meta)
    register_model_configs()
    if (MODEL_CONFIG_DIR / f"{name}.json").is_file() or name not in open_clip.list_models():
        write_atomic(out.parent / f"{name}.json", meta.get(META_CONFIG, "{}"))
    return out, name
