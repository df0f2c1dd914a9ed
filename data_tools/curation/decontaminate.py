"""Eval decontamination: training images that are near-duplicates of any image of an eval suite.

Every image of every task of the suite (the same files `vlp eval` would read:
synthetic sets are generated, URLs fetched) is encoded with the model the
training set was embedded with; a training image whose cosine to its nearest
eval image (faiss, exact inner-product search) reaches the threshold is
removed, naming the task and the eval image it matched. Crops and
re-encodings of an eval image keep a cosine near 1, so with a model of rich
semantics the threshold can sit well above the similarity of merely alike
images. A model trained on few concepts (vlp's synthetic world) embeds
different pictures of the same content as closely as copies (the demo's
model puts many training images within 0.98 of some eval image);
`copy_distance` (on by default) then also asks the two images' thumbnails
(copies.py: the nearest of the eval image's views, or the two aligned, see
`copy_distances`) to be within that many grey levels, which copies, resizes,
re-encodings and small crops are, photos and flat drawings alike;
`hash_distance` asks the same of their perceptual hashes (phash.py), which
flat drawings re-encoded as JPEG often are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from vlp.data_tools.curation import copies
from vlp.data_tools.curation.dedup import faiss_module
from vlp.data_tools.curation.phash import distances, phash
from vlp.data_tools.curation.samples import batches
from vlp.eval.encoders import Encoder
from vlp.eval.image_refs import ImageRef, load_image
from vlp.eval.suite import load_suite
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.base import Context, default_cache_dir


@dataclass
class EvalImages:
    features: np.ndarray  # (n, dim) float32, normalised
    hashes: np.ndarray  # (n,) int64 perceptual hashes
    thumbs: np.ndarray  # (n, VIEWS, copies.SIZE) uint8: each image's thumbnails (copies.views, the first repeated)
    names: list[str]  # "task: where the image is", per row
    failed: int  # images the suite names that could not be read (not matched against)


BATCH = 64
VIEWS = copies.VIEWS  # as it is, its small crops, centre square, black-padded square


def suite_images(suite: str) -> list[tuple[str, ImageRef]]:
    """(task name, image) for every task of the suite, in order; an image once per task."""
    out = []
    for spec in load_suite(suite).tasks:
        task = TASKS[spec.type](spec, Context(cache_dir=default_cache_dir()))
        task.load()
        out += [(task.name, ref) for ref in {r.key: r for r in task.inputs()[0]}.values()]
    return out


def eval_images(suite: str, encoder: Encoder) -> EvalImages:
    """Every distinct image of every task of the suite: embedded, hashed and named."""
    refs: dict[str, tuple[str, ImageRef]] = {}
    for name, ref in suite_images(suite):
        refs.setdefault(ref.key, (name, ref))  # an image shared by tasks counts once
    features, hashes, thumbs, names, failed = [], [], [], [], 0
    for batch in batches(list(refs.values()), BATCH):
        loaded = [(name, ref, load_image(ref)) for name, ref in batch]
        ok = [(name, ref, image) for name, ref, image in loaded if isinstance(image, Image.Image)]
        failed += len(loaded) - len(ok)
        if ok:
            features.append(encoder.encode_images([image for _, _, image in ok]).numpy())
            hashes += [phash(image) for _, _, image in ok]
            thumbs += [view_thumbnails(image) for _, _, image in ok]
            names += [f"{name}: {_short(ref.describe())}" for name, ref, _ in ok]
    dim = encoder.dim
    return EvalImages(np.concatenate(features) if features else np.zeros((0, dim), np.float32),
                      np.array(hashes, dtype=np.int64),
                      np.stack(thumbs) if thumbs else np.zeros((0, VIEWS, copies.SIZE), np.uint8), names, failed)


def view_thumbnails(image: Image.Image) -> np.ndarray:
    """(VIEWS, SIZE) uint8: the image's thumbnails (copies.views), the first repeated to fill VIEWS."""
    views = copies.views(image)
    views += views[:1] * (VIEWS - len(views))
    return np.stack([np.frombuffer(v, np.uint8) for v in views])


def _short(where: str) -> str:
    """An eval image's location without the cache folder in front (stable across machines)."""
    cache = str(default_cache_dir())
    return where[len(cache) + 1:] if where.startswith(cache) else where


def copy_distances(thumb: np.ndarray, eval_views: np.ndarray) -> np.ndarray:
    """A training thumbnail (SIZE,) against eval images' views (n, VIEWS, SIZE): for each eval image, the nearer
    of its nearest view and the crop-tolerant distance to the image as it is (copies.aligned_distance). A crop
    whose offset falls between the views' grid is far from every view on a sharp drawing, and aligning the
    blurred thumbnails finds it (bench/copy_signal.py measures both, on synthetic scenes and on drawings)."""
    nearest_view = copies.distance(thumb[None, None], eval_views).min(axis=1)
    return np.minimum(nearest_view, copies.aligned_distance(thumb, eval_views[:, 0]))


def matches(train: np.ndarray, train_hashes: np.ndarray, evals: EvalImages, threshold: float,
            hash_distance: int | None, train_thumbs: np.ndarray | None = None,
            copy_distance: float | None = None) -> dict[int, tuple[str, float]]:
    """{training row index: (the eval image it matched, cosine)}: of the eval images at or above the cosine
    threshold (faiss range search, exact), with `hash_distance` only those whose perceptual hash is within
    that many bits, with `copy_distance` only those whose thumbnail (nearest view) is within that many grey
    levels of the training image's (rows of `train_thumbs`; `copy_distances`), the most similar."""
    if not len(evals.features) or not len(train):
        return {}
    faiss = faiss_module()
    index = faiss.IndexFlatIP(evals.features.shape[1])
    index.add(np.ascontiguousarray(evals.features, dtype=np.float32))
    limits, sims, ids = index.range_search(np.ascontiguousarray(train, dtype=np.float32), threshold)
    found = {}
    for i in range(len(train)):
        cand, cand_sims = ids[limits[i]:limits[i + 1]], sims[limits[i]:limits[i + 1]]
        if hash_distance is not None and len(cand):
            close = distances(np.full(len(cand), train_hashes[i]), evals.hashes[cand]) <= hash_distance
            cand, cand_sims = cand[close], cand_sims[close]
        if copy_distance is not None and len(cand):
            close = copy_distances(train_thumbs[i], evals.thumbs[cand]) <= copy_distance
            cand, cand_sims = cand[close], cand_sims[close]
        if len(cand):
            best = int(np.argmax(cand_sims))
            found[i] = (evals.names[int(cand[best])], float(cand_sims[best]))
    return found
