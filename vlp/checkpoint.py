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

from vlp.core.atomic import fsync_dir, write_json
from vlp.core.errors import UserError
from vlp.core.ownership import LOCK, FolderLock, claim, owner
from vlp.core.weights import STATE_FILE, WEIGHTS_FILE, complete_checkpoints, write_weights

STAGING = ".staging"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


RUN_HINT = "pass train.resume=auto to continue it, or choose a new train.output_dir"


def check_run_folder(out: Path, resume: str | None) -> None:
    """Before anything is written: refuse a folder vlp did not make, and a fresh run into an existing run.

    A fresh run (train.resume unset) into a folder that holds a run would mix two
    histories: metrics.jsonl, checkpoints of the same step, pruning by name.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file; choose a new train.output_dir")
    mark = owner(out)
    if mark is None:
        if any(p.name != LOCK for p in out.iterdir()):
            raise UserError(f"train.output_dir {out} is not empty and was not made by vlp; "
                            "choose a new train.output_dir")
        return
    if mark.get("kind") != "run":
        raise UserError(f"train.output_dir {out} holds vlp {mark.get('kind')!r} output; choose a new train.output_dir")
    history = (out / "metrics.jsonl").exists() or any((out / "checkpoints").glob("step_*"))
    if resume is None and history:
        raise UserError(f"train.output_dir {out} holds a training run; {RUN_HINT}")


def claim_run_folder(out: Path) -> FolderLock:
    """Mark `out` as a vlp run folder and lock it for this run (rank 0); release with `.__exit__()`."""
    claim(out, "run", "vlp train", "choose a new train.output_dir")
    return FolderLock(out).__enter__()


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
        if weights is not None:
            write_weights(weights[0], staging / tag / WEIGHTS_FILE, weights[1])
        (staging / tag / "config.yaml").write_text(config_yaml)
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging / tag, final)
        fsync_dir(root)
        write_json(final / STATE_FILE, state)  # the completion mark, last (fsyncs root)
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
