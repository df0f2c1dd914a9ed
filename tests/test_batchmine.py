"""B3 batch mining: the neighbour ranks, the communities, the epoch's batches, and the loader following a plan."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer
from shard_helpers import build
from train_runs import train_metrics
from vlp.data_tools.curation.batchmine import capped as cap
from vlp.data_tools.curation.batchmine import communities, hard_neighbours, write_plan
from vlp.data_tools.synth import generate

from vlp.app.cli import main
from vlp.core.config import DataConfig, DataSource
from vlp.core.errors import UserError
from vlp.train.loader.batches import ShardLoader
from vlp.train.loader.batchplan import BatchPlan
from vlp.train.loader.plan import PlanSpec
from vlp.train.loader.sources import Shard

TOKENIZER = SimpleTokenizer(context_length=32)


def _unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hard_neighbours_skip_the_nearest_captions_and_link_the_next_ones():
    # four samples on a circle: 0 at 0 degrees, 1 at 10, 2 at 30, 3 at 90; captions where their images are
    angles = np.radians([0, 10, 30, 90])
    x = _unit(np.stack([np.cos(angles), np.sin(angles)], axis=1))
    src, dst, weight = hard_neighbours(x, x.copy(), skip=1, neighbors=1, chunk=3)  # chunks cross the rows
    # image 0's others by cosine: 1 (10 deg), 2 (30), 3 (90); skip 1 -> 2. image 1: 0 and 2 (both 10-20 deg):
    # 0 at 10, 2 at 20 -> 2. image 2: 1 (20), 0 (30), 3 (60) -> 0. image 3: 2 (60), 1 (80), 0 (90) -> 1
    assert src.tolist() == [0, 1, 2, 3] and dst.tolist() == [2, 2, 0, 1]
    np.testing.assert_allclose(weight, np.cos(np.radians([30, 20, 30, 80])), rtol=1e-6)
    src, dst, _ = hard_neighbours(x, x.copy(), skip=0, neighbors=2)
    assert dst.reshape(4, 2).tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert len(hard_neighbours(x, x.copy(), skip=3, neighbors=5)[0]) == 0  # nobody left after the skipped


def test_communities_follow_the_strong_edges_and_respect_the_size_cap():
    # two cliques of 4 (weight 1) joined by one weak edge
    edges = [(a, b) for g in (range(4), range(4, 8)) for a in g for b in g if a < b] + [(3, 4)]
    src, dst = (np.array(c) for c in zip(*edges, strict=True))
    weight = np.array([1.0] * (len(edges) - 1) + [0.05], dtype=np.float32)
    member = communities(8, src, dst, weight, cluster_size=8, seed=0)
    assert len(set(member[:4])) == 1 and len(set(member[4:])) == 1 and member[0] != member[4]
    capped = communities(8, src, dst, weight, cluster_size=2, seed=0)
    assert np.bincount(capped).max() <= 2 and len(np.unique(capped)) >= 4
    assert all(len(set(member[capped == c])) == 1 for c in np.unique(capped))  # cut within communities only
    assert cap(np.array([3, 1, 3, 1, 3]), 2).tolist() == [1, 0, 1, 0, 2]  # the third 3 starts a community of its own


def _plan(community, share=0.0) -> BatchPlan:
    community = np.asarray(community)
    return BatchPlan("plan.npz", [Shard("a.tar", len(community), 0)], community, share)


def test_an_epochs_batches_are_whole_communities_in_a_seeded_order():
    plan = _plan(np.repeat(np.arange(4), 4))  # four communities of 4
    spec = PlanSpec(batch_size=4, seed=3)
    e0, e1 = plan.epoch_batches(spec, 0).copy(), plan.epoch_batches(spec, 1).copy()
    for batches in (e0, e1):
        assert sorted(batches.ravel().tolist()) == list(range(16))  # every sample once
        assert all(len(set(plan.community[b])) == 1 for b in batches)  # each batch one whole community
    assert e0.tolist() != e1.tolist()
    assert np.array_equal(_plan(plan.community).epoch_batches(spec, 0), e0)  # a function of (plan, seed, epoch)
    spec8 = PlanSpec(batch_size=8, seed=3)
    assert all(len(set(plan.community[b])) == 2 for b in plan.epoch_batches(spec8, 0))  # two whole ones


def test_a_share_of_the_batches_is_dealt_at_random_and_ranks_split_each_global_batch():
    plan = _plan(np.repeat(np.arange(40), 4), share=0.5)
    spec = PlanSpec(batch_size=4, seed=0)
    batches = plan.epoch_batches(spec, 0)
    assert sorted(batches.ravel().tolist()) == list(range(160))
    whole = sum(len(set(plan.community[b])) == 1 for b in batches)
    assert 20 <= whole <= 22  # 20 kept whole; a random batch of 4 from 80 samples is rarely one community
    two = PlanSpec(batch_size=2, world_size=2, seed=0)
    ranks = [PlanSpec(batch_size=2, world_size=2, rank=r, seed=0) for r in (0, 1)]
    assert plan.steps(two) == 40
    for index in (0, 17):
        glob = plan.epoch_batches(two, 0)[index]
        assert np.concatenate([plan.rank_rows(r, 0, index) for r in ranks]).tolist() == glob.tolist()


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> tuple[Path, Path]:
    """96 synthetic pairs in 3 shards, embedded by an untrained vlp-micro, mined into communities of <= 8."""
    root = tmp_path_factory.mktemp("b3")
    csv_path = generate(root / "synth", n=96, seed=2, image_size=32, progress=False)
    build([csv_path], root / "shards", shard_size=32, image_size=32)
    assert main(["shards", "embed", str(root / "shards"), "--out", str(root / "emb"), "--model", "vlp-micro",
                 "--random-init", "--batch-size", "32", "--quiet"]) == 0
    plan = root / "plan.npz"
    assert main(["shards", "mine-batches", str(root / "shards"), "--embeddings", str(root / "emb"), "--out",
                 str(plan), "--cluster-size", "8", "--skip-nearest", "2", "--neighbors", "4"]) == 0
    return root / "shards", plan


def _loader(shards: Path, plan: Path, *, batch=8, rank=0, world=1, workers=0, share=0.0) -> ShardLoader:
    cfg = DataConfig(sources=[DataSource(shards=str(shards))], workers=workers, batch_plan=str(plan),
                     batch_plan_random=share)
    return ShardLoader(cfg, batch_size=batch, image_size=24, tokenizer=TOKENIZER, rank=rank, world_size=world, seed=1)


def _keys(shards: Path) -> list[str]:
    """Every sample's key in row order (shard after shard), as the plan counts rows."""
    manifest = json.loads((shards / "manifest.json").read_text())
    keys = []
    for shard in manifest["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            keys += list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))  # in the shard's order
    return keys


def test_the_loader_reads_the_plans_batches_in_order_and_resumes_exactly(mined):
    shards, plan_path = mined
    loader = _loader(shards, plan_path, workers=2)
    plan = loader.batch.plan
    community = plan.community
    assert np.bincount(community).max() <= 8 and len(community) == 96
    assert loader.steps_per_epoch == 12
    batches = list(loader.epoch(0))
    keys = _keys(shards)
    spec = PlanSpec(batch_size=8, seed=1)
    for b in batches:  # the plan's rows, read by seeking, in the plan's order
        assert b.keys == [keys[r] for r in plan.rank_rows(spec, 0, b.index)]
    resumed = list(_loader(shards, plan_path, workers=2).epoch(0, start=5))
    assert [b.keys for b in resumed] == [b.keys for b in batches[5:]]
    stream = _loader(shards, plan_path, workers=2).stream(0, 0)
    assert [next(stream).keys for _ in range(14)][12:] == [b.keys for b in list(loader.epoch(1))[:2]]


def test_two_ranks_share_each_mined_global_batch(mined):
    shards, plan_path = mined
    one = list(_loader(shards, plan_path, batch=8).epoch(0))
    halves = [list(_loader(shards, plan_path, batch=4, rank=r, world=2).epoch(0)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(one) == 12
    assert [a.keys + b.keys for a, b in zip(*halves, strict=True)] == [b.keys for b in one]


def test_a_plan_for_other_shards_or_a_foreign_file_is_one_line(mined, tmp_path):
    shards, plan_path = mined
    other = tmp_path / "other.npz"
    write_plan(str(other), [Shard(str(shards / "00000.tar"), 31, 0)], np.zeros(31, np.int64), {})
    with pytest.raises(UserError, match="mined for other shards") as err:
        _loader(shards, other)
    assert "\n" not in str(err.value)
    (tmp_path / "junk.npz").write_bytes(b"not a plan")
    with pytest.raises(UserError, match="not a `vlp shards mine-batches` plan"):
        _loader(shards, tmp_path / "junk.npz")
    with pytest.raises(UserError, match="no such file"):
        _loader(shards, tmp_path / "missing.npz")
    cfg = DataConfig(sources=[DataSource(shards=str(shards))], batch_plan=str(plan_path), split="resampled",
                     samples_per_epoch=64)
    with pytest.raises(UserError, match="data.split=exact"):
        ShardLoader(cfg, batch_size=8, image_size=24, tokenizer=TOKENIZER)


def test_vlp_train_follows_the_plan(mined, tmp_path):
    shards, plan_path = mined
    rows = train_metrics(shards, tmp_path / "run", f"data.batch_plan={plan_path}", "data.workers=0",
                         "train.steps=3", "train.log_every=1", "train.checkpoint_every=1000", "train.seed=1")
    rows = [r for r in rows if "keys_sha1" in r]
    plan = _loader(shards, plan_path, share=0.2).batch.plan  # the run's default share of random batches
    keys = _keys(shards)
    spec = PlanSpec(batch_size=16, seed=1)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        want = ",".join(keys[r] for r in plan.rank_rows(spec, 0, row["step"] - 1))
        assert row["keys_sha1"] == hashlib.sha1(want.encode()).hexdigest()[:16]
        assert np.isfinite(row["loss"])


def test_mining_refuses_to_write_over_an_input(mined, capsys):
    shards, _ = mined
    emb = shards.parent / "emb"
    before = (shards / "00000.tar").read_bytes()
    for out in (emb / "plan.npz", shards / "00000.tar"):
        assert main(["shards", "mine-batches", str(shards), "--embeddings", str(emb), "--out", str(out)]) != 0
        assert "is one of its inputs" in capsys.readouterr().err
    assert not (emb / "plan.npz").exists() and (shards / "00000.tar").read_bytes() == before
