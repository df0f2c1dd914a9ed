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
Every file of a checkpoint is fsynced before the mark, which records each
file's size and sha256; `train.resume=auto` takes the newest checkpoint that
verifies and says which it skipped and why. Loading never unpickles
arbitrary objects: RNG files and DeepSpeed's own files (whose loader is
replaced on the engine, `use_safe_loading`) go through
vlp.core.safeload.safe_torch_load, the model through safetensors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from vlp.core.atomic import fsync_dir, write_atomic, write_json
from vlp.core.errors import UserError
from vlp.core.ownership import LOCK, FolderLock, claim, owner
from vlp.core.safeload import safe_torch_load
from vlp.core.smallfiles import read_small
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


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _seal(folder: Path) -> dict[str, dict]:
    """fsync every file of a finished checkpoint and the folder; return their sizes and hashes."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[path.name] = _file_record(path)
    fsync_dir(folder)
    return files


def _drop_partial(partial: Path, root: Path, step: int, err: BaseException) -> None:
    """A save failed: remove its partial folder (older checkpoints stay) and say why in one line if we can."""
    stat = os.statvfs(root)  # before the partial files are removed and free their space
    full = getattr(err, "errno", None) == errno.ENOSPC or stat.f_bavail * stat.f_frsize < (1 << 20)
    shutil.rmtree(partial, ignore_errors=True)
    if full:
        raise UserError(f"no space left on the device while saving checkpoint step {step} in {root}; "
                        "the partial checkpoint was removed, older checkpoints are intact") from None
    raise err


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None if its mark and every file it lists check out."""
    try:
        mark = json.loads(read_small(path / STATE_FILE, "checkpoint mark", 16 << 20))
    except (OSError, ValueError) as err:
        return f"completion mark {STATE_FILE} unreadable ({type(err).__name__})"
    files = mark.get("files") if isinstance(mark, dict) else None
    if not isinstance(files, dict) or not files:
        return f"completion mark {STATE_FILE} lists no files"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the mark says {want.get('size')}"
        if _file_record(file)["sha256"] != want.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None


def resolve_resume(resume: str | None, root: Path, say=print) -> Path | None:
    """'auto' -> the newest checkpoint that verifies (None: there is none yet, a fresh start); a path ->
    that checkpoint.

    A checkpoint that does not verify (a torn or truncated file, a missing one)
    is skipped with a line saying why, and the next older one is tried; when
    checkpoints exist and none verifies, that is an error, not a fresh start.
    """
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"config key 'train.resume': {resume} is not a complete vlp checkpoint")
        problem = verify_checkpoint(path)
        if problem:
            raise UserError(f"config key 'train.resume': checkpoint {path} does not verify: {problem}")
        return path
    found = complete_checkpoints(root)
    problems = []
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        say(f"skipping checkpoint {path}: {problem}")
        problems.append(f"{path.name}: {problem}")
    if found:  # starting over would overwrite those folders, and the run's history with them
        raise UserError(f"train.resume=auto: none of the {len(found)} checkpoints in {root} verifies (newest: "
                        f"{problems[0]}); resume one by path after repairing it, or choose a new train.output_dir")
    return None


# What a checkpoint's weights and optimizer files are shaped by: a resume must keep them.
SAME_ON_RESUME = (("model", "name"), ("train", "zero_stage"), ("train", "precision"), ("loss", "kind"))


def check_same_run(path: Path, run_config: dict) -> None:
    """A one-line error when the checkpoint was trained with another model, ZeRO stage, precision or loss kind
    (DeepSpeed would fail part way, with a shape mismatch or a missing optimizer file)."""
    try:
        saved = yaml.safe_load(read_small(path / "config.yaml", "checkpoint config", 1 << 20).decode("utf-8"))
    except (OSError, UserError, ValueError, yaml.YAMLError):
        return  # an older checkpoint without its config: the load reports any mismatch
    if not isinstance(saved, dict):
        return
    for section, key in SAME_ON_RESUME:
        then, now = (saved.get(section) or {}).get(key), run_config[section][key]
        if then is not None and then != now:
            raise UserError(f"config key 'train.resume': checkpoint {path} was trained with {section}.{key}={then}, "
                            f"this run has {section}.{key}={now}; resume with the same, or choose a new "
                            "train.output_dir")


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
    engine, root: Path, step: int, state: dict, config_yaml: str, model_weights, rank: int, keep_last: int,
    extra=None,
) -> Path:
    """Write checkpoint `step` (all ranks call this). `model_weights()` -> (state dict, name) or None.

    model_weights is called on every rank (a ZeRO-3 gather needs them all) and
    returns the open_clip state dict on rank 0. `extra(folder)`, on rank 0, writes more files
    into the checkpoint before it is sealed (the EMA teacher's weights).
    """
    staging = root / STAGING
    tag = tag_of(step)
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    _barrier()
    try:
        engine.save_checkpoint(str(staging), tag=tag, client_state={"vlp": state}, save_latest=False)
        torch.save(rng_state(), staging / tag / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        _drop_partial(staging / tag, root, step, err)
    weights = model_weights()
    _barrier()
    if rank == 0:
        try:
            if weights is not None:
                write_weights(weights[0], staging / tag / WEIGHTS_FILE, weights[1])
            if extra is not None:
                extra(staging / tag)
            write_atomic(staging / tag / "config.yaml", config_yaml)
            files = _seal(staging / tag)  # every byte on disk before the mark can say so
            final = root / tag
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging / tag, final)
            fsync_dir(root)
            write_json(final / STATE_FILE, {**state, "files": files})  # the completion mark, last
        except (OSError, RuntimeError) as err:
            _drop_partial(staging / tag, root, step, err)
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
        set_rng_state(safe_torch_load(rng_file))
    state = json.loads(read_small(path / STATE_FILE, "checkpoint mark", 16 << 20))
    state.pop("files", None)
    return state


def _deepspeed_checkpoint_types() -> list:
    """The plain data types DeepSpeed's optimizer files hold besides tensors: the allowlist."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_safe_loading(engine) -> None:
    """Make the engine read its checkpoint files through safe_torch_load (never arbitrary unpickling)."""
    allowed = _deepspeed_checkpoint_types()
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location, allowed)
