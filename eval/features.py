"""Encode each image and each text once per run, and hand tasks their features from a cache.

Tasks never call the model. The runner asks a task which images and texts it
needs, `FeatureStore.prefetch` encodes the ones not seen yet (split across
ranks, batched, one progress bar per task on rank 0), and the task then reads
features with `images()` / `texts()`. Keys: `ImageRef.key` (path or tar
offset, plus crop) and the exact text string, so "a photo of a circle."
shared by two tasks, or a COCO image shared by seven SugarCrepe subsets, is
encoded once. An image that fails to load is cached as its failure, so it is
fetched once and reported by every task that uses it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from vlp.eval.encoders import Encoder
from vlp.eval.image_refs import ImageFailure, ImageRef, load_image
from vlp.eval.parallel import run_sharded

from vlp.core.distributed import rank_and_world
from vlp.core.fetch import FetchOptions
from vlp.core.images import return_freed_pixels


@dataclass
class EncodeStats:
    """How much work the cache saved, for the report."""

    images_encoded: int = 0
    images_failed: int = 0
    image_cache_hits: int = 0
    texts_encoded: int = 0
    text_cache_hits: int = 0
    seconds: float = 0.0
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)


def _unique(keys: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(keys))


class FeatureStore:
    """Features by image key and by text, filled by `prefetch`, read by tasks."""

    def __init__(self, encoder: Encoder, workers: int = 8, progress: bool = True):
        self.encoder = encoder
        self.workers = max(1, workers)
        self.progress = progress
        self._images: dict[str, torch.Tensor] = {}
        self._failures: dict[str, ImageFailure] = {}
        self._texts: dict[str, torch.Tensor] = {}
        self.stats = EncodeStats()

    # ------------------------------------------------------------------ filling

    def prefetch(
        self,
        refs: Sequence[ImageRef],
        texts: Sequence[str],
        desc: str,
        fetch_opts: FetchOptions | None = None,
    ) -> None:
        """Encode whatever of `refs` and `texts` is not cached yet (every rank must call this alike)."""
        start = time.perf_counter()
        by_key = {r.key: r for r in refs}
        new_refs = [by_key[k] for k in _unique(by_key) if k not in self._images and k not in self._failures]
        new_texts = [t for t in _unique(texts) if t not in self._texts]
        self.stats.image_cache_hits += len(by_key) - len(new_refs)
        self.stats.text_cache_hits += len(set(texts)) - len(new_texts)
        rank, world = rank_and_world()
        with tqdm(
            total=len(new_refs) + len(new_texts),
            desc=desc,
            unit="item",
            leave=False,
            disable=not self.progress or rank != 0,
        ) as bar:
            if new_refs:
                self._encode_images(new_refs, bar, world, fetch_opts)
            if new_texts:
                self._encode_texts(new_texts, bar, world)
        self.stats.per_task[desc] = {"images_encoded": len(new_refs), "texts_encoded": len(new_texts)}
        self.stats.seconds += time.perf_counter() - start

    def _encode_images(
        self, refs: list[ImageRef], bar: tqdm, world: int, fetch_opts: FetchOptions | None
    ) -> None:
        batch = self.encoder.batch_size

        return_freed_pixels()  # several threads decode at once

        def encode(mine: list[ImageRef]) -> tuple[torch.Tensor, list[tuple[int, ImageFailure]]]:
            out = torch.zeros(len(mine), self.encoder.dim)
            failures: list[tuple[int, ImageFailure]] = []
            with ThreadPoolExecutor(self.workers) as pool:
                for start in range(0, len(mine), batch):
                    chunk = mine[start : start + batch]
                    # Each thread decodes and preprocesses one image under the process's decode budget:
                    # a batch holds model-sized tensors, never a batch of full-size images.
                    loaded = list(pool.map(lambda r: load_image(r, fetch_opts, self.encoder.prepare), chunk))
                    ok = [i for i, x in enumerate(loaded) if not isinstance(x, ImageFailure)]
                    failures += [(start + i, x) for i, x in enumerate(loaded) if isinstance(x, ImageFailure)]
                    if ok:
                        out[[start + i for i in ok]] = self.encoder.encode_prepared([loaded[i] for i in ok])
                    bar.update(len(chunk) * world)
            return out, failures

        feats, failures = run_sharded(refs, encode, self.encoder.dim)
        failed = {i for i, _ in failures}
        for i, failure in failures:
            self._failures[refs[i].key] = failure
        for i, ref in enumerate(refs):
            if i not in failed:
                self._images[ref.key] = feats[i]
        self.stats.images_encoded += len(refs) - len(failed)
        self.stats.images_failed += len(failed)

    def _encode_texts(self, texts: list[str], bar: tqdm, world: int) -> None:
        batch = self.encoder.batch_size

        def encode(mine: list[str]) -> tuple[torch.Tensor, list]:
            parts = []
            for start in range(0, len(mine), batch):
                parts.append(self.encoder.encode_texts(mine[start : start + batch]))
                bar.update(len(parts[-1]) * world)
            feats = torch.cat(parts) if parts else torch.zeros(0, self.encoder.dim)
            return feats, []

        feats, _ = run_sharded(texts, encode, self.encoder.dim)
        for text, feat in zip(texts, feats, strict=True):
            self._texts[text] = feat
        self.stats.texts_encoded += len(texts)

    def insert(
        self, images: dict[str, torch.Tensor] | None = None, texts: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Put features computed elsewhere into the cache (by image key / text); later prefetches skip them."""
        for key, feat in (images or {}).items():
            self._images[key] = feat.float().cpu()
            self._failures.pop(key, None)
        for text, feat in (texts or {}).items():
            self._texts[text] = feat.float().cpu()

    # ------------------------------------------------------------------ reading

    def images(self, refs: Sequence[ImageRef]) -> tuple[torch.Tensor, dict[int, ImageFailure]]:
        """(len(refs), dim) features, zero rows where loading failed, and {position: failure}."""
        out = torch.zeros(len(refs), self.encoder.dim)
        failures: dict[int, ImageFailure] = {}
        for i, ref in enumerate(refs):
            feat = self._images.get(ref.key)
            if feat is not None:
                out[i] = feat
            elif ref.key in self._failures:
                failures[i] = self._failures[ref.key]
            else:
                raise KeyError(f"image {ref.key} was never prefetched")
        return out, failures

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), dim) features."""
        if not texts:
            return torch.zeros(0, self.encoder.dim)
        return torch.stack([self._texts[t] for t in texts])
