"""The training loader: equal batches per rank, determinism, exact resume, bad samples, sources."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from http_server import serve
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from vlp.data_tools.build import build_shards
from vlp.data_tools.synth import generate

from vlp.core.config import DataConfig, DataSource, ModelConfig, ShardsBuildConfig
from vlp.core.errors import UserError
from vlp.core.models import create_model, image_normalization
from vlp.train.loader.batches import Batch, ShardLoader, hard_negative_captions, normalize

TOKENIZER = SimpleTokenizer(context_length=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """223 synthetic pairs in uneven shards (50, 50, 50, 50, 23), with ground truth and negatives."""
    root = tmp_path_factory.mktemp("loader")
    csv_path = generate(root / "synth", n=223, seed=5, image_size=32, progress=False)
    opts = ShardsBuildConfig(inputs=[str(csv_path)], output=str(root / "shards"), image_size=32,
                             keep_cols=["kind", "hard_negatives"], shard_size=50, workers=0)
    build_shards(opts, progress=False)
    return root / "shards"


def _loader(source: str | list[DataSource], *, batch=16, rank=0, world=1, workers=0, **data) -> ShardLoader:
    sources = [DataSource(shards=source)] if isinstance(source, str) else source
    cfg = DataConfig(sources=sources, workers=workers, shuffle_buffer=32, **data)
    return ShardLoader(cfg, batch_size=batch, image_size=24, tokenizer=TOKENIZER, rank=rank, world_size=world, seed=1)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_batches_have_the_promised_shapes_and_fields(shards):
    loader = _loader(str(shards), hard_negatives=2)
    assert loader.steps_per_epoch == 223 // 16
    batch = next(loader.stream())
    assert isinstance(batch, Batch)
    assert batch.images.shape == (16, 3, 24, 24) and batch.images.dtype == torch.uint8
    assert batch.texts.shape == (16, 32) and batch.texts.dtype == torch.long
    assert batch.hard_negatives.shape == (16, 2, 32)
    assert batch.hard_negative_mask.shape == (16, 2) and batch.hard_negative_mask.dtype == torch.bool
    assert batch.hard_negative_mask[:, 0].all()  # every synthetic caption has a counterfactual
    assert len(set(batch.keys)) == 16 and all(k.isdigit() for k in batch.keys)
    assert len(batch.captions) == len(batch.urls) == 16
    assert (batch.epoch, batch.index, batch.replaced) == (0, 0, 0)
    # the token ids decode back to the captions
    assert TOKENIZER.decode(batch.texts[0].tolist()).startswith("<start_of_text>" + batch.captions[0].lower())


def test_batches_cross_worker_processes_and_pin_whole(shards):
    """A Batch is built in a loader worker and passes the DataLoader's collate and pinning as it is."""
    (batch,) = _take(_loader(str(shards), workers=2, hard_negatives=2).stream(), 1)
    assert isinstance(batch, Batch) and batch.hard_negatives.shape == (16, 2, 32)
    pinned = batch.pin_memory() if torch.cuda.is_available() else batch
    assert isinstance(pinned, Batch) and pinned.keys == batch.keys
    assert torch.equal(pinned.images, batch.images) and torch.equal(pinned.hard_negatives, batch.hard_negatives)
    if torch.cuda.is_available():
        assert pinned.images.is_pinned() and pinned.texts.is_pinned() and pinned.hard_negative_mask.is_pinned()


