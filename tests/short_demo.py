"""`vlp demo` shortened (3,000 pairs, 8,960 samples), for the `short_demo` fixture of tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_SUITE = """name: demo-test
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


def run_vlp(args: list[str], env: dict | None = None) -> str:
    """`python -m vlp ARGS` from the repository root, as a user runs it; its stdout (it must succeed)."""
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@dataclass(frozen=True)
class ShortDemo:
    root: Path  # data/ (synthetic pairs and shards), run/ (the trained model and its report), suite.yaml
    printed: str  # what `vlp demo` printed
    env: dict  # the environment it ran in (its own eval cache)

    @property
    def run(self) -> Path:
        return self.root / "run"


def run_short_demo(root: Path) -> ShortDemo:
    """Run the shortened demo into root (which holds the trained model, its data and its report afterwards)."""
    (root / "suite.yaml").write_text(DEMO_SUITE)
    env = dict(os.environ, VLP_CACHE_DIR=str(root / "cache"))
    printed = run_vlp(["demo", "--config", "configs/demo.yaml", "demo.pairs=3000", f"demo.data_dir={root / 'data'}",
                       f"demo.eval_suite={root / 'suite.yaml'}", "train.samples=8960", "optim.warmup_steps=10",
                       f"train.output_dir={root / 'run'}"], env)
    return ShortDemo(root, printed, env)
