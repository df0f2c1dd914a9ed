"""The training loader: shards -> `Batch`es of (uint8 images, token ids, keys).

The plan (vlp.train.loader.plan) decides which samples each rank and worker
reads, vlp.train.loader.reading reads them; this module decodes and augments
them, tokenises the captions and assembles batches inside the loader workers.

- Decoding: JPEGs are decoded at reduced size when the crop will be smaller
  anyway (Pillow's draft mode, libjpeg DCT scaling); then open_clip's train
  augmentation (random resized crop with a configurable scale range, bicubic,
  optional colour jitter). Each sample's randomness is seeded from its place
  in the epoch, so a resumed run augments exactly as the original did.
- Images leave the workers as uint8 (4x less to move between processes than
  float32); `normalize` turns them into model input on the training device,
  with the mean/std `vlp.core.models.image_normalization` reads off the model.
- A sample that is missing (truncated or lost shard) or does not decode is
  replaced by the next good sample of its shuffle window, and counted in the
  batch's `replaced` field; a bad sample never stops training, and batches
  keep their size so ranks stay in step.
- A batch is a `Batch` dataclass, built whole in a loader worker: the
  DataLoader runs with batch_size=None, so torch's collate passes it through
  untouched, and `Batch.pin_memory` lets the pinning thread pin its tensors.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import math
import os
import random
import signal
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.core.config import AugmentConfig, DataConfig, TextAugmentConfig
from vlp.core.errors import UserError
from vlp.core.images import decoding, draft, open_image, to_rgb_pixels
from vlp.core.processes import die_with_parent
from vlp.train.loader.augment import allows_flip, allows_grayscale, augment_text, json_field, pick_caption
from vlp.train.loader.batchplan import BatchPlan
from vlp.train.loader.plan import (
    PlanSpec,
    Segment,
    first_local_batch,
    steps_per_epoch,
    window_order,
    worker_batches,
    worker_pieces,
)
from vlp.train.loader.reading import IMAGE_KEYS, TEXT_KEYS, PieceReader, ShardStream
from vlp.train.loader.sources import Shard, resolve_sources

# ------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class TrainTransform:
    """open_clip's train augmentation on PIL, seeded per sample, output uint8 CHW."""

    image_size: int
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.0
    flip: float = 0.0  # probability, where the caption allows (vlp.train.loader.augment.allows_flip)
    grayscale: float = 0.0  # probability, where the caption allows (vlp.train.loader.augment.allows_grayscale)

    @classmethod
    def from_config(cls, image_size: int, aug: AugmentConfig) -> TrainTransform:
        return cls(image_size, (aug.scale_min, aug.scale_max), (aug.ratio_min, aug.ratio_max), aug.color_jitter,
                   aug.flip, aug.grayscale)

    def open(self, data: bytes) -> Image.Image:
        """The sample's image, opened (header only), set to decode no larger than the crop needs."""
        img = open_image(data)
        # The crop keeps at least sqrt(scale_min) of the shorter side; decode no larger than needed.
        need = math.ceil(self.image_size / math.sqrt(self.scale[0]))
        draft(img, need / min(img.size))
        return img

    def decode(self, data: bytes) -> Image.Image:
        """The sample's RGB pixels (vlp.core.images's policy), at reduced size when the crop allows."""
        return to_rgb_pixels(self.open(data))

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawn from a per-sample Python RNG.

        Same algorithm (10 tries at a random area fraction and log-uniform aspect
        ratio, then a centre crop clamped to the ratio range); a private RNG
        instead of torch's global one, whose reseeding per sample costs more
        than the decode (torch.manual_seed records a stack trace each call).
        """
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                return left, top, left + w, top + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, data: bytes, seed: int, caption: str = "") -> torch.Tensor:
        img = self.open(data)
        rng = random.Random(seed)
        size = (self.image_size, self.image_size)
        with decoding(img):
            img = to_rgb_pixels(img)
            img = img.resize(size, Image.Resampling.BICUBIC, box=self.crop_box(*img.size, rng))
        if self.flip and allows_flip(caption) and rng.random() < self.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            from torchvision.transforms import ColorJitter

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                j = self.color_jitter
                img = ColorJitter(j, j, j, min(j, 0.5) / 4)(img)
        if self.grayscale and allows_grayscale(caption) and rng.random() < self.grayscale:
            img = img.convert("L").convert("RGB")
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 [B,3,H,W] from the loader -> normalised float model input, on the device.

    (x / 255 - mean) / std, computed in `dtype`; take mean and std from
    `vlp.core.models.image_normalization(model)`. `memory_format`: channels_last
    for a tower converted by `vlp.train.speedups.use_channels_last`.
    """
    x = images.to(device, non_blocking=True).to(dtype, memory_format=memory_format).div_(255.0)
    mean_t = torch.tensor(mean, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _text(sample: dict) -> str:
    raw = next(sample[k] for k in TEXT_KEYS if k in sample)
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def _image_bytes(sample: dict) -> bytes:
    return next(sample[k] for k in IMAGE_KEYS if k in sample)


def _meta(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def hard_negative_captions(meta: dict, k: int, rng: random.Random) -> list[str]:
    """Up to k false captions for this image, from the sample's json `hard_negatives`.

    The field may be a list of captions or a dict of lists by kind (as the
    synthetic generator writes: count / attribute_swap / relation_swap), or a
    JSON string of either. Kinds are taken in turn so a small k mixes them.
    """
    field = json_field(meta, "hard_negatives")
    if isinstance(field, dict):
        pools = [[str(c) for c in v] for v in field.values() if isinstance(v, list) and v]
        for pool in pools:
            rng.shuffle(pool)
        interleaved = [c for group in itertools.zip_longest(*pools) for c in group if c is not None]
        return interleaved[:k]
    if isinstance(field, list):
        pool = [str(c) for c in field]
        rng.shuffle(pool)
        return pool[:k]
    return []


# ------------------------------------------------------------------ batches


@dataclass(frozen=True)
class Batch:
    """One rank's batch for one optimizer step, as the loader yields it (B samples).

    `epoch` and `index` are all a checkpoint needs to resume the stream after
    this batch (`ShardLoader.stream(epoch, index + 1)`).
    """

    images: torch.Tensor  # uint8 [B, 3, H, W], augmented, not normalised (see `normalize`)
    texts: torch.Tensor  # int64 [B, L]: the captions' token ids
    captions: list[str]  # the captions, as read from the shards
    keys: list[str]  # each sample's __key__ in its shard
    urls: list[str]  # the shard each sample came from
    epoch: int  # data epoch
    index: int  # this batch's index in the epoch, on this rank
    replaced: int  # bad (missing or undecodable) samples replaced by good ones in this batch
    hard_negatives: torch.Tensor | None = None  # int64 [B, k, L]: k false captions per image, or None
    hard_negative_mask: torch.Tensor | None = None  # bool [B, k]: False where a slot is padding, or None

    def pin_memory(self) -> Batch:
        """A copy with page-locked tensors (the DataLoader's pin_memory thread calls this)."""
        pin = {name: getattr(self, name) for name in ("images", "texts", "hard_negatives", "hard_negative_mask")}
        return replace(self, **{name: t.pin_memory() for name, t in pin.items() if t is not None})


@dataclass(frozen=True)
class BatchSpec:
    transform: TrainTransform
    tokenizer: Callable[[list[str]], torch.Tensor]
    hard_negatives: int = 0
    hard_negatives_from_step: int = 0  # earlier batches carry none (they cost text-tower compute)
    text_augment: TextAugmentConfig = field(default_factory=TextAugmentConfig)
    multi_caption: bool = False  # pick from the sample json's `captions` (vlp.train.loader.augment.pick_caption)
    plan: BatchPlan | None = None  # B3: batches of mined communities instead of the shuffle windows' samples


def _steps(spec: PlanSpec, sources: list[list[Shard]], batch: BatchSpec) -> int:
    return batch.plan.steps(spec) if batch.plan is not None else steps_per_epoch(spec, sources)


def _loader_worker(spec: PlanSpec) -> tuple[int, int]:
    """(this DataLoader worker's id, how many there are), checked against the plan."""
    info = get_worker_info()
    n = info.num_workers if info else 1
    if n != spec.n_workers:
        raise RuntimeError(f"plan made for {spec.n_workers} workers, running with {n}")
    return (info.id if info else 0), n


class _EpochDataset(IterableDataset):
    """One epoch of one rank, from batch `start` on; each loader worker makes its own batches."""

    def __init__(self, spec: PlanSpec, sources: list[list[Shard]], batch: BatchSpec, epoch: int, start: int):
        self.spec, self.sources, self.batch, self.epoch, self.start = spec, sources, batch, epoch, start
        self.steps = _steps(spec, sources, batch)

    def __iter__(self) -> Iterator[Batch]:
        # The DataLoader asks its workers in turn, starting with worker 0, and
        # batch b belongs to plan worker b % n: when resuming at `start`, loader
        # worker 0 plays plan worker start % n, so batches still come in order.
        loader_worker, n = _loader_worker(self.spec)
        return self.batches((loader_worker + self.start) % n)

    def batches(self, worker: int) -> Iterator[Batch]:
        """The epoch's batches of plan worker `worker`, from batch `start` on."""
        if self.batch.plan is not None:
            yield from self._mined_batches(worker)
            return
        spec, m = self.spec, self.spec.window_batches
        local_total = worker_batches(self.steps, spec, worker)
        t = first_local_batch(spec, worker, self.start)
        window_size = m * spec.batch_size
        reader = PieceReader(worker_pieces(spec, self.sources, self.epoch, worker))
        reader.skip((t // m) * window_size)
        fallback = _Fallback(reader.segments)
        try:
            while t < local_total:
                window = t // m
                size = min(window_size, (local_total - window * m) * spec.batch_size)
                slots = reader.read(size)
                order = window_order(spec, self.epoch, worker, window, size)
                shuffled = [slots[i] for i in order]
                while t < local_total and t // m == window:
                    lo = (t % m) * spec.batch_size
                    yield self._make_batch(shuffled, lo, worker + t * spec.n_workers, fallback)
                    t += 1
        finally:  # also when the consumer stops early: no shard left open until garbage collection
            reader.close()

    def _mined_batches(self, worker: int) -> Iterator[Batch]:
        """The epoch's batches of plan worker `worker` from a B3 plan (vlp.train.loader.batchplan)."""
        plan, spec = self.batch.plan, self.spec
        fallback = _Fallback([Segment(shard, 0, shard.samples) for shard in plan.shards])
        for t in range(first_local_batch(spec, worker, self.start), worker_batches(self.steps, spec, worker)):
            index = worker + t * spec.n_workers
            yield self._make_batch(plan.read(spec, self.epoch, index), 0, index, fallback)

    def _decode(self, sample: dict, seed: int) -> tuple[torch.Tensor, str] | None:
        """(image, caption) as the step sees them: the epoch's caption, augmented with the caption's leave."""
        try:
            caption = _text(sample)
            if self.batch.multi_caption:
                caption = pick_caption(caption, _meta(sample), self.spec.seed, self.epoch, sample["__key__"])
            image = self.batch.transform(_image_bytes(sample), seed, caption)
            return image, augment_text(caption, self.batch.text_augment, random.Random(seed ^ 0x5EED))
        except Exception:  # a corrupt image or caption: replaced and counted by the caller
            return None

    def _first_good(self, window: list[dict | None], pos: int, seed: int, fallback: _Fallback):
        """The slot's sample if it decodes, else the next one in the window that does, else the fallback."""
        for probe in range(len(window)):
            sample = window[(pos + probe) % len(window)]
            decoded = self._decode(sample, seed) if sample is not None else None
            if decoded is not None:
                return sample, decoded, probe
        sample = fallback.sample()
        decoded = self._decode(sample, seed)
        if decoded is None:
            raise RuntimeError("no decodable sample left for this loader worker")
        return sample, decoded, len(window)

    def _make_batch(self, window: list[dict | None], lo: int, index: int, fallback: _Fallback) -> Batch:
        spec = self.spec
        images, texts, keys, urls, metas, replaced = [], [], [], [], [], 0
        for j in range(spec.batch_size):
            seed = hash((spec.seed, self.epoch, spec.rank, index, j)) & 0x7FFFFFFF
            sample, decoded, probe = self._first_good(window, lo + j, seed, fallback)
            replaced += probe > 0
            images.append(decoded[0])
            texts.append(decoded[1])
            keys.append(sample["__key__"])
            urls.append(sample.get("__url__", ""))
            metas.append(_meta(sample))
        tokens = self.batch.tokenizer(texts)
        hard_negatives = hard_negative_mask = None
        global_step = self.epoch * self.steps + index
        if self.batch.hard_negatives and global_step >= self.batch.hard_negatives_from_step:
            hard_negatives, hard_negative_mask = self._negatives(metas, texts, index)
        return Batch(
            images=torch.stack(images),
            texts=tokens,
            captions=texts,
            keys=keys,
            urls=urls,
            epoch=self.epoch,
            index=index,
            replaced=replaced,
            hard_negatives=hard_negatives,
            hard_negative_mask=hard_negative_mask,
        )

    def _negatives(self, metas: list[dict], texts: list[str], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k false captions per image, with a mask for the slots no negative was found for."""
        k = self.batch.hard_negatives
        rng = random.Random(f"{self.spec.seed}:{self.epoch}:{self.spec.rank}:{index}:neg")
        captions, mask = [], []
        for j, meta in enumerate(metas):
            found = hard_negative_captions(meta, k, rng)
            mask.append([True] * len(found) + [False] * (k - len(found)))
            # padding slots get the image's own caption; the mask keeps them out of the loss
            captions += found + [texts[j]] * (k - len(found))
        tokens = self.batch.tokenizer(captions)
        return tokens.view(len(metas), k, -1), torch.tensor(mask, dtype=torch.bool)


class _StreamDataset(IterableDataset):
    """Epoch after epoch of one rank, from (epoch, start), for one DataLoader: its workers go on into
    the next epoch while the trainer finishes this one. (A DataLoader per epoch forks its workers again
    and runs its pipeline dry at every epoch's end: the step waits for it there, which adds up on a
    small set trained for many epochs.)"""

    def __init__(self, spec: PlanSpec, sources: list[list[Shard]], batch: BatchSpec, epoch: int, start: int):
        self.spec, self.sources, self.batch, self.epoch, self.start = spec, sources, batch, epoch, start

    def __iter__(self) -> Iterator[Batch]:
        loader_worker, n = _loader_worker(self.spec)
        position, epoch, start = 0, self.epoch, self.start  # position: batches of the stream before this epoch's
        while True:
            one = _EpochDataset(self.spec, self.sources, self.batch, epoch, start)
            if start < one.steps:
                # this loader worker is asked at stream positions w, w + n, ...; position p holds the
                # epoch's batch p - position + start, whose plan worker is that number mod n
                yield from one.batches((loader_worker - position + start) % n)
                position += one.steps - start
            epoch, start = epoch + 1, 0


class _Fallback:
    """The first readable sample of a worker's part: used only when a whole window is unreadable."""

    def __init__(self, segments: list[Segment]):
        self.segments, self._sample = segments, None

    def sample(self) -> dict:
        if self._sample is None:
            first_error = None
            for seg in self.segments:
                stream = ShardStream(seg.shard.url)
                try:
                    good = [s for s in stream.take(seg.start, seg.size) if s is not None]
                finally:
                    stream.close()
                if first_error is None and stream.stop.error is not None:
                    first_error = (seg.shard.url, stream.stop.error)
                if good:
                    self._sample = good[0]
                    break
            else:  # say why: the reader's error (a missing bucket, no handler for a URL scheme, ...)
                why = f": {first_error[0]}: {type(first_error[1]).__name__}: {first_error[1]}" if first_error else ""
                raise RuntimeError(f"no readable sample in any shard of this loader worker{why}"[:500])
        return self._sample


# ------------------------------------------------------------------ loader


def _start_worker(nice: int, worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the trainer, which stops cleanly after its step, and
    yield the cores to the step.

    Launchers (torchrun, SLURM) signal whole process groups; a worker that died
    on the signal would break the step the trainer is finishing before it saves.
    Niceness: on a machine where the step's threads and the workers share the cores, a worker
    preempting one of the step's threads stalls them all at the next barrier, while the
    workers, a few batches ahead in their queue, lose nothing by waiting.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()  # ignoring SIGTERM must not make an orphan: a killed trainer takes its workers along
    if nice:
        os.nice(nice)


class _Loader(DataLoader):
    """A DataLoader whose worker processes are stopped at exit, even from an iterator left open.

    The workers ignore SIGTERM (above), and multiprocessing's exit hook stops daemonic children
    with SIGTERM, then joins them: a process exiting with an open iterator (a crashed run, whose
    traceback keeps the stream alive) would wait for them forever. This module's exit hook, which
    runs first (registered after multiprocessing's), shuts them down as the iterator's own close does.
    """

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers:
            _OPEN_ITERATORS.add(iterator)
        return iterator


_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_open_loaders() -> None:
    for iterator in list(_OPEN_ITERATORS):
        iterator._shutdown_workers()


class ShardLoader:
    """Batches for one rank, epoch after epoch, resumable at any batch.

    Usage: `for batch in loader.stream(epoch, index): ...`; each `Batch` carries
    its `epoch` and `index`, which is all a checkpoint needs to store
    (resume with `stream(batch.epoch, batch.index + 1)`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        batch_size: int,
        image_size: int,
        tokenizer: Callable[[list[str]], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        self.cfg = cfg
        self.sources = resolve_sources(cfg.sources)
        self.spec = PlanSpec(
            batch_size=batch_size,
            world_size=world_size,
            rank=rank,
            workers=cfg.workers,
            window_batches=max(1, math.ceil(cfg.shuffle_buffer / batch_size)),
            lanes=cfg.lanes,
            seed=seed,
            split=cfg.split,
            samples_per_epoch=cfg.samples_per_epoch,
            weights=tuple(s.weight for s in cfg.sources),
        )
        if cfg.split == "exact" and len({s.weight for s in cfg.sources}) > 1:
            raise UserError("config key 'data.sources': mixing weights need data.split=resampled")
        self.batch = BatchSpec(
            TrainTransform.from_config(image_size, cfg.augment),
            tokenizer,
            cfg.hard_negatives,
            cfg.hard_negatives_from_step,
            cfg.text_augment,
            cfg.multi_caption,
            BatchPlan.load(cfg.batch_plan, self.sources, cfg.batch_plan_random) if cfg.batch_plan else None,
        )
        if cfg.batch_plan and cfg.split != "exact":
            raise UserError("config key 'data.batch_plan': goes with data.split=exact (the plan makes the epoch)")
        self.steps_per_epoch = _steps(self.spec, self.sources, self.batch)

    def epoch(self, epoch: int, start: int = 0) -> DataLoader:
        """The batches of one epoch from batch `start` (a DataLoader over the plan)."""
        return self._loader(_EpochDataset(self.spec, self.sources, self.batch, epoch, start), epoch)

    def stream(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """Batches forever, from (epoch, start), rolling over epochs (one DataLoader)."""
        yield from self._loader(_StreamDataset(self.spec, self.sources, self.batch, epoch, start), epoch)

    def _loader(self, dataset: IterableDataset, epoch: int) -> DataLoader:
        workers = self.cfg.workers
        # Its own generator: a DataLoader otherwise draws its workers' base seed from torch's global
        # RNG, so a run resumed mid-epoch would be one draw off the original in everything that
        # uses that RNG after (patch dropout masks). Our workers seed every sample themselves.
        generator = torch.Generator().manual_seed(hash((self.spec.seed, self.spec.rank, epoch)) & 0x7FFFFFFF)
        return _Loader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(_start_worker, self.cfg.worker_nice),
            generator=generator,
        )