@pytest.mark.parametrize("nice", [19, 0])
def test_loader_workers_run_at_the_configured_niceness(shards, nice):
    """Workers yield the cores to the training step (data.worker_nice), and read the same batches."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    loader = _loader(str(shards), workers=2, worker_nice=nice)
    iterator = iter(loader.epoch(0))
    batches = [next(iterator) for _ in range(3)]
    pids = [w.pid for w in iterator._workers]  # torch's worker processes, alive while the epoch is open
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [min(19, own + nice)] * 2
    iterator._shutdown_workers()
    plain = _take(_loader(str(shards), workers=2, worker_nice=0).stream(), 3)
    assert [b.keys for b in batches] == [b.keys for b in plain]
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches, plain, strict=True))


def test_normalize_is_x_over_255_minus_mean_over_std_with_the_models_statistics():
    model, *_ = create_model(ModelConfig(name="vlp-micro"))
    mean, std = image_normalization(model)
    assert (mean, std) == (tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    got = normalize(images, mean, std)
    assert got.dtype == torch.float32
    assert torch.equal(got, (images.float() / 255 - m) / s)  # bit for bit, same order of operations


def test_an_epoch_covers_distinct_samples_and_epochs_differ(shards):
    loader = _loader(str(shards), workers=2)
    epoch0 = list(loader.epoch(0))
    epoch1 = list(loader.epoch(1))
    keys0 = [k for b in epoch0 for k in b.keys]
    assert [b.index for b in epoch0] == list(range(loader.steps_per_epoch))
    assert len(keys0) == len(set(keys0)) == loader.steps_per_epoch * 16
    assert keys0 != [k for b in epoch1 for k in b.keys]


def test_same_seed_same_stream_including_augmentation(shards):
    a = _take(_loader(str(shards), workers=2).stream(), 5)
    b = _take(_loader(str(shards), workers=2).stream(), 5)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys
        assert torch.equal(x.images, y.images)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_batch_k_continues_exactly(shards, workers):
    loader = _loader(str(shards), workers=workers)
    steps = loader.steps_per_epoch
    full = _take(loader.stream(), steps + 6)  # crosses into the second epoch
    k = 9
    last = full[k - 1]
    resumed = _take(loader.stream(last.epoch, last.index + 1), len(full) - k)
    for want, got in zip(full[k:], resumed, strict=True):
        assert (got.epoch, got.index) == (want.epoch, want.index)
        assert got.keys == want.keys
        assert torch.equal(got.images, want.images)


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
def test_one_stream_over_epochs_gives_each_epochs_batches(shards, workers):
    """stream() keeps one DataLoader across epochs; its batches are each epoch's own, in order, also from a
    resume point, although 13 batches an epoch move every worker's turn at each epoch's end."""
    loader = _loader(str(shards), workers=workers)
    steps = loader.steps_per_epoch
    assert steps % 2 == 1 and steps % 3 == 1
    for epoch, start in [(0, 0), (0, 5), (1, 12)]:
        want = [b for e in range(epoch, epoch + 3) for b in loader.epoch(e, start if e == epoch else 0)]
        got = _take(loader.stream(epoch, start), len(want))
        assert [(b.epoch, b.index) for b in got] == [(b.epoch, b.index) for b in want]
        assert [b.keys for b in got] == [b.keys for b in want]
        assert all(torch.equal(g.images, w.images) for g, w in zip(got, want, strict=True))


def test_a_process_that_dies_with_a_stream_open_exits(shards):
    """A crash leaves the stream (and its worker processes) referenced by the traceback until exit. The
    workers ignore SIGTERM (the trainer stops them), which multiprocessing's exit hook sends before
    joining them: without vlp's own exit hook the process hung there, forever."""
    script = (
        "import sys\n"
        "from open_clip.tokenizer import SimpleTokenizer\n"
        "from vlp.core.config import DataConfig, DataSource\n"
        "from vlp.train.loader.batches import ShardLoader\n"
        f"cfg = DataConfig(sources=[DataSource(shards={str(shards)!r})], workers=2, shuffle_buffer=32)\n"
        "loader = ShardLoader(cfg, batch_size=16, image_size=24, tokenizer=SimpleTokenizer(context_length=32),\n"
        "                     rank=0, world_size=1, seed=1)\n"
        "stream = loader.stream()\n"
        "next(stream)\n"
        "raise RuntimeError('a crash mid-run')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "RuntimeError: a crash mid-run" in done.stderr


def test_uneven_shards_give_every_rank_the_same_batches(shards):
    ranks = [_loader(str(shards), batch=8, rank=r, world=2, workers=2) for r in range(2)]
    epochs = [list(r.epoch(0)) for r in ranks]
    assert len(epochs[0]) == len(epochs[1]) == 223 // 16
    keys = [[k for b in e for k in b.keys] for e in epochs]
    assert not set(keys[0]) & set(keys[1])  # the ranks split the data, no overlap
    assert all(b.images.shape[0] == 8 for e in epochs for b in e)


def _rewrite_tar(path: Path, edit) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in edit(members):
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _readable_keys(path: Path) -> set[str]:
    from webdataset import tariterators

    keys = set()
    for s in tariterators.tarfile_samples([{"url": str(path)}], handler=lambda e: False):
        if "jpg" in s and "txt" in s:
            keys.add(s["__key__"])
    return keys


def test_corrupt_and_truncated_samples_are_replaced_and_counted_exactly(shards, tmp_path):
    bad = _copy(shards, tmp_path / "bad")

    def corrupt(members):
        for m, data in members:
            yield m, (b"definitely not a jpeg" if m.name == "0000107.jpg" else data)

    _rewrite_tar(bad / "00001.tar", corrupt)
    whole = (bad / "00002.tar").read_bytes()
    (bad / "00002.tar").write_bytes(whole[: len(whole) // 2])  # truncated: about half its samples lost
    lost = 50 - len(_readable_keys(bad / "00002.tar"))
    assert 10 < lost < 40

    # one batch holding every sample: each bad slot is refilled once, and counted
    (batch,) = list(_loader(str(bad), batch=223).epoch(0))
    assert batch.replaced == 1 + lost
    assert "0000107" not in batch.keys
    assert len(batch.keys) == 223 and len(set(batch.keys)) == 223 - 1 - lost

    # the same data through workers and small batches: training goes on, batch sizes hold
    loader = _loader(str(bad), workers=2)
    epoch = list(loader.epoch(0))
    assert len(epoch) == loader.steps_per_epoch and all(len(b.keys) == 16 for b in epoch)
    assert sum(b.replaced for b in epoch) > 0


def test_brace_spec_without_manifest_uses_stats_counts(shards):
    """img2dataset's layout: shards plus *_stats.json, no manifest.json."""
    spec = str(shards / "{00000..00004}.tar")
    loader = _loader(spec)
    assert sum(s.samples for s in loader.sources[0]) == 223


def test_pipe_and_http_shards_with_a_manifest(shards, monkeypatch):
    manifest = str(shards / "manifest.json")
    spec = f"pipe:cat {shards}/{{00000..00004}}.tar"
    with pytest.raises(UserError, match="runs a shell command.*VLP_ALLOW_PIPE=1"):
        _loader([DataSource(shards=spec, manifest=manifest)])  # a config alone cannot run commands
    monkeypatch.setenv("VLP_ALLOW_PIPE", "1")
    pipe = _loader([DataSource(shards=spec, manifest=manifest)])
    local = _loader(str(shards))
    assert [b.keys for b in pipe.epoch(0)] == [b.keys for b in local.epoch(0)]
    with serve(shards) as (base, hits):
        web = _loader([DataSource(shards=f"{base}/{{00000..00004}}.tar", manifest=manifest)])
        assert [b.keys for b in web.epoch(0)] == [b.keys for b in local.epoch(0)]
        assert sum(hits.values()) >= 5


def test_remote_shards_without_counts_are_a_config_error(shards, monkeypatch):
    monkeypatch.setenv("VLP_ALLOW_PIPE", "1")
    with pytest.raises(UserError, match="sample count of pipe:cat .* unknown"):
        _loader(f"pipe:cat {shards}/00000.tar")


def test_resampled_mixing_follows_weights(shards, tmp_path):
    second = tmp_path / "second"
    csv_path = generate(tmp_path / "s2", n=100, seed=99, image_size=32, progress=False)
    build_shards(ShardsBuildConfig(inputs=[str(csv_path)], output=str(second), image_size=32, shard_size=25,
                                   workers=0), progress=False)
    sources = [DataSource(shards=str(shards), weight=3.0), DataSource(shards=str(second), weight=1.0)]
    loader = _loader(sources, split="resampled", samples_per_epoch=6400, workers=2)
    batches = list(loader.epoch(0))
    assert len(batches) == 400
    from_second = Counter(url.startswith(str(second)) for b in batches for url in b.urls)
    assert 0.15 < from_second[True] / 6400 < 0.35  # weights 3:1 -> a quarter of the samples
    ranks = [_loader(sources, split="resampled", samples_per_epoch=1600, rank=r, world=2) for r in range(2)]
    assert [r.steps_per_epoch for r in ranks] == [50, 50]
    with pytest.raises(UserError, match="mixing weights need data.split=resampled"):
        _loader(sources)


def test_hard_negative_field_formats():
    import random

    rng = random.Random(0)
    by_kind = {"count": ["a", "b"], "attribute_swap": ["c"], "relation_swap": []}
    got = hard_negative_captions({"hard_negatives": json.dumps(by_kind)}, 3, rng)
    assert sorted(got) == ["a", "b", "c"] and got[1] == "c"  # kinds alternate: count, swap, count
    assert hard_negative_captions({"hard_negatives": ["x", "y"]}, 1, rng) in (["x"], ["y"])
    assert hard_negative_captions({}, 2, rng) == []


def test_hard_negatives_start_at_the_configured_step(shards):
    loader = _loader(str(shards), hard_negatives=1, hard_negatives_from_step=16)
    steps = loader.steps_per_epoch  # 13: step 16 is the 4th batch of epoch 1
    batches = _take(loader.stream(), steps + 5)
    with_negatives = [i for i, b in enumerate(batches) if b.hard_negatives is not None]
    assert all((b.hard_negatives is None) == (b.hard_negative_mask is None) for b in batches)
    assert with_negatives == list(range(16, steps + 5))


def _expected_distinct(sources: int, per_source: int, batch: int) -> float:
    """Distinct sources expected in a batch drawn uniformly from the whole set (sources of equal size)."""
    total = sources * per_source
    return sources * (1 - math.comb(total - per_source, batch) / math.comb(total, batch))


@pytest.fixture(scope="module")
def sorted_shard(tmp_path_factory) -> Path:
    """One shard of 16 sources x 40 samples, sorted by source (a crawl sorted by domain)."""
    from shard_helpers import build, noise_image, save, write_csv

    root = tmp_path_factory.mktemp("sorted")
    rows = []
    for i in range(16 * 40):
        save(noise_image(16, 16, seed=i), root / "img" / f"{i}.png")
        rows.append({"url": f"img/{i}.png", "caption": f"source{i // 40:02d} item {i % 40}"})
    build([write_csv(root / "pairs.csv", rows)], root / "shards", shard_size=1000, image_size=16)
    return root / "shards"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sorted_input_still_gives_mixed_batches(sorted_shard, workers):
    """Mixing = distinct sources per batch / the number a uniformly drawn batch has (about 14 of 16 here)."""
    want = _expected_distinct(16, 40, 32)

    def mixing(lanes: int) -> float:
        cfg = DataConfig(sources=[DataSource(shards=str(sorted_shard))], workers=workers, shuffle_buffer=128,
                         lanes=lanes)
        loader = ShardLoader(cfg, batch_size=32, image_size=16, tokenizer=TOKENIZER, seed=3)
        counts = [len({c.split()[0] for c in b.captions}) for epoch in (0, 1) for b in loader.epoch(epoch)]
        return sum(counts) / len(counts) / want

    assert DataConfig().lanes == 16
    assert mixing(16) >= 0.9
    assert mixing(1) <= 0.4  # read front to back, a window holds three or four neighbouring sources


def test_a_local_shard_is_opened_at_a_sample_by_seeking(shards):
    from vlp.train.loader import reading

    url = str(shards / "00001.tar")
    whole = [s["__key__"] for s in reading.read_shard(url, 0, 50)]
    reading._OFFSETS.clear()
    assert [s["__key__"] for s in reading.read_shard(url, 17, 13)] == whole[17:30]
    assert len(reading._OFFSETS[url]) == 50  # it seeked: the offsets of the shard's samples were read
