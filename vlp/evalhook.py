"""The periodic eval during training: the eval package on the checkpoint just written.

Every `train.eval_every` steps the trainer saves a checkpoint and every rank
runs `vlp eval` on it in-process (the eval package splits the encoding across
the training ranks and gathers the features), with `train.eval_suite`. The
report lands in `<output_dir>/eval/step_<N>/` and the suite's summary metrics
go into metrics.jsonl as `eval/<task>/<metric>`. Going through the checkpoint
means any ZeRO stage works (its model.safetensors is consolidated) and the
numbers are exactly what a later `vlp eval` of that checkpoint reports.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlp.train import Position, Trainer


def zero_shot_eval(trainer: Trainer, pos: Position, checkpoint) -> dict[str, float]:
    try:
        from eval.runner import RunOptions, run
    except ImportError:  # the eval package is optional for training
        if trainer.is_main:
            print("train.eval_every is set but the eval package is not installed; skipping", file=sys.stderr)
        return {}
    out = trainer.out / "eval" / checkpoint.name
    report = run(RunOptions(model=str(checkpoint), suite=trainer.cfg.train.eval_suite, out=out, progress=False))
    return {
        f"eval/{name}/{entry['metric']}": entry["value"]
        for name, entry in report["summary"].items()
        if isinstance(entry.get("value"), int | float)
    }
