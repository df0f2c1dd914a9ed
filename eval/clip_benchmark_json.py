"""A vlp eval report as CLIP_benchmark's result files, so both tools' results fill one table.

`clip_benchmark eval` writes one JSON per (dataset, model, pretrained, language,
task), exactly {dataset, model, pretrained, task, metrics, language}, named by
its default `--output` template below; `clip_benchmark build FOLDER` reads a
folder of them into one CSV. `vlp eval` writes the same files into
`<out>/clip_benchmark/` (rank 0, after report.json), one per task that has a
CLIP_benchmark counterpart:

- `zeroshot_classification` -> `zeroshot_classification`: `acc1`, `acc5`,
  `mean_per_class_recall`;
- `retrieval` -> `zeroshot_retrieval`: `image_retrieval_recall@k`,
  `text_retrieval_recall@k` for the suite's k;
- `winoground` -> `image_caption_selection`: `image_acc`, `text_acc`, `acc`
  (Winoground's image, text and group score);
- `sugarcrepe` -> `image_caption_selection`, one file per subset (dataset
  `<task>/<subset>`, as CLIP_benchmark's `sugar_crepe/<subset>`).

`counting` and the ARO tasks have no CLIP_benchmark task and get no file;
retrieval's `_qbnorm` figures are left out (CLIP_benchmark has no QB-Norm).
`dataset` is the suite's task name (CLIP_benchmark's own dataset names, e.g.
`cifar10` or `sugar_crepe`, come out when the suite uses them), `model` the
open_clip model vlp built, `pretrained` the weights: a file as its name and the
first 10 hex digits of its SHA-256 (`model.safetensors@3fa2c1d07b`: every run
exports a `model.safetensors`, and two runs' results must not share a name in
one folder), a tag as the tag, `random_init` without weights; `language` "en". A metric vlp reports as None is NaN here, as
CLIP_benchmark writes an undefined figure (acc5 below 5 classes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlp.core.atomic import write_atomic

SUBFOLDER = "clip_benchmark"
# `clip_benchmark eval`'s --output default
OUTPUT_TEMPLATE = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
LANGUAGE = "en"  # vlp's templates and benchmarks are English
RANDOM_INIT = "random_init"  # `pretrained` of a model evaluated without weights
RECALL = re.compile(r"^(image|text)_retrieval_recall@\d+$")  # not the `_qbnorm` variants


def _number(value: float | None) -> float:
    """CLIP_benchmark writes an undefined figure as NaN (json.dump's default), vlp as None."""
    return math.nan if value is None else float(value)


def _zeroshot(name: str, metrics: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, float]]]:
    keys = ("acc1", "acc5", "mean_per_class_recall")
    yield name, "zeroshot_classification", {k: _number(metrics.get(k)) for k in keys}


def _retrieval(name: str, metrics: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, float]]]:
    yield name, "zeroshot_retrieval", {k: _number(v) for k, v in metrics.items() if RECALL.match(k)}


def _winoground(name: str, metrics: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, float]]]:
    # CLIP_benchmark's image_caption_selection on 2 images x 2 captions: text_acc is "each image picks
    # its caption" (Winoground's text score), image_acc "each caption picks its image", acc both (group).
    scores = {"image_acc": "image_score", "text_acc": "text_score", "acc": "group_score"}
    yield name, "image_caption_selection", {k: _number(metrics.get(v)) for k, v in scores.items()}


def _sugarcrepe(name: str, metrics: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, float]]]:
    # CLIP_benchmark runs each subset as its own dataset (sugar_crepe/<subset>). With one image and two
    # captions, its text_acc and acc are the subset's accuracy and image_acc is 1 by construction (the
    # only image is always the best one for a caption); NaN, like the rest, for a subset nothing scored in.
    for key, acc in metrics.items():
        if key.startswith("acc/"):
            image_acc = math.nan if acc is None else 1.0
            figures = {"image_acc": image_acc, "text_acc": _number(acc), "acc": _number(acc)}
            yield f"{name}/{key.removeprefix('acc/')}", "image_caption_selection", figures


MAPPERS = {
    "zeroshot_classification": _zeroshot,
    "retrieval": _retrieval,
    "winoground": _winoground,
    "sugarcrepe": _sugarcrepe,
}


def _pretrained(model: dict[str, Any]) -> str:
    weights = model.get("weights")
    if not weights:
        return RANDOM_INIT
    if not os.path.isfile(weights):  # an open_clip tag
        return weights
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(weights)}@{digest.hexdigest()[:10]}"


def file_name(dataset: str, model: str, pretrained: str, task: str) -> str:
    """CLIP_benchmark's name for the result: its --output default, filled in as `clip_benchmark eval` does
    (dataset '/' -> '_', a weights file by its base name); any other '/' becomes '_' to stay in the folder."""
    weights = os.path.basename(pretrained) if os.path.isfile(pretrained) else pretrained
    name = OUTPUT_TEMPLATE.format(
        dataset=dataset, pretrained=weights, model=model, language=LANGUAGE, task=task
    )
    return name.replace("/", "_")


def results(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The CLIP_benchmark result dicts for `report`, in task order (keys in CLIP_benchmark's order)."""
    model, pretrained = report["model"]["name"], _pretrained(report["model"])
    out = []
    for name, task in report["tasks"].items():
        mapper = MAPPERS.get(task["type"])
        if mapper is None:  # counting, ARO: no CLIP_benchmark counterpart
            continue
        for dataset, cb_task, metrics in mapper(name, task["metrics"]):
            out.append(
                {
                    "dataset": dataset,
                    "model": model,
                    "pretrained": pretrained,
                    "task": cb_task,
                    "metrics": metrics,
                    "language": LANGUAGE,
                }
            )
    return out


def write_clip_benchmark(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the result files into `out/clip_benchmark/`, each atomically; return their paths.

    The folder holds this run's files only: `clip_benchmark build` reads every .json in it, so one
    left by an earlier run into the same --out (another suite or model) would join the table. Stale
    files are removed after the new ones are written, so a crash leaves too many, never none.
    """
    folder = out / SUBFOLDER
    folder.mkdir(exist_ok=True)
    written = []
    for result in results(report):
        path = folder / file_name(result["dataset"], result["model"], result["pretrained"], result["task"])
        write_atomic(path, json.dumps(result))  # NaN stays NaN, as CLIP_benchmark's json.dump writes it
        written.append(path)
    for stale in set(folder.glob("*.json")) - set(written):
        stale.unlink()
    return written
