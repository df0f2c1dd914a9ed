"""The periodic eval during training: the eval package on the checkpoint just written.

The trainer knows nothing of evaluation: it takes a callback
(`Trainer(cfg, evaluate=...)`) that it calls with each checkpoint it saves
at a `train.eval_every` step. `periodic_eval` is that callback: every rank
runs `vlp eval` on the checkpoint in-process (the eval package splits the
encoding across the training ranks and gathers the features), with
`train.eval_suite`. The report lands in `<output_dir>/eval/step_<N>/` and
the suite's summary metrics go to `<output_dir>/eval.jsonl` as
`eval/<task>/<metric>`. Going through the checkpoint means any ZeRO stage
works (its model.safetensors is consolidated) and the numbers are exactly
what a later `vlp eval` of that checkpoint reports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vlp.core import storage
from vlp.core.config import EvalConfig, RunConfig
from vlp.eval.runner import run
from vlp.eval.suite import check_files, load_suite
from vlp.train.runstore import RunStore


def periodic_eval(cfg: RunConfig) -> Callable[[Path], dict[str, float]] | None:
    """The trainer's eval callback for this config, or None when the config asks for no eval."""
    if not cfg.train.evaluates:
        return None
    check_files(load_suite(cfg.train.eval_suite))  # a bad suite or a missing file fails now, not at the first eval
    out = cfg.train.output_dir  # an object-storage run keeps its reports in its local mirror
    out_root = (RunStore(out).local if storage.is_object_url(out) else Path(out)) / "eval"

    def evaluate(checkpoint: Path) -> dict[str, float]:
        report = run(EvalConfig(model=str(checkpoint), suite=cfg.train.eval_suite,
                                out=str(out_root / checkpoint.name), quiet=True))
        return {
            f"eval/{name}/{entry['metric']}": entry["value"]
            for name, entry in report["summary"].items()
            if isinstance(entry.get("value"), int | float)
        }

    return evaluate
