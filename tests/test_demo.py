"""`vlp demo`, shortened: every stage runs for real and the trained model beats the untrained one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SUITE = """name: demo-test
tasks:
  - name: colour_zeroshot
    type: zeroshot_classification
    dataset: {format: synthetic, attribute: colour, n: 10}
  - name: shape_zeroshot
    type: zeroshot_classification
    dataset: {format: synthetic, attribute: shape, n: 10}
    templates: ["a {c}."]
  - name: retrieval
    type: retrieval
    dataset: {format: synthetic, n: 100, captions_per_image: 1}
    recall_k: [1, 5]
"""


def _run(args: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_short_demo_trains_a_model_that_beats_the_untrained_one(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    env = dict(os.environ, VLP_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "run"
    printed = _run(["demo", "--config", "configs/demo.yaml", "demo.pairs=3000", f"demo.data_dir={tmp_path / 'data'}",
                    f"demo.eval_suite={suite}", "train.samples=8960", "optim.warmup_steps=10",
                    f"train.output_dir={out}"], env)
    # every stage ran and the summary names the report
    assert all(f"| {stage} |" in printed for stage in ("synth", "shards", "train", "eval", "total"))
    assert f"report: {out / 'eval' / 'report.html'}" in printed
    manifest = json.loads((tmp_path / "data" / "shards" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["written"] == 3000
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 70 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    trained = json.loads((out / "eval" / "report.json").read_text())["tasks"]

    _run(["eval", "--model", "vlp-tiny-rn", "--random-init", "--suite", str(suite), "--out", str(tmp_path / "untrained"),
          "--quiet"], env)
    untrained = json.loads((tmp_path / "untrained" / "report.json").read_text())["tasks"]
    for task, metric, margin in [("colour_zeroshot", "acc1", 0.3), ("retrieval", "image_retrieval_recall@5", 0.1),
                                 ("retrieval", "text_retrieval_recall@5", 0.1)]:
        got, chance = trained[task]["metrics"][metric], untrained[task]["metrics"][metric]
        assert got > chance + margin, (task, metric, got, chance)
