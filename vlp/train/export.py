"""`vlp export`: a run's trained weights in the forms stock open_clip loads.

- `--format safetensors` (default): one open_clip state dict,
  `open_clip.create_model_and_transforms(name, pretrained="model.safetensors")`
  (for our own model configs, `open_clip.add_model_config("model.json")`, the
  config written next to it under the output's name, and the model's name is then
  the file's: `create_model_and_transforms("model", pretrained="model.safetensors")`).
- `--format open_clip-dir`: a folder in the layout of open_clip's Hub models
  (`open_clip_config.json` with `model_cfg` + `preprocess_cfg`, `open_clip_model.safetensors`,
  a README, and the tokenizer files for a model with a Hugging Face tokenizer), which
  `open_clip.create_model_and_transforms("local-dir:DIR")` loads with nothing registered,
  and which uploaded as a Hub repo loads as `hf-hub:ORG/NAME`.

The weights' metadata names the model and carries its full config (vlp.core.weights),
so `vlp eval` rebuilds the model from either form alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
from safetensors.torch import load_file

from vlp.core.atomic import write_atomic
from vlp.core.errors import UserError
from vlp.core.models import MODEL_CONFIG_DIR, register_model_configs
from vlp.core.weights import (
    META_CONFIG,
    META_NAME,
    OPEN_CLIP_DIR_WEIGHTS,
    STATE_FILE,
    checked_model_name,
    find_weights,
    read_metadata,
    write_weights,
)

FORMATS = ("safetensors", "open_clip-dir")


def _source(source: str | Path) -> tuple[Path, dict[str, str], str]:
    """(weights file, its metadata, model name) of a vlp checkpoint, run folder or export."""
    src = find_weights(source)
    meta = read_metadata(src)
    name = meta.get(META_NAME)
    if not name:
        raise UserError(f"{src}: not written by vlp (no {META_NAME} in its metadata)")
    return src, meta, checked_model_name(name, src)


def export(source: str | Path, out: str | Path) -> tuple[Path, str]:
    """Copy the weights of `source` to `out` (atomically), plus, for a config open_clip does not ship, the
    model config beside it as `out` with `.json` for its suffix: a name fixed by the output, never by the
    weights' metadata (a model named `settings` must not overwrite a user's settings.json)."""
    src, meta, name = _source(source)
    out = Path(out)
    _refuse_checkpoint_files(src, out)
    register_model_configs()
    config = out.with_suffix(".json")
    side = (MODEL_CONFIG_DIR / f"{name}.json").is_file() or name not in open_clip.list_models()
    if side and config.exists() and (not config.is_file() or config.read_bytes() != meta.get(META_CONFIG, "{}").encode()):
        raise UserError(f"--out {out}: its model config would be written to {config}, which exists with other "
                        "content; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_weights(load_file(str(src)), out, name, metadata=meta)
    if side:
        write_atomic(config, meta.get(META_CONFIG, "{}"))
    return out, name


def _refuse_checkpoint_files(src: Path, out: Path) -> None:
    """An export never replaces its source, nor writes into a checkpoint (whose mark records every
    file's checksum: a changed file would make the checkpoint fail to verify)."""
    target = out.resolve()
    if target == src.resolve():
        raise UserError(f"--out {out} is the weights being exported; choose another --out")
    for folder in target.parents:
        if (folder / STATE_FILE).is_file():
            raise UserError(f"--out {out} is inside the checkpoint {folder}, whose files are checksummed; choose "
                            "another --out")


def export_open_clip_dir(source: str | Path, out: str | Path, tokenizer: str | None = None) -> tuple[Path, str]:
    """`out/` in open_clip's Hub layout; `tokenizer` (a local HF tokenizer folder) is copied in."""
    src, meta, name = _source(source)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder (an open_clip-dir export writes a new one)")
    model_cfg = _model_cfg(name, meta, src)
    text_cfg = model_cfg.setdefault("text_cfg", {})
    if tokenizer:
        if not (Path(tokenizer) / "tokenizer_config.json").is_file():
            raise UserError(f"--tokenizer {tokenizer}: not a Hugging Face tokenizer folder (no tokenizer_config.json)")
        # local-dir: loads an HF tokenizer from the folder itself whenever the config names one
        text_cfg["hf_tokenizer_name"] = text_cfg.get("hf_tokenizer_name") or Path(tokenizer).name
    elif text_cfg.get("hf_tokenizer_name"):
        raise UserError(f"model {name!r} uses the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}: give its "
                        "folder as --tokenizer DIR so the export is complete")
    out.mkdir(parents=True, exist_ok=True)
    write_weights(load_file(str(src)), out / OPEN_CLIP_DIR_WEIGHTS, name, metadata=meta)
    config = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(name, out / OPEN_CLIP_DIR_WEIGHTS)}
    write_atomic(out / "open_clip_config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer:
        for file in sorted(Path(tokenizer).iterdir()):
            if file.is_file():
                shutil.copy2(file, out / file.name)
    write_atomic(out / "README.md", _model_card(name, src))
    return out, name


def _model_cfg(name: str, meta: dict[str, str], src: Path) -> dict:
    """The full open_clip model config: from the weights' metadata, or open_clip's own by name."""
    carried = json.loads(meta.get(META_CONFIG) or "{}")
    if carried:
        return carried
    register_model_configs()
    known = open_clip.get_model_config(name)
    if known is None:
        raise UserError(f"{src}: model {name!r} is unknown to open_clip and the file carries no config")
    return dict(known)


def _preprocess_cfg(name: str, weights: Path) -> dict:
    """What open_clip's factory decides for the model's image preprocessing (size, mean, std, ...).

    Read off a model built from the exported weights, which also proves they load.
    """
    register_model_configs()
    model = open_clip.create_model(name, pretrained=str(weights), weights_only=True)
    return dict(model.visual.preprocess_cfg)


def _model_card(name: str, src: Path) -> str:
    """README.md as the Hugging Face Hub reads it: its metadata block (library, tags) first, so the Hub lists
    the folder as an open_clip model; no local path (a card travels, a path on this machine means nothing)."""
    return ("---\nlibrary_name: open_clip\ntags:\n- clip\n- open_clip\n- vlp\n"
            "pipeline_tag: zero-shot-image-classification\n---\n\n"
            f"# {name}\n\nAn open_clip model (`{name}`) exported by vlp from the weights file `{src.name}`.\n\n"
            "```python\nimport open_clip\n"
            "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:PATH/TO/THIS/FOLDER')\n"
            "tokenizer = open_clip.get_tokenizer('local-dir:PATH/TO/THIS/FOLDER')\n```\n\n"
            "From the Hub: `open_clip.create_model_and_transforms('hf-hub:USER/REPO')`.\n")
