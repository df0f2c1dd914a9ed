"""Remote reading without waste: one GET per shard per epoch for each loader worker that reads it.

Shards are served by the real loopback HTTP server (tests/http_server.py), which
counts requests per path; webdataset fetches them with curl, as in training.
"""

from __future__ import annotations

import io
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from http_server import serve
from open_clip.tokenizer import SimpleTokenizer
from vlp.data_tools.build import build_shards
from vlp.data_tools.synth import generate

from vlp.core.config import DataConfig, DataSource, ShardsBuildConfig
from vlp.train.loader.batches import ShardLoader
from vlp.train.loader.plan import Segment, first_local_batch, worker_batches, worker_pieces
from vlp.train.loader.reading import PieceReader, SegmentReader, read_shard
from vlp.train.loader.sources import Shard

TOKENIZER = SimpleTokenizer(context_length=32)
NAMES = [f"{i:05d}.tar" for i in range(5)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """223 synthetic pairs in uneven shards (50, 50, 50, 50, 23): each spans several shuffle windows."""
    root = tmp_path_factory.mktemp("requests")
    csv_path = generate(root / "synth", n=223, seed=5, image_size=32, progress=False)
    build_shards(ShardsBuildConfig(inputs=[str(csv_path)], output=str(root / "shards"), image_size=32,
                                   shard_size=50, workers=0), progress=False)
    return root / "shards"


def _loader(source: DataSource, workers: int, lanes: int = 1) -> ShardLoader:
    # shuffle_buffer 32 / batch 16: windows of 32 samples, so a 50-sample shard spans 2-3 windows
    cfg = DataConfig(sources=[source], workers=workers, shuffle_buffer=32, lanes=lanes)
    return ShardLoader(cfg, batch_size=16, image_size=24, tokenizer=TOKENIZER, seed=1)


def _web(base: str, shards: Path, workers: int, lanes: int = 1) -> ShardLoader:
    return _loader(DataSource(shards=f"{base}/{{00000..00004}}.tar", manifest=str(shards / "manifest.json")),
                   workers, lanes)


def _keys(batches) -> list[list[str]]:
    return [b.keys for b in batches]


def _gets(hits: Counter) -> dict[str, int]:
    return {path.rsplit("/", 1)[-1]: n for path, n in hits.items() if n}


def expected_gets(loader: ShardLoader, epoch: int, start: int = 0) -> dict[str, int]:
    """From the plan: how many (loader worker, lane) pairs read each shard from batch `start` on (one open each).

    A worker resuming at `start` reads from the beginning of the shuffle window that holds its
    first batch; every shard the remaining segments of each of its lanes touch is opened once
    (a lane that starts inside a remote shard reads it through from its start, in the same open).
    """
    spec, steps = loader.spec, loader.steps_per_epoch
    window_size = spec.window_batches * spec.batch_size
    want: Counter = Counter()
    for worker in range(spec.n_workers):
        t = first_local_batch(spec, worker, start)
        if t >= worker_batches(steps, spec, worker):
            continue
        reader = PieceReader(worker_pieces(spec, loader.sources, epoch, worker))
        reader.skip((t // spec.window_batches) * window_size)
        for lane in reader.readers.values():
            want.update({s.shard.url.rsplit("/", 1)[-1] for s in lane.segments[lane.seg:]})
    return dict(want)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_over_http_gets_each_shard_once_per_reading_worker(shards, workers):
    local = _keys(_loader(DataSource(shards=str(shards)), workers).epoch(0))
    with serve(shards) as (base, hits):
        web = _web(base, shards, workers)
        assert _keys(web.epoch(0)) == local
        want = expected_gets(web, 0)
        assert _gets(hits) == want
    if workers == 0:  # one reader: every shard of the epoch exactly once (13 GETs before, for 5 shards)
        assert want == dict.fromkeys(NAMES, 1)
    else:  # two workers split the epoch: only the shard on their border is read by both
        assert sorted(want.values()) == [1, 1, 1, 1, 2]


@pytest.mark.parametrize("workers", [0, 2])
def test_lanes_over_http_read_the_local_batches_with_one_get_per_shard_per_lane(shards, workers):
    local = _keys(_loader(DataSource(shards=str(shards)), workers, lanes=3).epoch(0))
    assert local != _keys(_loader(DataSource(shards=str(shards)), workers).epoch(0))  # the lanes change the order
    with serve(shards) as (base, hits):
        web = _web(base, shards, workers, lanes=3)
        assert _keys(web.epoch(0)) == local
        want = expected_gets(web, 0)
        assert _gets(hits) == want
        for k in (3, 9):
            hits.clear()
            assert _keys(web.epoch(0, k)) == local[k:]
            assert _gets(hits) == expected_gets(web, 0, k)
    # beyond one GET per shard: one per border between workers' parts, and per border between lanes
    readers = max(1, workers)
    assert set(want) == set(NAMES) and sum(want.values()) <= len(NAMES) + (readers - 1) + readers * (3 - 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_over_http_matches_the_uninterrupted_run_with_one_get_per_touched_shard(shards, workers):
    with serve(shards) as (base, hits):
        web = _web(base, shards, workers)
        full = _keys(web.epoch(0))
        for k in (5, 9):  # 5: mid-window, mid-shard; 9: the second half of the epoch
            hits.clear()
            assert _keys(web.epoch(0, k)) == full[k:]
            want = expected_gets(web, 0, k)
            assert _gets(hits) == want
            assert all(n <= web.spec.n_workers for n in want.values())
            if workers == 0 and k == 9:  # 128 samples in: the shards before are not fetched at all
                assert len(want) < 5


def test_reads_reopen_only_when_a_shard_position_goes_back(shards):
    local = {name: read_shard(str(shards / name), 0, 50) for name in NAMES[:2]}
    with serve(shards) as (base, hits):
        a, b = (Shard(f"{base}/{name}", 50, 0) for name in NAMES[:2])
        # a resampled-style plan: A whole, B in two contiguous parts, then A again from 10 (back: reopen)
        segments = [Segment(a, 0, 50), Segment(b, 0, 20), Segment(b, 20, 50), Segment(a, 10, 30)]
        reader = SegmentReader(segments)
        slots = []
        for _ in range(math.ceil(150 / 7)):
            slots += reader.read(7)
        assert reader._stream is None  # the last segment ended: nothing left open
        want = local[NAMES[0]] + local[NAMES[1]] + local[NAMES[0]][10:30]
        assert [s["__key__"] for s in slots] == [s["__key__"] for s in want]
        assert _gets(hits) == {NAMES[0]: 2, NAMES[1]: 1}

        hits.clear()
        reader = SegmentReader([Segment(a, 0, 50)])
        reader.skip(33)  # resume: one open, read through to sample 33
        assert [s["__key__"] for s in reader.read(17)] == [s["__key__"] for s in local[NAMES[0]][33:]]
        assert _gets(hits) == {NAMES[0]: 1}


def _broken_copy(shards: Path, out: Path) -> None:
    """out/00000.tar truncated at half its bytes (ends early, cleanly); out/00001.tar with a reading
    error at sample 20 (a member twice: webdataset's grouping raises, the handler stops the shard)."""
    out.mkdir()
    whole = (shards / NAMES[0]).read_bytes()
    (out / NAMES[0]).write_bytes(whole[: len(whole) // 2])
    with tarfile.open(shards / NAMES[1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(out / NAMES[1], "w") as tar:
        for m, data in members:
            for _ in range(2 if m.name == "0000120.txt" else 1):
                tar.addfile(m, io.BytesIO(data))


def test_broken_shards_over_http_give_nones_for_the_rest_and_are_retried_once(shards, tmp_path):
    _broken_copy(shards, tmp_path / "broken")
    local = {name: read_shard(str(tmp_path / "broken" / name), 0, 50) for name in NAMES[:2]}
    good = [sum(s is not None for s in local[name]) for name in NAMES[:2]]
    assert 10 < good[0] < 40 and good[1] == 21
    for name, n in zip(NAMES[:2], good, strict=True):
        assert all(s is not None for s in local[name][:n]) and all(s is None for s in local[name][n:])
    with serve(tmp_path / "broken") as (base, hits):
        for name in NAMES[:2]:
            reader = SegmentReader([Segment(Shard(f"{base}/{name}", 50, 0), 0, 50)])
            slots = []
            for _ in range(7):  # windows of 8 (the last one of 2)
                slots += reader.read(8)
            assert [s and s["__key__"] for s in slots] == [s and s["__key__"] for s in local[name]]
    # the truncated shard just ends: one GET; after the error, the next window reopens once (a passing
    # error would be over), the error repeats, and the later windows are None slots without a request
    assert _gets(hits) == {NAMES[0]: 1, NAMES[1]: 2}
