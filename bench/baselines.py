"""What the bench scripts share: the baseline tools' virtualenvs, and one training run of each tool.

The baselines pin packages our project cannot live with (img2dataset and
open_clip_train's webdataset reader breaks on webdataset >= 0.2.8x), so each runs from its own
virtualenv under bench/, made with pip on first use and never committed.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OPEN_CLIP_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "open-clip-torch==3.3.0", "webdataset==0.2.86",
                      "pandas"]
IMG2DATASET_PACKAGES = ["img2dataset"]

# Runs a command and reports the largest resident set of any process it started (KiB on Linux).
_MAXRSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(rc)")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): figures, the demo's included, differ between CPU kinds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU model unknown"


def provenance() -> dict:
    """What every result file records besides its figures: date, commit, machine, command."""
    import os
    import platform
    from datetime import date

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"date": date.today().isoformat(), "commit": commit,
            "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"Python {platform.python_version()}",
            "command": " ".join(["python", *sys.argv])}


RESULTS = BENCH / "results"


def write_result(name: str, title: str, tables: list[dict], *, order: int = 50, **extra) -> Path:
    """bench/results/NAME.json, which the docs' results page is generated from: the figures as tables
    ({"title", "columns", "rows"}), with the date, commit, machine and command (and `about`, `notes`,
    `conditions`, `plots`, or any figures a script wants kept whole)."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, "order": order, **provenance(), **extra, "tables": tables},
                               indent=1) + "\n")
    print(f"result file: {path}")
    return path


def markdown(table: dict) -> str:
    """A result table ({"title", "columns", "rows"}) as the Markdown the scripts print."""
    lines = [f"\n{table['title']}"] if table.get("title") else []
    lines += ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]])


def venv_python(name: str, packages: list[str]) -> Path:
    """bench/.venv-<name>/bin/python, created with `packages` on first use."""
    venv = BENCH / f".venv-{name}"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"creating {venv} ({' '.join(packages)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    return py


