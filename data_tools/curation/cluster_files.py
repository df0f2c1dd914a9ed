"""SemDeDup at any scale: cluster files written in one pass, each group of clusters deduplicated alone.

SemDeDup compares images only within their k-means cluster, so the set never needs to be in
memory at once:

1. k-means (faiss, spherical) trains on a uniform sample of the candidates (at most 256 points
   per centroid, as faiss's own cap, and at most TRAIN_POINTS);
2. one pass over the embed output, shard by shard, assigns each candidate to its nearest
   centroid and appends what the comparison needs (its row, cluster, image embedding as
   float16, and the caption embedding or thumbnail when those checks are on) to the file of its
   bucket: cluster mod B, with B chosen so that a bucket holds about `bucket_bytes`;
3. each bucket is read back alone and each of its clusters deduplicated as dedup.py does in
   memory (from the highest CLIP score down), so peak memory is one bucket, not the set;
   with `--engine ray` the buckets are deduplicated as Ray tasks, a few per CPU of the cluster
   in flight (each ships its bucket's arrays, so the driver holds that many buckets at most).

With the same centroids the decisions equal the in-memory ones exactly (a test checks it):
buckets only change what is in memory together, never which pairs are compared.
"""

from __future__ import annotations

import math
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vlp.data_tools import ray_engine
from vlp.data_tools.curation import copies
from vlp.data_tools.curation.dedup import (
    KMEANS_ITERATIONS,
    POINTS_PER_CENTROID,
    _greedy,
    caption_words,
    faiss_module,
)
from vlp.data_tools.curation.embeddings import Embeddings
from vlp.data_tools.output import private_dir

TRAIN_POINTS = 1_000_000  # k-means sample cap: 2 GB at 512-d, whatever the set's size
BUCKET_BYTES = 256 << 20
MAX_BUCKETS = 4096
TASKS_PER_CPU = 2  # with --engine ray: buckets in flight per CPU (the driver holds their arrays)


@dataclass
class Checks:
    """What makes two images of one cluster duplicates (dedup.semantic_duplicates' arguments)."""

    threshold: float
    hash_distance: int | None = None
    caption_threshold: float | None = None
    copy_distance: float | None = None
    same_caption: bool = False  # the captions' words must match too (dedup.caption_words keys)


@dataclass
class Stats:
    buckets: int = 0
    largest_bucket: int = 0  # candidates in the largest bucket (what memory holds at once)
    train_points: int = 0


def centroids(emb: Embeddings, rows: np.ndarray, k: int, seed: int = 0) -> tuple[object | None, int]:
    """A faiss index of k spherical k-means centroids trained on a sample of `rows` (None when k == 1)."""
    if k <= 1:
        return None, 0
    m = min(len(rows), k * POINTS_PER_CENTROID, TRAIN_POINTS)
    sample = rows if m == len(rows) else np.sort(np.random.default_rng(seed).choice(rows, m, replace=False))
    x = np.ascontiguousarray(emb.image_embeddings(sample), dtype=np.float32)
    faiss = faiss_module()
    kmeans = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                          max_points_per_centroid=max(POINTS_PER_CENTROID, math.ceil(m / k)), verbose=False)
    kmeans.train(x)
    return kmeans.index, m


class _Bucket:
    """One bucket's files: parallel raw arrays, appended shard by shard."""

    def __init__(self, folder: Path, b: int):
        self.base = folder / f"bucket{b:05d}"
        self.count = 0

    def append(self, **arrays: np.ndarray) -> None:
        for name, array in arrays.items():
            with open(f"{self.base}.{name}", "ab") as fh:
                np.ascontiguousarray(array).tofile(fh)
        self.count += len(next(iter(arrays.values())))

    def read(self, name: str, dtype, width: int | None = None) -> np.ndarray:
        path = Path(f"{self.base}.{name}")
        if not path.exists():
            return np.zeros((0, width) if width else 0, dtype)
        array = np.fromfile(path, dtype=dtype)
        return array.reshape(-1, width) if width else array


@dataclass
class Engine:
    """Where buckets are deduplicated: here, or as tasks on a Ray cluster (`ray_address`, else $RAY_ADDRESS,
    else a Ray instance started on this machine with `cpus` CPUs)."""

    kind: str = "local"
    ray_address: str | None = None
    cpus: int = 1


