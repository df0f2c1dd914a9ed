"""Eval decontamination: training images that are near-duplicates of any image of an eval suite.

Every image of every task of the suite (the same files `vlp eval` would read:
synthetic sets are generated, URLs fetched) is encoded with the model the
training set was embedded with; a training image whose cosine to its nearest
eval image (faiss, exact inner-product search) reaches the threshold is
removed, naming the task and the eval image it matched. Crops and
re-encodings of an eval image keep a cosine near 1, so the threshold can sit
well above the similarity of merely alike images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vlp.data_tools.curation.dedup import faiss_module
from vlp.eval.features import FeatureStore
from vlp.eval.models import Encoder
from vlp.eval.suite import load_suite
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.base import Context, default_cache_dir


@dataclass
class EvalImages:
    features: np.ndarray  # (n, dim) float32, normalised
    names: list[str]  # "task: where the image is", per row
    failed: int  # images the suite names that could not be read (not matched against)


def eval_images(suite: str, encoder: Encoder, progress: bool = False) -> EvalImages:
    tasks = [TASKS[s.type](s, Context(cache_dir=default_cache_dir())) for s in load_suite(suite).tasks]
    store = FeatureStore(encoder, progress=progress)
    features, names, failed = [], [], 0
    for task in tasks:
        task.load()
        refs, _ = task.inputs()
        refs = list({r.key: r for r in refs}.values())  # an image shared by items counts once
        store.prefetch(refs, [], desc=f"decontaminate {task.name}", fetch_opts=task.fetch_options())
        feats, failures = store.images(refs)
        ok = [i for i in range(len(refs)) if i not in failures]
        failed += len(failures)
        features.append(feats.numpy()[ok])
        names += [f"{task.name}: {_short(refs[i].describe())}" for i in ok]
    dim = encoder.dim
    return EvalImages(np.concatenate(features) if features else np.zeros((0, dim), np.float32), names, failed)


def _short(where: str) -> str:
    """An eval image's location without the cache folder in front (stable across machines)."""
    cache = str(default_cache_dir())
    return where[len(cache) + 1:] if where.startswith(cache) else where


def matches(train: np.ndarray, evals: EvalImages, threshold: float) -> dict[int, tuple[str, float]]:
    """{training row index: (the eval image it matched, cosine)} for rows at or above the threshold."""
    if not len(evals.features) or not len(train):
        return {}
    faiss = faiss_module()
    index = faiss.IndexFlatIP(evals.features.shape[1])
    index.add(np.ascontiguousarray(evals.features, dtype=np.float32))
    sims, nearest = index.search(np.ascontiguousarray(train, dtype=np.float32), 1)
    hits = np.nonzero(sims[:, 0] >= threshold)[0]
    return {int(i): (evals.names[int(nearest[i, 0])], float(sims[i, 0])) for i in hits}
