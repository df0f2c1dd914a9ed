"""`vlp train` as a user runs it, for tests that compare runs by their metrics (a real process each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def train_metrics(shards: Path, out: Path, *overrides: str) -> list[dict]:
    """Train vlp-micro (batch 16) on `shards` into `out` with `overrides`; the run's metrics.jsonl records."""
    cmd = [sys.executable, "-m", "vlp", "train", f"data.sources=[{{shards: '{shards}'}}]", "model.name=vlp-micro",
           "train.batch_size=16", f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
