"""Checkpoints that survive crashes, and resume from the newest good one.

Layout, under `<output_dir>/checkpoints/`:

    step_00000200/
        <DeepSpeed's files>      model + optimizer states (every ZeRO stage)
        rng_rank<r>.pt           each rank's torch CPU/CUDA and Python RNG states
        model.safetensors        the model as an open_clip state dict (for eval / export)
        config.yaml              the resolved run config
        vlp_state.json           step, data-stream position, ...; written LAST

A checkpoint is written into `.staging/` and renamed into place by rank 0
once every rank has written its part, then `vlp_state.json` marks it
complete. A crash at any moment leaves either the previous checkpoints
untouched or a staging folder that is ignored and cleared by the next save.
Loading never unpickles arbitrary objects: RNG files are read with
`torch.load(weights_only=True)`, the model with safetensors, and DeepSpeed
reads its own files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlp.errors import UserError

STATE_FILE = "vlp_state.json"
STAGING = ".staging"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """'auto' -> newest complete checkpoint (or None for a fresh start); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"config key 'train.resume': {resume} is not a complete vlp checkpoint")
    return path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    engine, root: Path, step: int, state: dict, config_yaml: str, model_weights, rank: int, keep_last: int
) -> Path:
    """Write checkpoint `step` (all ranks call this). `model_weights()` -> (state dict, name) or None.

    model_weights is called on every rank (a ZeRO-3 gather needs them all) and
    returns the open_clip state dict on rank 0.
    """
    staging = root / STAGING
    tag = tag_of(step)
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state={"vlp": state}, save_latest=False)
    torch.save(rng_state(), staging / tag / f"rng_rank{rank}.pt")
    weights = model_weights()
    _barrier()
    if rank == 0:
        from vlp.export import write_weights

        if weights is not None:
            write_weights(weights[0], staging / tag / "model.safetensors", weights[1])
        (staging / tag / "config.yaml").write_text(config_yaml)
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging / tag, final)
        _write_json(final / STATE_FILE, state)  # the completion mark, last
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restore model, optimizer and this rank's RNG from `path`; returns the vlp state."""
    load_path, client = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise UserError(f"DeepSpeed could not load the checkpoint in {path}")
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())
