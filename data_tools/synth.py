"""`vlp shards synth`: write synthetic pairs (pairs.csv + PNGs) for the shard builder."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from vlp.core.atomic import atomic_file
from vlp.core.errors import UserError
from vlp.core.processes import die_with_parent
from vlp.core.synth.language import caption, counterfactuals, describe
from vlp.core.synth.render import render
from vlp.core.synth.world import Scene, item_rng, sample_scene

CSV_COLUMNS: tuple[str, ...] = ("url", "caption", "kind", "scene", "counts", "n_objects", "hard_negatives")


def make_pair(seed: int, index: int, image_size: int = 64) -> tuple[Scene, str, Image.Image]:
    """Scene, caption and image of item `index` of the data set with this seed."""
    rng = item_rng(seed, index)
    scene = sample_scene(rng)
    return scene, caption(scene, rng), render(scene, image_size)


def _write_chunk(job: tuple[str, int, int, int, int]) -> list[list[str]]:
    """Worker: render items [start, stop), save their PNGs, return their CSV rows in order."""
    out_dir, seed, image_size, start, stop = job
    rows = []
    for i in range(start, stop):
        rng = item_rng(seed, i)  # the same draws as make_pair, then the counterfactuals
        scene = sample_scene(rng)
        statement = describe(scene, rng)
        negatives = json.dumps(counterfactuals(scene, rng, statement), separators=(",", ":"))
        rel = f"images/{i:06d}.png"
        render(scene, image_size).save(os.path.join(out_dir, rel), format="PNG")
        counts = json.dumps(scene.counts(), separators=(",", ":"))
        rows.append([rel, statement.text(), scene.kind, scene.to_json(), counts, str(len(scene.objects)), negatives])
    return rows


def generate(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    image_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write n pairs as out_dir/images/NNNNNN.png plus out_dir/pairs.csv; return the CSV path.

    The CSV is what `vlp shards build` reads: `url` is relative to the CSV's
    folder, `kind`/`scene`/`counts`/`n_objects` carry the ground truth for
    analysis, and `hard_negatives` the caption's counterfactuals by kind
    (JSON), which the loader feeds to the hard-negative loss term. Output bytes depend only on (n, seed, image_size): each item
    has its own RNG, and rows are written in index order whatever `workers`
    is. PNG keeps the ground truth lossless. The CSV is written last, through
    a temporary file, so a CSV present means a complete set.
    """
    if n < 0:
        raise UserError(f"--n must be >= 0, got {n}")
    if image_size < 16:
        raise UserError(f"--image-size must be >= 16 to keep shapes recognisable, got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    chunk = max(1, min(250, -(-n // max(1, 4 * workers))))
    jobs = [(str(out), seed, image_size, a, min(n, a + chunk)) for a in range(0, n, chunk)]
    csv_path = out / "pairs.csv"
    with (
        atomic_file(csv_path) as raw,
        tqdm(total=n, unit="pair", desc="synth", leave=False, disable=not progress) as bar,
    ):
        fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for rows in _run(jobs, workers):
            writer.writerows(rows)
            bar.update(len(rows))
        fh.flush()
        fh.detach()  # atomic_file closes the binary file
    return csv_path


def _run(jobs: list[tuple[str, int, int, int, int]], workers: int) -> Iterable[list[list[str]]]:
    """Chunk results in job order, in this process or in a pool of `workers`."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_write_chunk, jobs)
        return
    # spawn, not fork: callers (vlp demo) may have torch's threads running, which fork can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), initializer=die_with_parent) as pool:
        yield from pool.imap(_write_chunk, jobs)  # imap keeps job order
