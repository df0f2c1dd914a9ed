"""Duplicates: exact (the same image bytes) and semantic (SemDeDup: near-identical image embeddings).

Exact: the sha256 of each image member, across every shard set; the first in
shard order is kept, the others name it.

Semantic (Abbas et al., 2023, "SemDeDup"): cluster the image embeddings with
k-means (faiss; it trains on at most 256 points per centroid, a sample when
the set is large, then every embedding is assigned to its nearest centroid),
then within each cluster compare every pair by cosine. Inside a cluster the
samples are visited from the highest CLIP score down (ties: shard order); a
sample whose cosine to an already kept one reaches the threshold is removed
and names that one. So of a group of near-duplicates the pair whose caption
fits its image best is kept. With a hash distance, a pair must also have
perceptual hashes (phash.py) within that many bits: for a model that embeds
alike pictures as closely as copies (see decontaminate.py). With a caption
threshold, a pair must also have captions that close (text-embedding cosine):
a variant of a picture that says something else is not a duplicate of it.
With same-caption, a pair must also have captions of the same words (`caption_words`:
no model involved). With a copy distance, a pair must also have thumbnails (copies.py) within that
many grey levels once a small crop is undone (copies.aligned_distance): near-copies
only, on flat drawings as on photos.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from vlp.data_tools.curation import copies
from vlp.data_tools.curation.phash import distances

from vlp.core.errors import UserError

KMEANS_ITERATIONS = 20
POINTS_PER_CENTROID = 256  # faiss's default cap: k-means trains on a sample of k * 256 points


def caption_words(caption: str | None) -> int:
    """A 63-bit key of a caption's words, case folded, punctuation and spacing dropped (equal keys: same words)."""
    words = " ".join(re.findall(r"\w+", (caption or "").casefold()))
    return int.from_bytes(hashlib.blake2b(words.encode(), digest_size=8).digest(), "little") >> 1


def exact_duplicates(sha256: list[str | None], candidates: np.ndarray) -> dict[int, int]:
    """{removed row: the row it duplicates} among the candidate rows (in row order: the first is kept)."""
    first: dict[str, int] = {}
    removed: dict[int, int] = {}
    for row in np.nonzero(candidates)[0]:
        digest = sha256[row]
        if digest is None:
            continue
        if digest in first:
            removed[int(row)] = first[digest]
        else:
            first[digest] = int(row)
    return removed


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise UserError("semantic dedup and decontamination need faiss: pip install 'vlp[curate]'") from None
    return faiss


def clusters(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The k-means cluster of every row of x (float32, L2-normalised)."""
    faiss = faiss_module()
    k = max(1, min(k, len(x)))
    if k == 1:
        return np.zeros(len(x), np.int64)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                          max_points_per_centroid=POINTS_PER_CENTROID, verbose=False)
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    return assigned[:, 0]


def semantic_duplicates(x: np.ndarray, scores: np.ndarray, threshold: float, k: int,
                        hashes: np.ndarray | None = None, hash_distance: int | None = None,
                        text: np.ndarray | None = None, caption_threshold: float | None = None,
                        thumbs: np.ndarray | None = None, copy_distance: float | None = None,
                        words: np.ndarray | None = None) -> dict[int, tuple[int, float]]:
    """{removed index: (kept index it is a near-duplicate of, cosine)} over the rows of x. With
    `hash_distance`, a pair counts only if the images' perceptual hashes are that close too; with
    `caption_threshold`, only if their captions (rows of `text`) are that close too: a variant of a
    picture with other words ("woman firefighter" beside "firefighter") is kept; with `copy_distance`, only
    if their thumbnails (rows of `thumbs`) are that close too; with `words` (caption_words of each row), only
    if their captions have the same words."""
    assigned = clusters(x, k)
    removed: dict[int, tuple[int, float]] = {}
    for c in np.unique(assigned):
        members = np.nonzero(assigned == c)[0]
        # best caption fit first; np.lexsort sorts by the last key first
        members = members[np.lexsort((members, -np.nan_to_num(scores[members], nan=-np.inf)))]
        removed.update(_greedy(x, members, threshold, hashes, hash_distance, text, caption_threshold, thumbs,
                               copy_distance, words))
    return removed


def _greedy(x: np.ndarray, members: np.ndarray, threshold: float, hashes: np.ndarray | None,
            hash_distance: int | None, text: np.ndarray | None = None, caption_threshold: float | None = None,
            thumbs: np.ndarray | None = None, copy_distance: float | None = None,
            words: np.ndarray | None = None) -> dict[int, tuple[int, float]]:
    """Visit members in order; remove one that is a near-duplicate of a member kept before it."""
    kept = np.empty(len(members), np.int64)  # indices of the kept members, the first n of them
    kept_x = np.empty((len(members), x.shape[1]), x.dtype)  # their embeddings, contiguous
    n = 0
    removed: dict[int, tuple[int, float]] = {}
    for row in members:
        sims = kept_x[:n] @ x[row]
        close = sims >= threshold
        if hash_distance is not None and close.any():
            close &= distances(np.full(n, hashes[row]), hashes[kept[:n]]) <= hash_distance
        if caption_threshold is not None and close.any():
            close &= text[kept[:n]] @ text[row] >= caption_threshold
        if words is not None and close.any():
            close &= words[kept[:n]] == words[row]
        if copy_distance is not None and close.any():
            candidates = np.nonzero(close)[0]  # a few: the slower crop-tolerant comparison only for them
            close[candidates] = copies.aligned_distance(thumbs[row], thumbs[kept[candidates]]) <= copy_distance
        if close.any():
            j = int(np.argmax(np.where(close, sims, -np.inf)))
            removed[int(row)] = (int(kept[j]), float(sims[j]))
        else:
            kept[n], kept_x[n] = row, x[row]
            n += 1
    return removed
