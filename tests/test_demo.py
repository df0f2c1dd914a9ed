"""`vlp demo`, shortened: every stage runs for real and the trained model beats the untrained one.

The shortened run is the `short_demo` fixture (tests/conftest.py): the curation evidence test uses its model too."""

from __future__ import annotations

import json

import pytest
from short_demo import run_vlp

# one xdist worker runs all of group "short_demo": the tests share one short demo run
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("short_demo")]


def test_short_demo_trains_a_model_that_beats_the_untrained_one(short_demo, tmp_path):
    out = short_demo.run
    # every stage ran and the summary names the report
    assert all(f"| {stage} |" in short_demo.printed for stage in ("synth", "shards", "train", "eval", "total"))
    assert f"report: {out / 'eval' / 'report.html'}" in short_demo.printed
    manifest = json.loads((short_demo.root / "data" / "shards" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["written"] == 3000
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8960 // 128 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    trained = json.loads((out / "eval" / "report.json").read_text())["tasks"]

    run_vlp(["eval", "--model", "vlp-tiny-rn", "--random-init", "--suite", str(short_demo.root / "suite.yaml"),
             "--out", str(tmp_path / "untrained"), "--quiet"], short_demo.env)
    untrained = json.loads((tmp_path / "untrained" / "report.json").read_text())["tasks"]
    for task, metric, margin in [("colour_zeroshot", "acc1", 0.3), ("retrieval", "image_retrieval_recall@5", 0.1),
                                 ("retrieval", "text_retrieval_recall@5", 0.1)]:
        got, chance = trained[task]["metrics"][metric], untrained[task]["metrics"][metric]
        assert got > chance + margin, (task, metric, got, chance)
