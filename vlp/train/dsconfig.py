"""The DeepSpeed config of a run, from three layers (later ones win):

1. the run config (`train.zero_stage`, `train.precision`, `optim.grad_clip`, ...);
2. a DeepSpeed JSON file named by `train.deepspeed_config` (launch/ds_zero*.json);
3. under `accelerate launch` with its DeepSpeed plugin: what the plugin read from
   the accelerate config file (its own DeepSpeed JSON, ZeRO stage, offload,
   mixed precision, clipping).

Values left as "auto" in layers 2-3 take the run config's value. Batch
sizes always come from the run config: gradient caching drives
accumulation itself, so `gradient_accumulation_steps` must stay 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vlp.core.config import RunConfig
from vlp.core.errors import UserError
from vlp.core.shipped import resolve
from vlp.core.smallfiles import read_small


def base_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "train_batch_size": t.batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # our AdamW is a torch optimizer handed to DeepSpeed (no fused-op compilation)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return ds


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """Whether a (merged) DeepSpeed config puts optimizer states off the accelerator (ZeRO-Offload).

    Then DeepSpeed insists on its own CPU Adam, configured by name in the JSON, instead of a
    client optimizer - whichever way the offload was asked for (train.offload_optimizer, a
    shipped JSON, accelerate's plugin)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return isinstance(offload, dict) and offload.get("device", "none") not in ("none", None)


def _merge(base: dict, over: dict) -> dict:
    """Deep-merge `over` into a copy of `base`; "auto" keeps the base value."""
    out = dict(base)
    for key, value in over.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


SECTIONS = ("bf16", "fp16", "zero_optimization", "optimizer", "scheduler")


def check_deepspeed_config(cfg: RunConfig) -> None:
    """The DeepSpeed JSON the config names exists and parses (before any setup)."""
    if cfg.train.deepspeed_config:
        _from_file(cfg.train.deepspeed_config)


def _from_file(path: str) -> dict:
    p = Path(resolve(path))  # launch/ds_zero2.json: the user's copy, else the shipped one
    if not p.is_file():
        raise UserError(f"config key 'train.deepspeed_config': no such file {path}")
    try:
        data = json.loads(read_small(p, "config key 'train.deepspeed_config':", 16 << 20))
    except ValueError as err:  # not JSON, or not text in any of JSON's encodings
        raise UserError(f"config key 'train.deepspeed_config': {path} is not valid JSON "
                        f"({getattr(err, 'msg', type(err).__name__)})") from None
    except RecursionError:
        raise UserError(f"config key 'train.deepspeed_config': {path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"config key 'train.deepspeed_config': {path} must hold a JSON object")
    for section in SECTIONS:  # what vlp reads from the merged config must have the shape DeepSpeed gives it
        if section in data and not isinstance(data[section], dict) and data[section] != "auto":
            raise UserError(f"config key 'train.deepspeed_config': {path}: {section!r} must be an object")
    stage = data.get("zero_optimization", {}).get("stage", 0) if isinstance(data.get("zero_optimization"), dict) else 0
    if stage != "auto" and (type(stage) is not int or not 0 <= stage <= 3):
        raise UserError(f"config key 'train.deepspeed_config': {path}: zero_optimization.stage must be 0, 1, 2 or 3")
    return data


def _from_accelerate() -> dict:
    """What `accelerate launch` (DeepSpeed plugin) was configured with; {} when not under it."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return {}
    from accelerate.utils import DeepSpeedPlugin  # reads the ACCELERATE_DEEPSPEED_* environment

    # The shipped accelerate file names launch/ds_zero2.json; outside a checkout that is the shipped copy.
    named = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if named and named != "none":
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = resolve(named)
    plugin = DeepSpeedPlugin()
    ds = dict(plugin.deepspeed_config)
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision in ("bf16", "fp16"):
        ds.setdefault(precision, {})["enabled"] = True
    return ds


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    ds = base_config(cfg, world_size)
    if cfg.train.deepspeed_config:
        ds = _merge(ds, _from_file(cfg.train.deepspeed_config))
    ds = _merge(ds, _from_accelerate())
    # batch bookkeeping is ours, whatever a file said
    ds["gradient_accumulation_steps"] = 1
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["train_batch_size"] = cfg.train.batch_size * world_size
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise UserError("DeepSpeed config enables both bf16 and fp16; pick one (train.precision)")
    return ds


def precision_of(ds: dict[str, Any]) -> str:
    """The precision the merged config really asks for (files may override train.precision)."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def zero_stage_of(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
