"""`vlp shards inspect DIR`: what is in a shard build, at a glance.

Reads manifest.json and the per-shard parquet records (cheap: no image is
decoded), and prints counts, failure reasons, histograms of image size and
caption length, and a few sample captions.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from vlp.data_tools.verify import load_manifest


def text_histogram(values: list[float], bins: int = 8, width: int = 40) -> list[str]:
    """Lines like ' 12 -  25 | ######### 130' for a terminal."""
    if not values:
        return ["  (no data)"]
    arr = np.asarray(values, dtype=float)
    if arr.min() == arr.max():
        return [f"  {arr.min():8.0f}            | {'#' * width} {len(arr)}"]
    counts, edges = np.histogram(arr, bins=min(bins, len(np.unique(arr))))
    top = max(int(counts.max()), 1)
    return [
        f"  {lo:8.0f} - {hi:8.0f} | {'#' * round(width * c / top):<{width}} {c}"
        for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True)
    ]


RECORD_COLUMNS = ("status", "key", "caption", "width", "height", "original_width", "original_height")


def _written_records(tar: Path, unreadable: list[str]) -> list[dict]:
    """The success records of a shard's parquet; a missing or damaged one is named in the report instead."""
    path = tar.with_suffix(".parquet")
    try:
        records = pq.read_table(path, columns=list(RECORD_COLUMNS)).to_pylist()
    except Exception as err:  # missing file, not parquet, columns missing: reported, not fatal
        unreadable.append(f"{path.name}: unreadable records ({type(err).__name__}: {str(err)[:120]})")
        return []
    return [r for r in records if r["status"] == "success" and None not in r.values()]


def inspect_shards(folder: str | Path, samples: int = 5, seed: int = 0) -> str:
    folder = Path(folder)
    manifest = load_manifest(folder)
    unreadable: list[str] = []
    written = [r for s in manifest.shards for r in _written_records(folder / s.name, unreadable)]
    lines = [
        f"{folder}: {len(manifest.shards)} shards",
        f"rows={manifest.rows} written={manifest.written} failed={manifest.failed} "
        f"duplicates={manifest.duplicates}",
    ]
    lines += unreadable
    if manifest.failure_reasons:
        lines.append("failure reasons:")
        lines += [f"  {reason:<24} {n}" for reason, n in
                  sorted(manifest.failure_reasons.items(), key=lambda kv: -kv[1])]
    sizes = [s.samples for s in manifest.shards]
    if sizes:
        lines.append(f"samples per shard: min {min(sizes)}, max {max(sizes)}, mean {np.mean(sizes):.1f}")
    lines.append("image width (px):")
    lines += text_histogram([r["width"] for r in written])
    lines.append("image height (px):")
    lines += text_histogram([r["height"] for r in written])
    lines.append("original image shorter side (px):")
    lines += text_histogram([min(r["original_width"], r["original_height"]) for r in written])
    lines.append("caption length (characters):")
    lines += text_histogram([len(r["caption"]) for r in written])
    picks = random.Random(seed).sample(written, min(samples, len(written)))
    if picks:
        lines.append("sample captions:")
        lines += [f"  {r['key']}: {r['caption']}" for r in picks]
    return "\n".join(lines)
