"""`vlp eval` also writes CLIP_benchmark's result files, and CLIP_benchmark's own code reads and names them.

The expected mapping is written out here, apart from eval/clip_benchmark_json.py, so a wrong key or
figure there fails: each CLIP_benchmark metric -> the report.json metric it must equal.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import clip_benchmark.cli as cb_cli
import pytest
from test_eval_cli import SMALL_SYNTHETIC, run_cli
from test_eval_support import export_tiny, write_suite
from vlp.eval.clip_benchmark_json import write_clip_benchmark

CB_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}
# eval.tasks.sugarcrepe.SyntheticSugarCrepe's default subsets
SUGARCREPE_SYNTHETIC_SUBSETS = ["swap_att", "replace_rel"]


def expected_results(task: dict, report_task: dict) -> dict[str, tuple[str, dict[str, float | None]]]:
    """CLIP_benchmark dataset -> (its task, metric -> the value it must have) for one suite task."""
    name, got = task["name"], report_task["metrics"]
    if task["type"] == "zeroshot_classification":
        keys = ("acc1", "acc5", "mean_per_class_recall")
        return {name: ("zeroshot_classification", {k: got[k] for k in keys})}
    if task["type"] == "retrieval":
        ks = task.get("recall_k", [1, 5, 10])
        keys = [f"{d}_retrieval_recall@{k}" for k in ks for d in ("image", "text")]
        return {name: ("zeroshot_retrieval", {k: got[k] for k in keys})}
    if task["type"] == "winoground":
        scores = {"image_acc": got["image_score"], "text_acc": got["text_score"], "acc": got["group_score"]}
        return {name: ("image_caption_selection", scores)}
    if task["type"] == "sugarcrepe":
        subsets = task["dataset"].get("subsets", SUGARCREPE_SYNTHETIC_SUBSETS)
        return {
            f"{name}/{s}": (
                "image_caption_selection",
                {"image_acc": 1.0, "text_acc": got[f"acc/{s}"], "acc": got[f"acc/{s}"]},
            )
            for s in subsets
        }
    return {}  # counting, ARO: CLIP_benchmark has no such task


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, dict]:
    """One real `vlp eval` of every synthetic task type on the tiny exported model: (out, report)."""
    tmp = tmp_path_factory.mktemp("cb")
    model = export_tiny(tmp / "tiny.safetensors", seed=0)
    suite = write_suite(tmp / "small.yaml", SMALL_SYNTHETIC)
    out = tmp / "report"
    args = ("--model", model, "--suite", suite, "--out", out, "--cache-dir", tmp / "cache", "--quiet")
    assert run_cli(*args) == 0
    return out, json.loads((out / "report.json").read_text())


def build_rows(folder: Path, tmp_path: Path) -> list[dict[str, str]]:
    """The folder read by `clip_benchmark build FOLDER --output CSV` (its main_build, as its CLI calls it)."""
    table = tmp_path / "benchmark.csv"
    cb_cli.main_build(Namespace(files=[str(folder)], output=str(table), which="build"))
    with open(table, newline="") as fh:
        return list(csv.DictReader(fh))


def same(cell: str, value: float | None) -> bool:
    """A CSV cell of `build` equals report.json's figure (None there is NaN in CLIP_benchmark's files)."""
    return math.isnan(float(cell)) if value is None else float(cell) == value


def check_folder(folder: Path, report: dict, tmp_path: Path) -> None:
    """The folder holds one CLIP_benchmark result per mappable task, each with CLIP_benchmark's exact keys,
    and `build` reads from it the task names and report.json's figures."""
    expected: dict[str, tuple[str, dict]] = {}
    for task in SMALL_SYNTHETIC:
        expected.update(expected_results(task, report["tasks"][task["name"]]))
    assert len(expected) == 6  # 2 zero-shot, retrieval, 2 SugarCrepe subsets, Winoground

    files = sorted(folder.iterdir())
    assert len(files) == len(expected)
    for path in files:
        assert set(json.loads(path.read_text())) == CB_KEYS, path.name

    rows = build_rows(folder, tmp_path)
    assert sorted(r["dataset"] for r in rows) == sorted(expected)
    for row in rows:
        task, figures = expected[row["dataset"]]
        assert row["task"] == task
        assert row["model"] == report["model"]["name"] == "eval-test-tiny"
        weights = Path(report["model"]["weights"])
        assert row["pretrained"] == f"{weights.name}@{hashlib.sha256(weights.read_bytes()).hexdigest()[:10]}"
        assert row["model_fullname"] == f"{row['model']} {row['pretrained']}"
        assert row["language"] == "en"
        # build's CSV has a column for every file's metrics: this row fills only its own
        present = {k for k, v in row.items() if v != ""} - CB_KEYS - {"model_fullname"}
        assert present == set(figures), row["dataset"]
        for metric, value in figures.items():
            assert same(row[metric], value), (row["dataset"], metric, row[metric], value)


