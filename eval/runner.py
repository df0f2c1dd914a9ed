"""`vlp eval`: run every task of a suite on one model and write report.json + report.html
(+ CLIP_benchmark's result files in clip_benchmark/).

Order matters for failing fast: the suite is validated, the model spec
resolved and every benchmark file read (synthetic sets generated) before the
model is built, so a typo costs a second, not a model load. Then each task's
images and texts are encoded through one FeatureStore (each input once per
run, split across ranks when launched with torchrun / accelerate / srun), the
task scores from cached features, and rank 0 writes the report.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from vlp.eval.clip_benchmark_json import write_clip_benchmark
from vlp.eval.encoders import load_encoder, resolve_model
from vlp.eval.features import FeatureStore
from vlp.eval.parallel import broadcast_from_main
from vlp.eval.report import render_report
from vlp.eval.suite import load_suite
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.base import Context, Task, default_cache_dir

from vlp.core.atomic import write_atomic
from vlp.core.config import EvalConfig
from vlp.core.distributed import init_distributed, rank_and_world
from vlp.core.errors import UserError
from vlp.core.ownership import claim

SCHEMA_VERSION = 1
SKIPS_SHOWN = 5  # per task on stderr; skipped.jsonl has them all, report.json up to MAX_LISTED_SKIPS


def _device(choice: str, local_rank: int) -> str:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return f"cuda:{local_rank}" if choice == "cuda" else choice
    if choice != "cpu":
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {choice!r}")
    return "cpu"


def _on_main_first(rank: int, action: Callable[[], None]) -> None:
    """Run `action` on rank 0; its UserError stops every rank (instead of the others waiting forever)."""
    problem = None
    if rank == 0:
        try:
            action()
        except UserError as err:
            problem = str(err)
    problem = broadcast_from_main(problem)
    if problem:
        raise UserError(problem)


def _prepare_out(out: Path, rank: int) -> None:
    """Claim the output folder (rank 0) before the model loads; every rank stops on its failure.

    Like every vlp output folder it is owned: a new or empty one is marked as an eval report,
    one vlp made for a report is reused, anything else is refused (report.json of someone
    else's folder is never overwritten).
    """

    def claim_writable() -> None:
        claim(out, "eval", "vlp eval", "choose a new --out folder")
        if not os.access(out, os.W_OK):
            raise UserError(f"--out {out}: folder is not writable")

    _on_main_first(rank, claim_writable)


def _load_tasks(tasks: list[Task], rank: int) -> None:
    """Read every benchmark; rank 0 first, so it alone generates synthetic sets the others then reuse."""

    def load_all() -> None:
        for task in tasks:
            task.load()

    _on_main_first(rank, load_all)
    if rank != 0:
        load_all()


def _report_skips(name: str, result: dict[str, Any]) -> None:
    if not result["n_skipped"]:
        return
    reasons = ", ".join(f"{r}: {n}" for r, n in result["skip_reasons"].items())
    print(
        f"vlp eval: task {name}: skipped {result['n_skipped']} of {result['n_items']} items ({reasons})",
        file=sys.stderr,
    )
    for s in result["skipped"][:SKIPS_SHOWN]:
        print(f"  item {s['id']}: {s['reason']}: {s['detail']}", file=sys.stderr)
    if result["n_skipped"] > SKIPS_SHOWN:
        print("  ... all of them in skipped.jsonl", file=sys.stderr)


def run(opts: EvalConfig) -> dict[str, Any]:
    """Evaluate; return the report (written to opts.out by rank 0)."""
    if not opts.model:
        raise UserError("vlp eval: --model is required (or use `vlp eval compare A B`)")
    if not opts.out:
        raise UserError("vlp eval: --out DIR is required")
    out = Path(opts.out)
    suite = load_suite(opts.suite, opts.only)
    spec = resolve_model(opts.model, opts.weights, opts.random_init)
    if opts.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision must be fp32 or bf16, got {opts.precision!r}")
    env = init_distributed()
    rank, world = rank_and_world()
    device = _device(opts.device, env.local_rank)
    cache_dir = Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()
    tasks = [TASKS[s.type](s, Context(cache_dir=cache_dir)) for s in suite.tasks]
    started = time.perf_counter()
    _load_tasks(tasks, rank)  # every benchmark file read before the output folder is made
    _prepare_out(out, rank)

    encoder, model_info = load_encoder(
        spec,
        device=device,
        batch_size=opts.batch_size,
        bf16=opts.precision == "bf16",
        workers=opts.workers,
        seed=opts.seed,
    )
    store = FeatureStore(encoder, workers=opts.workers, progress=not opts.quiet)
    results: dict[str, dict[str, Any]] = {}
    all_skips: list[dict[str, str]] = []
    for task in tasks:
        t0 = time.perf_counter()
        refs, texts = task.inputs()
        store.prefetch(refs, texts, desc=task.name, fetch_opts=task.fetch_options())
        result = task.score(store).as_dict()
        results[task.name] = {"type": task.type, "dataset": task.describe_dataset(), **result}
        results[task.name]["seconds"] = round(time.perf_counter() - t0, 3)
        all_skips += [{"task": task.name, **s.as_dict()} for s in task.skipped]
        if rank == 0:
            _report_skips(task.name, result)

    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "suite": {"name": suite.name, "description": suite.description, "path": suite.path},
        "model": model_info,
        "run": {
            "device": device,
            "precision": opts.precision,
            "world_size": world,
            "batch_size": opts.batch_size,
            "cache_dir": str(cache_dir),
            "seconds": round(time.perf_counter() - started, 3),
            "encoding": asdict(store.stats),
        },
        "summary": {
            name: {"type": r["type"], "metric": r["main_metric"], "value": r["metrics"].get(r["main_metric"])}
            for name, r in results.items()
        },
        "tasks": results,
    }
    if rank == 0:
        write_outputs(report, all_skips, out)
    return report


def write_outputs(report: dict[str, Any], skips: list[dict[str, str]], out: Path) -> None:
    """report.json, report.html, skipped.jsonl (every skipped item, uncapped) and CLIP_benchmark's
    result files (clip_benchmark/, from report.json's figures), each written atomically."""
    write_atomic(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_atomic(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skips))
    write_atomic(out / "report.html", render_report(report))
    write_clip_benchmark(report, out)

