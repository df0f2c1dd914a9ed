"""`vlp shards inspect DIR`: what is in a shard build, at a glance.

Reads manifest.json and the per-shard parquet records (cheap: no image is
decoded), and prints counts, failure reasons, histograms of image size and
caption length, and a few sample captions.

An indexed folder (`vlp shards index`: img2dataset's output, or bare tars)
is shown the same way from what it has: img2dataset's parquet files carry
the same record columns (a column one lacks, such as caption without a
caption column, leaves its histogram empty), and bare tars have none, so
only their counts are shown.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from vlp.data_tools.verify import load_manifest

from vlp.core import storage


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


def _written_records(tar: str, unreadable: list[str], indexed: bool = False) -> list[dict] | None:
    """The success records of a shard's parquet; a missing or damaged one is named in the report instead.

    For an indexed folder, a missing parquet is None (counted, not named: bare tars have none), and
    the columns it lacks are None in every record.
    """
    path = tar[: -len(".tar")] + ".parquet"  # a path or an object-storage URL
    if indexed and not storage.exists(path):
        return None
    try:
        data = pa.BufferReader(storage.read_bytes(path))
        if indexed:
            names = set(pq.read_schema(data).names)
            columns = [c for c in RECORD_COLUMNS if c in names]
            if "status" not in columns:
                raise ValueError("no status column")
            records = [{**dict.fromkeys(RECORD_COLUMNS), **r}
                       for r in pq.read_table(data, columns=columns).to_pylist()]
            return [r for r in records if r["status"] == "success"]
        records = pq.read_table(data, columns=list(RECORD_COLUMNS)).to_pylist()
    except Exception as err:  # missing file, not parquet, columns missing: reported, not fatal
        unreadable.append(f"{path.rsplit('/', 1)[-1]}: unreadable records ({type(err).__name__}: {str(err)[:120]})")
        return []
    return [r for r in records if r["status"] == "success" and None not in r.values()]


def _known(records: list[dict], *columns: str) -> list[dict]:
    return [r for r in records if all(r[c] is not None for c in columns)]


def inspect_shards(folder: str | Path, samples: int = 5, seed: int = 0) -> str:
    folder = str(folder)  # a path or an object-storage URL
    manifest = load_manifest(folder)
    indexed = manifest.source == "index"
    unreadable: list[str] = []
    per_shard = [_written_records(storage.join(folder, s.name), unreadable, indexed) for s in manifest.shards]
    written = [r for records in per_shard if records for r in records]
    lines = [
        f"{folder}: {len(manifest.shards)} shards",
        f"rows={manifest.rows} written={manifest.written} failed={manifest.failed} "
        f"duplicates={manifest.duplicates}",
    ]
    if indexed:
        with_stats = sum(1 for s in manifest.shards if (s.model_extra or {}).get("stats") is True)
        lines.append(f"indexed by `vlp shards index`: samples counted from the tars; rows and failures from "
                     f"_stats.json for {with_stats} of {len(manifest.shards)} shards (failures were not recorded "
                     f"by vlp)")
        missing = sum(records is None for records in per_shard)
        if missing:
            lines.append(f"no .parquet records for {missing} of {len(manifest.shards)} shards: "
                         f"histograms and captions from the others only")
    lines += unreadable
    if manifest.failure_reasons:
        lines.append("failure reasons:")
        lines += [f"  {reason:<24} {n}" for reason, n in
                  sorted(manifest.failure_reasons.items(), key=lambda kv: -kv[1])]
    sizes = [s.samples for s in manifest.shards]
    if sizes:
        lines.append(f"samples per shard: min {min(sizes)}, max {max(sizes)}, mean {np.mean(sizes):.1f}")
    lines.append("image width (px):")
    lines += text_histogram([r["width"] for r in _known(written, "width")])
    lines.append("image height (px):")
    lines += text_histogram([r["height"] for r in _known(written, "height")])
    lines.append("original image shorter side (px):")
    lines += text_histogram([min(r["original_width"], r["original_height"])
                             for r in _known(written, "original_width", "original_height")])
    lines.append("caption length (characters):")
    captioned = _known(written, "caption", "key")
    lines += text_histogram([len(r["caption"]) for r in captioned])
    picks = random.Random(seed).sample(captioned, min(samples, len(captioned)))
    if picks:
        lines.append("sample captions:")
        lines += [f"  {r['key']}: {r['caption']}" for r in picks]
    return "\n".join(lines)
