"""The documentation site builds with warnings as errors, and its generated pages say what the code says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly_with_the_generated_pages(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's notice about its successor, not a finding
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = (tmp_path / "reference" / "index.html").read_text()
    from vlp.core.config import OptimConfig

    # every key of every command, from the schemas: one known key and its default
    assert "optim.lr" in reference and "data.lanes" in reference and "decontaminate_threshold" in reference
    assert str(OptimConfig().lr) in reference
    results = (tmp_path / "results" / "index.html").read_text()
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):  # every result file has its section
        import json

        assert json.loads(path.read_text())["title"].split("`")[0].strip()[:20] in results, path.name
    home = (tmp_path / "index.html").read_text()
    assert "pip install -e" in home and re.search(r'href="parity/"', home)
