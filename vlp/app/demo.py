"""`vlp demo`: from nothing to a trained dual encoder and its report, on a laptop CPU.

Four stages, each what its own command does, so everything here can be done
by hand too:

    synth   vlp shards synth --out <data_dir>/synth --n <pairs> --seed <seed>
    shards  vlp shards build <data_dir>/synth/pairs.csv --output <data_dir>/shards ...
    train   vlp train --config configs/demo.yaml
    eval    vlp eval --model <output_dir>/checkpoints/<last> --suite <eval_suite> --out <output_dir>/eval

Synth and shards are kept between runs (rebuilt only if their parameters
change); the training run starts fresh in `train.output_dir`. The summary
table shows the default suite's headline metrics against the targets the
demo is tuned to reach.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vlp.core.config import DataSource, DemoRunConfig, EvalConfig, RunConfig, ShardsBuildConfig, cpu_cores
from vlp.core.errors import UserError
from vlp.core.ownership import claim, owner
from vlp.core.weights import complete_checkpoints
from vlp.data_tools.build import build_shards, fingerprint
from vlp.data_tools.synth import generate
from vlp.eval.runner import run
from vlp.eval.suite import check_files, load_suite
from vlp.train.trainer import train

DEMO = "vlp demo"

# (task, metric, target): what the demo's model should reach on held-out synthetic sets
TARGETS = [
    ("shape_zeroshot", "acc1", 0.95),
    ("colour_zeroshot", "acc1", 0.95),
    ("retrieval", "image_retrieval_recall@1", 0.50),
    ("retrieval", "text_retrieval_recall@1", 0.50),
    ("counting", "acc1", 0.60),
    ("binding", "acc/swap_att", 0.80),
]


@dataclass
class DemoResult:
    report_path: Path
    report: dict
    seconds: dict[str, float]

    def met(self) -> dict[str, bool]:
        return {f"{t}/{m}": (_metric(self.report, t, m) or 0.0) >= target for t, m, target in TARGETS}


def _metric(report: dict, task: str, metric: str) -> float | None:
    return report.get("tasks", {}).get(task, {}).get("metrics", {}).get(metric)


def _synth(cfg: DemoRunConfig) -> Path:
    demo = cfg.demo
    folder = Path(demo.data_dir) / "synth"
    params = {"pairs": demo.pairs, "seed": demo.seed, "image_size": demo.image_size}
    marker = folder / "demo.json"
    csv_path = folder / "pairs.csv"
    if csv_path.exists() and marker.exists() and json.loads(marker.read_text()) == params:
        return csv_path
    if folder.exists():
        shutil.rmtree(folder)  # a previous demo's set (checked by _check_folders)
    folder.mkdir(parents=True)
    marker.write_text(json.dumps(params))  # first: this folder is the demo's; pairs.csv, written last, completes it
    return generate(folder, n=demo.pairs, seed=demo.seed, image_size=demo.image_size, workers=cpu_cores())


def _shards(cfg: DemoRunConfig, csv_path: Path) -> Path:
    out = Path(cfg.demo.data_dir) / "shards"
    opts = ShardsBuildConfig(
        inputs=[str(csv_path)], output=str(out), image_size=cfg.demo.image_size, resize_mode="border",
        keep_cols=["kind", "hard_negatives"], shard_size=cfg.demo.shard_size, workers=cpu_cores(),
    )
    state = out / ".build.json"
    # a rerun resumes (and finds nothing to do); changed parameters start over
    overwrite = state.exists() and json.loads(state.read_text()).get("options") != fingerprint(opts)
    build_shards(opts.model_copy(update={"overwrite": overwrite}))
    return out


def _train(cfg: DemoRunConfig, shards: Path) -> Path:
    run = RunConfig.model_validate(cfg.model_dump(exclude={"demo"}))  # what `vlp train` would see
    run.data.sources = [DataSource(shards=str(shards))]
    out = Path(run.train.output_dir)
    if out.exists():
        shutil.rmtree(out)  # the previous demo run (checked by _check_folders): the demo's run starts fresh
    claim(out, "run", DEMO, "choose a new train.output_dir")
    train(run)
    return complete_checkpoints(Path(run.train.output_dir) / "checkpoints")[-1]


def _eval(cfg: DemoRunConfig, checkpoint: Path) -> dict:
    out = Path(cfg.train.output_dir) / "eval"
    return run(EvalConfig(model=str(checkpoint), suite=cfg.demo.eval_suite, out=str(out)))


def summary(result: DemoResult) -> str:
    lines = ["", "vlp demo summary", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {sec:.0f} |" for stage, sec in result.seconds.items()]
    lines += [f"| total | {sum(result.seconds.values()):.0f} |", "", "| task | metric | value | target | |",
              "|---|---|---|---|---|"]
    for task, metric, target in TARGETS:
        value = _metric(result.report, task, metric)
        shown = "n/a" if value is None else f"{100 * value:.1f}%"
        mark = "ok" if value is not None and value >= target else "below"
        lines.append(f"| {task} | {metric} | {shown} | {100 * target:.0f}% | {mark} |")
    lines += ["", f"report: {result.report_path}"]
    return "\n".join(lines)


def _check_folders(cfg: DemoRunConfig) -> None:
    """Before any stage: the demo deletes only what an earlier demo made."""
    out = Path(cfg.train.output_dir)
    for folder, key in [(out, "train.output_dir"), (Path(cfg.demo.data_dir), "demo.data_dir")]:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{key} {folder} is a file, not a folder; choose a new {key}")
    mark = owner(out) if out.is_dir() else None
    if out.exists() and (mark or {}).get("command") != DEMO and any(out.iterdir()):
        raise UserError(f"train.output_dir {out} exists and is not a vlp demo run: the demo starts its run "
                        "fresh and deletes only its own runs; choose a new train.output_dir")
    synth = Path(cfg.demo.data_dir) / "synth"
    if synth.exists() and not (synth / "demo.json").is_file() and (not synth.is_dir() or any(synth.iterdir())):
        raise UserError(f"{synth} exists and was not made by vlp demo; choose a new demo.data_dir")


def run_demo(cfg: DemoRunConfig) -> DemoResult:
    _check_folders(cfg)
    check_files(load_suite(cfg.demo.eval_suite))  # a typo fails now, not after synthesis and training
    seconds: dict[str, float] = {}

    def stage(name, fn, *args):
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        out = fn(*args)
        seconds[name] = time.perf_counter() - start
        return out

    csv_path = stage("synth", _synth, cfg)
    shards = stage("shards", _shards, cfg, csv_path)
    checkpoint = stage("train", _train, cfg, shards)
    report = stage("eval", _eval, cfg, checkpoint)
    return DemoResult(Path(cfg.train.output_dir) / "eval" / "report.html", report, seconds)
