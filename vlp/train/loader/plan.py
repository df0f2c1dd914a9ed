"""The epoch plan: which samples every rank and loader worker reads, in what order.

It is pure arithmetic over shard sample counts, which is what makes three
promises cheap to keep:

- Equal work: every rank gets exactly `steps_per_epoch` batches of
  `batch_size`, whatever the shard sizes, so no rank waits forever in a
  collective (the DDP hang on uneven shards).
- Determinism: the plan depends only on (seed, epoch, rank, worker count).
- Exact resume: the samples of batch b are known without reading anything
  before them, so a run restarted at batch k reads from batch k on.

Layout of one epoch. Shards are concatenated and, for `split=exact`,
permuted per epoch; rank r takes the r-th contiguous slice of
`steps * batch_size` samples (the remainder is dropped). The slice is then
interleaved: cut into `lanes` contiguous lanes of (nearly) equal length and
read a block from each lane in turn, the block a shuffle window's share
(window / lanes samples), so a window holds samples from `lanes` places
spread over the whole slice, not one run of neighbours. An input sorted by
source (a crawl sorted by domain, a file sorted by artist), or one large
shard, still gives mixed batches; each lane is still read front to back (one
open per shard per lane; a local shard is opened at a lane's first sample by
seeking, a remote one read through to it). A rank's batches go round-robin
to its loader workers (batch b to worker b % n, the order in which torch's
DataLoader returns them), and each worker reads its own contiguous part of
the interleaved slice, cut into shuffle windows of `window_batches` batches,
read whole and permuted. For `split=resampled`, each (rank, worker) draws
shards with replacement instead, and its draws are interleaved alike.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from vlp.core.errors import UserError
from vlp.train.loader.sources import Shard


@dataclass(frozen=True)
class Segment:
    """Samples [start, end) of one shard, in the shard's order."""

    shard: Shard
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PlanSpec:
    batch_size: int  # per rank
    world_size: int = 1
    rank: int = 0
    workers: int = 1  # loader worker processes (0 is treated as 1: the main process)
    window_batches: int = 8  # shuffle window, in batches
    lanes: int = 1  # places in a rank's slice read in turn, window / lanes samples each per window
    seed: int = 0
    split: str = "exact"  # exact | resampled
    samples_per_epoch: int | None = None  # global; required for resampled
    weights: tuple[float, ...] = ()

    @property
    def n_workers(self) -> int:
        return max(1, self.workers)


def _rng(*parts) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def steps_per_epoch(spec: PlanSpec, sources: list[list[Shard]]) -> int:
    global_batch = spec.batch_size * spec.world_size
    if spec.split == "resampled":
        if not spec.samples_per_epoch:
            raise UserError("config key 'data.samples_per_epoch': required for data.split=resampled")
        total = spec.samples_per_epoch
    else:
        total = sum(s.samples for shards in sources for s in shards)
    steps = total // global_batch
    if steps == 0:
        raise UserError(
            f"data: an epoch of {total} samples is smaller than one global batch "
            f"({spec.world_size} ranks x {spec.batch_size})"
        )
    return steps


def worker_batches(steps: int, spec: PlanSpec, worker: int) -> int:
    """How many of the epoch's batches this worker makes (batch b goes to worker b % n)."""
    n = spec.n_workers
    return len(range(worker, steps, n))


def _slice(order: list[Shard], start: int, length: int) -> list[Segment]:
    """Segments covering samples [start, start + length) of the concatenated shards."""
    return cut([Segment(shard, 0, shard.samples) for shard in order], start, length)


@dataclass(frozen=True)
class Piece:
    """Slots read from one lane: a segment of one shard."""

    lane: int
    segment: Segment


def _blocks(segments: list[Segment], block: int) -> Iterator[list[Segment]]:
    """The segments, in order, in runs of `block` slots (the last may be shorter)."""
    run: list[Segment] = []
    size = 0
    for seg in segments:
        start = seg.start
        while start < seg.end:
            take = min(block - size, seg.end - start)
            run.append(Segment(seg.shard, start, start + take))
            start, size = start + take, size + take
            if size == block:
                yield run
                run, size = [], 0
    if run:
        yield run