def test_results_are_clip_benchmarks_and_equal_the_report(evaluated, tmp_path):
    out, report = evaluated
    check_folder(out / "clip_benchmark", report, tmp_path)


def test_file_names_are_the_ones_clip_benchmark_eval_gives(evaluated, monkeypatch, capsys):
    """`clip_benchmark eval --skip_existing`, asked for each result, finds our file under its own name."""
    out, _ = evaluated
    folder = out / "clip_benchmark"

    def no_model(**_):
        raise AssertionError("clip_benchmark did not find the result file under its default name")

    monkeypatch.setattr(cb_cli, "load_clip", no_model)
    for path in sorted(folder.iterdir()):
        result = json.loads(path.read_text())
        argv = ["clip_benchmark", "eval", "--task", result["task"], "--skip_existing"]
        monkeypatch.setattr(sys, "argv", argv)
        _, args = cb_cli.get_parser_args()
        # main_eval's per-run fields (its collection expansion is skipped: 'retrieval' names one)
        args.model, args.pretrained = result["model"], result["pretrained"]
        args.dataset, args.language = result["dataset"], result["language"]
        args.output = str(folder / args.output)  # its default template, in our folder
        capsys.readouterr()
        assert cb_cli.run(args) is None
        assert capsys.readouterr().out.strip() == f"Skip {path}, exists already."


def test_every_figure_lands_in_its_column_none_as_nan_and_stale_files_go(evaluated, tmp_path):
    """The tiny model's figures coincide (acc1 = mean_per_class_recall, Winoground all 0), so every metric
    is given its own value here: a swapped mapping fails. None is NaN, as CLIP_benchmark writes an
    undefined figure; a rerun into the folder leaves only its own files."""
    _, report = evaluated
    report = copy.deepcopy(report)
    values = iter(range(1, 1000))
    for task in report["tasks"].values():
        task["metrics"] = {k: next(values) / 1000 for k in task["metrics"]}
    report["tasks"]["shapes"]["metrics"]["acc5"] = None
    folder = tmp_path / "clip_benchmark"
    folder.mkdir()
    stale = folder / "old_old.pt_old-model_en_zeroshot_classification.json"
    stale.write_text("{}")
    write_clip_benchmark(report, tmp_path)
    assert not stale.exists()
    check_folder(folder, report, tmp_path)


def test_two_runs_model_files_keep_their_results_apart(tmp_path):
    """Every run exports a `model.safetensors`: results of two runs gathered in one folder must not collide."""
    from vlp.eval.clip_benchmark_json import file_name, results

    names = set()
    for seed in (0, 1):
        weights = export_tiny(tmp_path / f"run{seed}" / "model.safetensors", seed=seed)
        report = {"model": {"name": "eval-test-tiny", "weights": str(weights)},
                  "tasks": {"shapes": {"type": "zeroshot_classification", "metrics": {"acc1": 0.5}}}}
        (result,) = results(report)
        assert result["pretrained"].startswith("model.safetensors@")
        names.add(file_name(result["dataset"], result["model"], result["pretrained"], result["task"]))
    assert len(names) == 2
