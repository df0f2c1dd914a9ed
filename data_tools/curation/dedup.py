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
fits its image best is kept.
"""

from __future__ import annotations

import numpy as np

from vlp.core.errors import UserError

KMEANS_ITERATIONS = 20
POINTS_PER_CENTROID = 256  # faiss's default cap: k-means trains on a sample of k * 256 points
BLOCK = 4096  # rows of a cluster's similarity matrix computed at once


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


def semantic_duplicates(x: np.ndarray, scores: np.ndarray, threshold: float, k: int) -> dict[int, tuple[int, float]]:
    """{removed index: (kept index it is a near-duplicate of, cosine)} over the rows of x."""
    assigned = clusters(x, k)
    removed: dict[int, tuple[int, float]] = {}
    for c in np.unique(assigned):
        members = np.nonzero(assigned == c)[0]
        # best caption fit first; np.lexsort sorts by the last key first
        members = members[np.lexsort((members, -np.nan_to_num(scores[members], nan=-np.inf)))]
        removed.update(_greedy(x, members, threshold))
    return removed


def _greedy(x: np.ndarray, members: np.ndarray, threshold: float) -> dict[int, tuple[int, float]]:
    """Visit members in order; remove one within `threshold` of a member kept before it."""
    kept: list[int] = []
    removed: dict[int, tuple[int, float]] = {}
    for start in range(0, len(members), BLOCK):
        block = members[start:start + BLOCK]
        sims_to_kept = x[block] @ x[kept].T if kept else np.zeros((len(block), 0), np.float32)
        sims_inside = x[block] @ x[block].T
        kept_inside: list[int] = []  # positions in block
        for i, row in enumerate(block):
            best, best_sim = -1, -np.inf
            if sims_to_kept.shape[1]:
                j = int(np.argmax(sims_to_kept[i]))
                best, best_sim = kept[j], float(sims_to_kept[i, j])
            if kept_inside:
                j = int(np.argmax(sims_inside[i, kept_inside]))
                if sims_inside[i, kept_inside[j]] > best_sim:
                    best, best_sim = int(block[kept_inside[j]]), float(sims_inside[i, kept_inside[j]])
            if best_sim >= threshold:
                removed[int(row)] = (best, best_sim)
            else:
                kept_inside.append(i)
        kept += [int(block[i]) for i in kept_inside]
    return removed