def interleave(segments: list[Segment], spec: PlanSpec) -> list[Piece]:
    """The slots of `segments` reordered: cut into `spec.lanes` contiguous lanes of (nearly) equal length,
    then a block from each lane in turn, a window's worth of blocks holding one from every lane."""
    total = sum(s.size for s in segments)
    n = max(1, min(spec.lanes, total))
    block = max(1, -(-spec.window_batches * spec.batch_size // n))
    bounds = [total * i // n for i in range(n + 1)]
    lanes = [_blocks(cut(segments, lo, hi - lo), block) for lo, hi in zip(bounds, bounds[1:], strict=False)]
    pieces: list[Piece] = []
    active = list(range(n))
    while active:
        for lane in list(active):
            run = next(lanes[lane], None)
            if run is None:
                active.remove(lane)
            else:
                pieces += [Piece(lane, seg) for seg in run]
    return pieces


def _cut_pieces(pieces: list[Piece], start: int, length: int) -> list[Piece]:
    """Slots [start, start + length) of a list of pieces, as pieces."""
    out, pos = [], 0
    for piece in pieces:
        seg = piece.segment
        lo, hi = max(start, pos), min(start + length, pos + seg.size)
        if lo < hi:
            out.append(Piece(piece.lane, Segment(seg.shard, seg.start + lo - pos, seg.start + hi - pos)))
        pos += seg.size
        if pos >= start + length:
            break
    return out


def cut(segments: list[Segment], start: int, length: int) -> list[Segment]:
    """Slots [start, start + length) of a list of segments, as segments."""
    return [p.segment for p in _cut_pieces([Piece(0, s) for s in segments], start, length)]


def _exact_pieces(spec: PlanSpec, sources: list[list[Shard]], epoch: int, steps: int, worker: int) -> list[Piece]:
    """The rank's slice, interleaved as a whole (so every worker's part spans all of it), then cut into the
    workers' contiguous parts."""
    order = [s for shards in sources for s in shards]
    _rng(spec.seed, "shards", epoch).shuffle(order)  # the same on every rank
    rank = _slice(order, spec.rank * steps * spec.batch_size, steps * spec.batch_size)
    before = sum(worker_batches(steps, spec, w) for w in range(worker))
    length = worker_batches(steps, spec, worker) * spec.batch_size
    return _cut_pieces(interleave(rank, spec), before * spec.batch_size, length)


def _resampled_segments(spec: PlanSpec, sources: list[list[Shard]], epoch: int, steps: int, worker: int):
    """Draw whole shards with replacement until this worker's quota is met.

    A source is drawn with probability proportional to weight / mean shard
    size, so that the expected share of *samples* from each source follows
    the mixing weights.
    """
    rng = _rng(spec.seed, "resampled", epoch, spec.rank, worker)
    weights = spec.weights or (1.0,) * len(sources)
    usable = [[s for s in shards if s.samples > 0] for shards in sources]
    draw = [w / (sum(s.samples for s in u) / len(u)) if u else 0.0 for w, u in zip(weights, usable, strict=True)]
    need = worker_batches(steps, spec, worker) * spec.batch_size
    segments = []
    while need > 0:
        (pool,) = rng.choices(usable, weights=draw)
        shard = rng.choice(pool)
        take = min(shard.samples, need)
        segments.append(Segment(shard, 0, take))
        need -= take
    return segments


def worker_pieces(spec: PlanSpec, sources: list[list[Shard]], epoch: int, worker: int) -> list[Piece]:
    """The samples this (rank, worker) reads in this epoch, in reading order, each with its lane."""
    steps = steps_per_epoch(spec, sources)
    if spec.split == "resampled":
        return interleave(_resampled_segments(spec, sources, epoch, steps, worker), spec)
    return _exact_pieces(spec, sources, epoch, steps, worker)


def worker_segments(spec: PlanSpec, sources: list[list[Shard]], epoch: int, worker: int) -> list[Segment]:
    """The samples this (rank, worker) reads in this epoch, in reading order."""
    return [p.segment for p in worker_pieces(spec, sources, epoch, worker)]


def window_order(spec: PlanSpec, epoch: int, worker: int, window: int, size: int) -> list[int]:
    """The shuffled order of the samples of one window (indices into the window)."""
    order = list(range(size))
    _rng(spec.seed, "window", epoch, spec.rank, worker, window).shuffle(order)
    return order


def first_local_batch(spec: PlanSpec, worker: int, start_batch: int) -> int:
    """How many of this worker's batches come before global batch start_batch (resume)."""
    return len(range(worker, start_batch, spec.n_workers))