def semantic_duplicates(emb: Embeddings, rows: np.ndarray, scores: np.ndarray, hashes: np.ndarray, k: int,
                        checks: Checks, bucket_bytes: int = BUCKET_BYTES, seed: int = 0,
                        engine: Engine | None = None) -> tuple[dict[int, tuple[int, float]], Stats]:
    """{removed row: (kept row it duplicates, cosine)} over the candidate rows (global row numbers, sorted);
    `scores` and `hashes` are indexed by global row."""
    stats = Stats()
    if not len(rows):
        return {}, stats
    k = max(1, min(k, len(rows)))
    index, stats.train_points = centroids(emb, rows, k, seed)
    dim = emb.image_embeddings(rows[:1]).shape[1]
    text_dim = emb.text_embeddings(rows[:1]).shape[1] if checks.caption_threshold is not None else 0
    per_row = 8 + 4 + 2 * dim + 2 * text_dim + (copies.SIZE if checks.copy_distance is not None else 0)
    n_buckets = int(min(k, MAX_BUCKETS, max(1, math.ceil(len(rows) * per_row / bucket_bytes))))
    stats.buckets = n_buckets
    folder = private_dir("semdedup")  # a killed run's is removed by the next
    try:
        buckets = [_Bucket(folder, b) for b in range(n_buckets)]
        _write_buckets(emb, rows, index, buckets, checks)
        stats.largest_bucket = max(bucket.count for bucket in buckets)
        # with same_caption: each caption's words as a key, from the embed table's captions
        words = np.array([caption_words(c) for c in emb.table.column("caption").to_pylist()], np.int64) \
            if checks.same_caption else None
        loaded = (_load(bucket, dim, text_dim, scores, hashes, checks, words) for bucket in buckets if bucket.count)
        run = _on_ray(loaded, checks, engine) if engine is not None and engine.kind == "ray" else (
            dedup_bucket(arrays, checks) for arrays in loaded)
        removed: dict[int, tuple[int, float]] = {}
        for found in run:
            removed.update(found)
        return removed, stats
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_buckets(emb: Embeddings, rows: np.ndarray, index, buckets: list[_Bucket], checks: Checks) -> None:
    """The one pass: each shard's candidates assigned to a cluster and appended to their buckets' files."""
    shard_of = emb.table.column("shard").to_numpy()[rows]
    for shard in np.unique(shard_of):
        mine = rows[shard_of == shard]
        x = np.ascontiguousarray(emb.image_embeddings(mine), dtype=np.float32)
        cluster = np.zeros(len(mine), np.int32) if index is None else index.search(x, 1)[1][:, 0].astype(np.int32)
        text = emb.text_embeddings(mine) if checks.caption_threshold is not None else None
        thumbs = copies.as_array(emb.thumbnails(mine))[0] if checks.copy_distance is not None else None
        which = cluster % len(buckets)
        for b in np.unique(which):
            sel = which == b
            arrays = {"rows": mine[sel].astype(np.int64), "cluster": cluster[sel], "img": x[sel].astype(np.float16)}
            if text is not None:
                arrays["text"] = text[sel].astype(np.float16)
            if thumbs is not None:
                arrays["thumb"] = thumbs[sel]
            buckets[int(b)].append(**arrays)


@dataclass
class BucketArrays:
    """What deduplicating one bucket needs, by position in the bucket (scores and hashes of its rows)."""

    rows: np.ndarray
    cluster: np.ndarray
    image: np.ndarray
    text: np.ndarray | None
    thumbs: np.ndarray | None
    scores: np.ndarray
    hashes: np.ndarray
    words: np.ndarray | None = None


def _load(bucket: _Bucket, dim: int, text_dim: int, scores: np.ndarray, hashes: np.ndarray,
          checks: Checks, words: np.ndarray | None = None) -> BucketArrays:
    rows = bucket.read("rows", np.int64)
    return BucketArrays(
        rows, bucket.read("cluster", np.int32), bucket.read("img", np.float16, dim).astype(np.float32),
        bucket.read("text", np.float16, text_dim).astype(np.float32) if text_dim else None,
        bucket.read("thumb", np.uint8, copies.SIZE) if checks.copy_distance is not None else None,
        scores[rows], hashes[rows], None if words is None else words[rows])


def dedup_bucket(a: BucketArrays, checks: Checks) -> dict[int, tuple[int, float]]:
    """Each cluster of the bucket deduplicated alone (runs here or as a Ray task)."""
    removed = {}
    for c in np.unique(a.cluster):
        members = np.nonzero(a.cluster == c)[0]
        # best caption fit first, ties in row order (as dedup.semantic_duplicates)
        members = members[np.lexsort((a.rows[members], -np.nan_to_num(a.scores[members], nan=-np.inf)))]
        found = _greedy(a.image, members, checks.threshold, a.hashes, checks.hash_distance, a.text,
                        checks.caption_threshold, a.thumbs, checks.copy_distance, a.words)
        removed.update({int(a.rows[i]): (int(a.rows[j]), cosine) for i, (j, cosine) in found.items()})
    return removed


def _on_ray(loaded: Iterator[BucketArrays], checks: Checks, engine: Engine) -> Iterator[dict[int, tuple[int, float]]]:
    """dedup_bucket as Ray tasks, TASKS_PER_CPU per CPU of the cluster in flight, results in bucket order."""
    ray = ray_engine.ray_module()
    started = ray_engine.connect(engine.ray_address, engine.cpus)
    window: deque = deque()
    try:
        task = ray.remote(dedup_bucket).options(max_retries=ray_engine.MAX_RETRIES, scheduling_strategy="SPREAD")
        size = TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
        for arrays in loaded:
            window.append(task.remote(arrays, checks))
            if len(window) >= size:
                yield ray.get(window.popleft())
        while window:
            yield ray.get(window.popleft())
    finally:
        for ref in window:  # stopped early: no work left behind on the cluster
            ray.cancel(ref)
        ray_engine.disconnect(started)