def open_clip_python(extra_config: Path | None = None) -> Path:
    """open_clip_train's virtualenv, with vlp's model configs (and `extra_config`) among open_clip's own."""
    py = venv_python("openclip", OPEN_CLIP_PACKAGES)
    site = subprocess.run([str(py), "-c", "import open_clip, os; print(os.path.dirname(open_clip.__file__))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    configs = [*(REPO / "vlp" / "core" / "model_configs").glob("*.json"), *([extra_config] if extra_config else [])]
    for config in configs:  # its CLI has no flag for a config path
        shutil.copy(config, Path(site) / "model_configs" / config.name)
    return py


def img2dataset_python() -> Path:
    return venv_python("img2dataset", IMG2DATASET_PACKAGES)


def measured(cmd: list[str]) -> tuple[str, float, float]:
    """Run cmd; return (its output, peak RSS of its largest process in MiB, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MAXRSS, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{log[-4000:]}")
    peak = int(re.findall(r"MAXRSS_KB (\d+)", log)[-1]) / 1024
    return log, peak, seconds


def median_after_warmup(values: list[float], skip: int = 5) -> float:
    return statistics.median(values[skip:] if len(values) > skip + 2 else values)


@dataclass
class TrainRun:
    tool: str
    samples_per_s: float  # median per-step throughput (data wait included), after warm-up
    peak_rss_mb: float
    seconds: float  # wall clock of the whole command
    weights: Path | None  # for evaluation
    first_step_s: float = float("nan")  # from launching the command to the end of its first step


@dataclass
class Recipe:
    """The settings both tools get, spelled the same way."""

    model: str = "vlp-tiny-rn"
    batch: int = 128
    steps: int = 40
    workers: int = 1
    precision: str = "fp32"
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # None: each tool's own default (vlp: 1.0 unless changed; open_clip_train: off)


def train_vlp(shards: Path, out: Path, r: Recipe, *, batch: int | None = None, micro: int | None = None,
              extra: tuple[str, ...] = (), config: Path | None = None) -> TrainRun:
    """`vlp train` with the recipe; `config`: a model JSON of the bench's own (named after its file)."""
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"data.sources=[{{shards: '{shards}'}}]", f"data.workers={r.workers}", f"model.name={r.model}",
        f"train.batch_size={batch or r.batch}", f"train.steps={r.steps}", f"train.precision={r.precision}",
        f"optim.lr={r.lr}", f"optim.weight_decay={r.weight_decay}", f"optim.warmup_steps={r.warmup}",
        *([f"optim.grad_clip={r.grad_clip}"] if r.grad_clip is not None else []), f"train.output_dir={out}",
        f"train.checkpoint_every={10**6}", *([f"model.config_file={config}"] if config else []),
        *([f"train.micro_batch_size={micro}"] if micro else []), *extra,
    ]
    launched = time.time()
    _, peak, seconds = measured([sys.executable, "-m", "vlp", "train", *overrides])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    return TrainRun("vlp", median_after_warmup([m["samples_per_s"] for m in lines]), peak, seconds, ckpt,
                    lines[0]["time"] - launched)


def train_open_clip(shards: Path, out: Path, r: Recipe, *, accum: int = 1, save: bool = False, epochs: int = 1,
                    every: int = 1, compile: bool = False, config: Path | None = None) -> TrainRun:
    """open_clip_train.main with the same recipe; `accum` > 1 is its feature-caching accumulation.

    r.steps steps in all, over `epochs` epochs (when `save`, a checkpoint every `every` epochs);
    `compile`: its --torchcompile; `config`: a model JSON of the bench's own."""
    py = open_clip_python(config)
    manifest = json.loads((shards / "manifest.json").read_text())
    last = len(manifest["shards"]) - 1
    shutil.rmtree(out, ignore_errors=True)
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[r.precision]
    cmd = [str(py), "-m", "open_clip_train.main", "--train-data", f"{shards}/{{00000..{last:05d}}}.tar",
           "--dataset-type", "webdataset", "--train-num-samples", str(r.steps * r.batch * accum // epochs),
           "--batch-size", str(r.batch), "--accum-freq", str(accum), "--epochs", str(epochs), "--model", r.model,
           "--lr", str(r.lr), "--wd", str(r.weight_decay), "--warmup", str(r.warmup),
           *(["--grad-clip-norm", str(r.grad_clip)] if r.grad_clip is not None else []),
           "--workers", str(r.workers), "--precision", precision,
           "--report-to", "none", "--save-frequency", str(every) if save else "0", "--log-every-n-steps", "1",
           "--logs", str(out), "--name", "bench", "--device", "cpu", "--seed", "0",
           *(["--torchcompile"] if compile else [])]
    launched = time.time()
    log, peak, seconds = measured(cmd)
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", log)]
    if not rates:
        raise RuntimeError(f"no throughput lines in open_clip_train's log:\n{log[-3000:]}")
    weights = out / "bench" / "checkpoints" / f"epoch_{epochs}.pt"
    # its log stamps lines to the second: the first step's line, against the launch
    stamp = re.search(r"^(\d{4}-\d\d-\d\d,\d\d:\d\d:\d\d) \| INFO \| Train Epoch", log, re.M)
    first = (datetime.strptime(stamp.group(1), "%Y-%m-%d,%H:%M:%S").timestamp() - launched) if stamp else float("nan")
    return TrainRun("open_clip_train", median_after_warmup(rates), peak, seconds, weights if save else None, first)


def synthetic_shards(work: Path, pairs: int = 10_000, image_size: int = 64) -> Path:
    """Synthetic shards of `pairs` pairs at `image_size` px, built under work once (kept between runs)."""
    shards = work / f"shards-{pairs}-{image_size}px"
    if not (shards / "manifest.json").exists():
        synth = work / f"synth-{pairs}-{image_size}px"
        subprocess.run([sys.executable, "-m", "vlp", "shards", "synth", "--out", str(synth), "--n", str(pairs),
                        "--image-size", str(image_size)], check=True)
        subprocess.run([sys.executable, "-m", "vlp", "shards", "build", str(synth / "pairs.csv"), "--output",
                        str(shards), "--image-size", str(image_size), "--shard-size", "1000",
                        "--keep-cols", "kind,hard_negatives", "--quiet"], check=True)
    return shards
