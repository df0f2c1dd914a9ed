"""Curation for real: `vlp shards embed` and `vlp shards curate` on shards the builder wrote.

Every removed sample must be in removed.jsonl with its reason, rows in == kept +
removed, kept samples are byte-for-byte the source's, and the curated folder
verifies and trains like a build.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import webdataset as wds
from shard_helpers import build, noise_image, save, write_csv
from vlp.data_tools.curation import dedup, embeddings
from vlp.data_tools.synth import generate

from vlp.app.cli import main

# one xdist worker runs all of group "short_demo": the tests share one short demo run
pytestmark = pytest.mark.xdist_group("short_demo")

ROWS = 40
SHORT = {3, 17}  # captions cut to one word
GERMAN = {5, 22}  # captions in German
WIDE = {9}  # a 96x16 image: aspect ratio 6
COPIES = (0, 1, 2, 4, 6, 7)  # set B repeats six of set A's images (new captions), none removed in A


def _rows(root: Path) -> list[dict]:
    csv_path = generate(root, n=ROWS, seed=11, image_size=32, progress=False)
    with open(csv_path, newline="") as fh:
        rows = [{"url": r["url"], "caption": r["caption"]} for r in csv.DictReader(fh)]
    for i in SHORT:
        rows[i]["caption"] = rows[i]["caption"].split()[-1]
    for i in GERMAN:
        rows[i]["caption"] = "ein kleines rotes Quadrat neben zwei blauen Kreisen auf einem grauen Hintergrund"
    for i in WIDE:
        save(noise_image(96, 16, seed=i), root / "images" / f"wide{i}.png")
        rows[i]["url"] = f"images/wide{i}.png"
    return rows


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[Path, Path]:
    """Two shard sets built by vlp: A (40 rows with planted caption/image defects), B (A's first images again)."""
    root = tmp_path_factory.mktemp("curation")
    rows = _rows(root / "pairs")
    a_csv = write_csv(root / "pairs" / "a.csv", rows)
    b_csv = write_csv(root / "pairs" / "b.csv", [{"url": rows[i]["url"], "caption": f"another view {i}"}
                                                 for i in COPIES])
    build([a_csv], root / "a", shard_size=16, resize_mode="no")
    build([b_csv], root / "b", shard_size=16, resize_mode="no")
    return root / "a", root / "b"


def _samples(folder: Path) -> dict[str, dict]:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            out[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return out


def _removed(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "removed.jsonl").read_text().splitlines()]


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_caption_image_and_exact_duplicate_filters_account_for_every_row(sets, tmp_path, capsys):
    a, b = sets
    out = tmp_path / "curated"
    printed = _run(capsys, "shards", "curate", str(a), str(b), "--output", str(out), "--min-words", "2",
                   "--languages", "en", "--max-aspect-ratio", "4", "--quiet")
    removed = _removed(out)
    reasons = Counter(r["reason"] for r in removed)
    assert reasons == {"caption_too_short": len(SHORT), "other_language": len(GERMAN),
                       "aspect_ratio_too_large": len(WIDE), "duplicate": len(COPIES)}, removed
    kept = ROWS + len(COPIES) - len(removed)
    assert f"rows={ROWS + len(COPIES)} kept={kept} removed={len(removed)}" in printed
    assert "(rows == kept + removed: ok)" in printed
    # the duplicates are set B's samples, each naming the set A sample it repeats (the first is kept)
    a_samples, b_samples = _samples(a), _samples(b)
    dups = [r for r in removed if r["reason"] == "duplicate"]
    assert {r["shard"].rsplit("/", 2)[-2] for r in dups} == {"b"}
    for r in dups:
        assert r["matched_shard"].rsplit("/", 2)[-2] == "a"
        assert b_samples[r["key"]]["jpg"] == a_samples[r["matched"]]["jpg"]
    assert {r["detail"][:2] for r in removed if r["reason"] == "other_language"} == {"de"}
    # kept: byte-identical members under keys prefixed by their set; nothing else
    curated = _samples(out)
    removed_ids = {(r["shard"].rsplit("/", 2)[-2], r["key"]) for r in removed}
    expected = {f"0_{k}": v for k, v in a_samples.items() if ("a", k) not in removed_ids}
    expected |= {f"1_{k}": v for k, v in b_samples.items() if ("b", k) not in removed_ids}
    assert curated == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["rows"], manifest["written"], manifest["failed"], manifest["duplicates"]) == (
        ROWS + len(COPIES), kept, len(SHORT) + len(GERMAN) + len(WIDE), len(COPIES))
    assert manifest["source"] == "curate"
    assert _run(capsys, "shards", "verify", str(out), "--quiet").startswith(f"verify: OK: 1 shards, {kept} samples")


def test_refuses_a_full_output_and_filters_that_need_embeddings(sets, tmp_path, capsys):
    a, _ = sets
    assert main(["shards", "curate", str(a), "--output", str(tmp_path / "o"), "--clip-score-top", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vlp: error: vlp shards curate: clip_score_top need --embeddings (from `vlp shards embed`)"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    assert main(["shards", "curate", str(a), "--output", str(tmp_path / "full"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_overwrite_never_empties_a_folder_vlp_did_not_make(sets, tmp_path, capsys):
    a, _ = sets
    user = tmp_path / "user"
    user.mkdir()
    mine = {"00000.tar": b"my tar", "data.parquet": b"my table", "00000_stats.json": b"{}", "manifest.json": b"{}"}
    for name, data in mine.items():
        (user / name).write_bytes(data)
    assert main(["shards", "curate", str(a), "--output", str(user), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not made by vlp" in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in user.iterdir()} == mine
    # a build's folder is vlp's, but not a curated one: --overwrite does not empty it either
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    assert main(["shards", "curate", str(a), "--output", str(a), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds an input of this curation" in err, err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    # a folder curate made is replaced by --overwrite, its files only
    out = tmp_path / "curated"
    _run(capsys, "shards", "curate", str(a), "--output", str(out), "--min-words", "2", "--quiet")
    first = _samples(out)
    _run(capsys, "shards", "curate", str(a), "--output", str(out), "--overwrite", "--quiet")
    assert set(first) < set(_samples(out)) and len(_samples(out)) == ROWS
    assert json.loads((out / ".vlp-owner.json").read_text())["kind"] == "curated"


def test_curate_refuses_an_output_that_holds_its_input_before_any_work(sets, tmp_path, capsys):
    a, _ = sets
    parent = tmp_path / "outer"
    shutil.copytree(a, parent / "set")
    nested = sorted(str(p) for p in (parent / "set").glob("*.tar"))
    assert main(["shards", "curate", f"{nested[0]}", "--output", str(parent), "--quiet"]) == 2
    assert "holds an input of this curation" in capsys.readouterr().err
    assert sorted(p.name for p in parent.iterdir()) == ["set"]  # nothing claimed, nothing written


def test_embed_refuses_a_folder_vlp_did_not_make(sets, tmp_path, capsys):
    a, _ = sets
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert main(["shards", "embed", str(a), "--out", str(user), "--model", "vlp-micro", "--random-init",
                 "--quiet"]) == 2
    assert "not made by vlp" in capsys.readouterr().err
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def embedded(sets, tmp_path_factory) -> Path:
    a, _ = sets
    out = tmp_path_factory.mktemp("emb") / "emb"
    assert main(["shards", "embed", str(a), "--out", str(out), "--model", "vlp-micro", "--random-init",
                 "--batch-size", "8", "--quiet"]) == 0
    return out


def test_embed_writes_clip_retrieval_layout_with_scores_that_match_the_embeddings(sets, embedded):
    a, _ = sets
    meta = json.loads((embedded / "embed.json").read_text())
    assert [s["samples"] for s in meta["shards"]] == [16, 16, ROWS - 32]
    import pyarrow.parquet as pq

    for s in meta["shards"]:
        img = np.load(embeddings.img_path(embedded, s["index"]))
        txt = np.load(embeddings.text_path(embedded, s["index"]))
        table = pq.read_table(embeddings.metadata_path(embedded, s["index"]))
        assert img.dtype == np.float16 and img.shape == txt.shape and img.shape[0] == s["samples"] == table.num_rows
        assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
        scores = table.column("clip_score").to_numpy()
        assert np.allclose(scores, (img.astype(np.float32) * txt.astype(np.float32)).sum(1), atol=5e-3)
    keys = [k for s in meta["shards"] for k in pq.read_table(embeddings.metadata_path(embedded, s["index"]))
            .column("key").to_pylist()]
    assert keys == list(_samples(a))
    # each sample's source URL (from its json, as clip-retrieval keeps it) and its thumbnail
    first = pq.read_table(embeddings.metadata_path(embedded, 0))
    samples = _samples(a)
    urls = first.column("url").to_pylist()
    assert None not in urls and urls == [json.loads(samples[k]["json"])["url"] for k in first.column("key").to_pylist()]
    assert {len(t) for t in first.column("thumb").to_pylist()} == {768}


def test_embed_resumes_at_the_missing_shard_only(sets, embedded, tmp_path, capsys):
    a, _ = sets
    copy = tmp_path / "emb"
    shutil.copytree(embedded, copy)
    embeddings.metadata_path(copy, 1).unlink()
    printed = _run(capsys, "shards", "embed", str(a), "--out", str(copy), "--model", "vlp-micro", "--random-init",
                   "--batch-size", "8", "--quiet")
    assert "1 shards embedded" in printed and "2 complete already" in printed
    for i in range(3):
        assert np.array_equal(np.load(embeddings.img_path(copy, i)), np.load(embeddings.img_path(embedded, i)))
    err_out = main(["shards", "embed", str(a), "--out", str(copy), "--model", "vlp-tiny", "--random-init", "--quiet"])
    assert err_out == 2 and "holds embeddings of another model" in capsys.readouterr().err


def test_clip_score_top_fraction_is_one_exact_global_threshold(sets, embedded, tmp_path, capsys):
    a, _ = sets
    out = tmp_path / "top"
    printed = _run(capsys, "shards", "curate", str(a), "--output", str(out), "--embeddings", str(embedded),
                   "--clip-score-top", "0.5", "--quiet")
    import pyarrow.parquet as pq

    scores = np.concatenate([pq.read_table(embeddings.metadata_path(embedded, i)).column("clip_score").to_numpy()
                             for i in range(3)])
    keys = [k for i in range(3) for k in pq.read_table(embeddings.metadata_path(embedded, i)).column("key").to_pylist()]
    want = {k for k, s in zip(keys, scores, strict=True) if s >= np.sort(scores)[::-1][ROWS // 2 - 1]}
    assert set(_samples(out)) == want and len(want) == ROWS // 2
    removed = _removed(out)
    assert {r["key"] for r in removed} == set(keys) - want and all(r["reason"] == "low_clip_score" for r in removed)
    assert all(r["score"] < min(s for k, s in zip(keys, scores, strict=True) if k in want) for r in removed)
    assert f"rows={ROWS} kept={ROWS // 2}" in printed and "CLIP-score threshold" in printed


def test_curate_refuses_embeddings_of_other_shards(sets, embedded, tmp_path, capsys):
    _, b = sets
    assert main(["shards", "curate", str(b), "--output", str(tmp_path / "o"), "--embeddings", str(embedded),
                 "--min-clip-score", "0.1"]) == 2
    assert "embeddings of other shards" in capsys.readouterr().err


def test_semantic_dedup_keeps_the_best_caption_of_each_near_duplicate_group():
    """Real faiss k-means on planted groups: 30 groups of 1-4 near-identical unit vectors in 64-d."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 64))
    sizes = rng.integers(1, 5, size=30)
    x = np.concatenate([c + rng.normal(scale=0.01, size=(n, 64)) for c, n in zip(centres, sizes, strict=True)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    group = np.repeat(np.arange(30), sizes)
    scores = rng.random(len(x)).astype(np.float32)
    removed = dedup.semantic_duplicates(x, scores, threshold=0.95, k=6)
    kept = sorted(set(range(len(x))) - set(removed))
    # exactly one per group survives: the one with the highest score; each removed names a kept one of its group
    assert sorted(group[kept]) == list(range(30))
    for g in range(30):
        members = np.nonzero(group == g)[0]
        assert set(members) & set(kept) == {members[np.argmax(scores[members])]}
    for i, (j, cosine) in removed.items():
        assert group[i] == group[j] and j in kept and cosine >= 0.95


def test_caption_threshold_keeps_a_near_duplicate_image_whose_caption_says_something_else():
    """Planted: 20 groups of 4 near-identical images; in each, two captions of one kind and two of another.
    Images alone keep one per group; with a caption threshold, one per (group, caption kind)."""
    rng = np.random.default_rng(1)

    def unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)

    x = unit(np.repeat(rng.normal(size=(20, 64)), 4, axis=0) + rng.normal(scale=0.01, size=(80, 64)))
    kinds = unit(rng.normal(size=(40, 32)))  # two caption kinds per group, near-orthogonal in 32-d
    kind = np.repeat(np.arange(40), 2)  # members 0,1 of a group: kind 2g; members 2,3: kind 2g+1
    text = unit(kinds[kind] + rng.normal(scale=0.01, size=(80, 32)))
    scores = rng.random(80).astype(np.float32)
    alone = dedup.semantic_duplicates(x, scores, threshold=0.95, k=5)
    assert len(alone) == 60
    removed = dedup.semantic_duplicates(x, scores, threshold=0.95, k=5, text=text, caption_threshold=0.9)
    kept = sorted(set(range(80)) - set(removed))
    assert sorted(kind[kept]) == list(range(40))  # one per caption kind of each group, the best-scored
    for i, (j, _) in removed.items():
        assert kind[i] == kind[j] and scores[j] >= scores[i]


def test_same_caption_words_keep_a_variant_named_otherwise_whatever_the_model():
    """Four near-identical images per group, named "A red heart." / "a red  heart" (the same words) and "a heart,
    red" / "red heart" (other words): with --semdedup-same-caption one per group and wording is kept."""
    assert dedup.caption_words("A red heart.") == dedup.caption_words("a red  heart") != dedup.caption_words(
        "a heart, red") != dedup.caption_words("red heart")
    assert 0 <= dedup.caption_words("x") < 2**63 and dedup.caption_words(None) == dedup.caption_words("")
    rng = np.random.default_rng(2)
    x = np.repeat(rng.normal(size=(10, 64)), 4, axis=0) + rng.normal(scale=0.01, size=(40, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    captions = ["A red heart.", "a red  heart", "a heart, red", "red heart"] * 10
    words = np.array([dedup.caption_words(c) for c in captions], np.int64)
    scores = np.zeros(40, np.float32)  # ties: row order
    removed = dedup.semantic_duplicates(x, scores, threshold=0.95, k=3, words=words)
    assert sorted(removed) == [4 * g + 1 for g in range(10)]  # the second spelling of the first wording
    assert all(j == i - 1 for i, (j, _) in removed.items())


def test_cluster_files_decide_exactly_as_in_memory_with_one_bucket_or_many(sets, embedded):
    """SemDeDup streamed through bucket files (peak memory one bucket) removes what the in-memory pass removes."""
    from vlp.data_tools.curation import cluster_files

    a, _ = sets
    meta = json.loads((embedded / "embed.json").read_text())
    emb = embeddings.load(embedded, [s["url"] for s in meta["shards"]])
    table = emb.table
    rows = np.nonzero(table.column("error").is_null().to_numpy(zero_copy_only=False))[0]
    scores = table.column("clip_score").to_numpy(zero_copy_only=False)
    hashes = table.column("phash").fill_null(0).to_numpy()
    x = emb.image_embeddings(rows)
    threshold = float(np.quantile((x @ x.T)[np.triu_indices(len(rows), 1)], 0.97))  # some pairs, not all
    in_memory = dedup.semantic_duplicates(x, scores[rows], threshold, k=3)
    expected = {int(rows[i]): (int(rows[j]), c) for i, (j, c) in in_memory.items()}
    assert 0 < len(expected) < len(rows) - 3
    for bucket_bytes in (1 << 30, 1):  # one bucket; as many buckets as clusters
        found, stats = cluster_files.semantic_duplicates(emb, rows, scores, hashes, 3,
                                                         cluster_files.Checks(threshold), bucket_bytes=bucket_bytes)
        assert found.keys() == expected.keys() and all(found[r][0] == expected[r][0] for r in found)
        assert stats.buckets == (1 if bucket_bytes > 1 else 3) and stats.largest_bucket <= len(rows)



@pytest.mark.slow
def test_buckets_on_ray_tasks_decide_as_here(sets, embedded, tmp_path, capsys):
    """--engine ray: each bucket a Ray task (a Ray instance started for the run, 2 CPUs): removed.jsonl byte for
    byte the local engine's."""
    a, _ = sets
    meta = json.loads((embedded / "embed.json").read_text())
    emb = embeddings.load(embedded, [s["url"] for s in meta["shards"]])
    rows = np.nonzero(emb.table.column("error").is_null().to_numpy(zero_copy_only=False))[0]
    x = emb.image_embeddings(rows)
    threshold = float(np.quantile((x @ x.T)[np.triu_indices(len(rows), 1)], 0.97))  # some pairs, not all
    outs = {}
    for engine in ("local", "ray"):
        outs[engine] = tmp_path / engine
        assert main(["shards", "curate", str(a), "--output", str(outs[engine]), "--embeddings", str(embedded),
                     "--semdedup-threshold", f"{threshold:.4f}", "--semdedup-clusters", "3", "--engine", engine,
                     "--workers", "2", "--quiet"]) == 0
    assert (outs["ray"] / "removed.jsonl").read_bytes() == (outs["local"] / "removed.jsonl").read_bytes()
    assert "semantic_duplicate" in (outs["local"] / "removed.jsonl").read_text()


def test_curate_with_same_caption_removes_only_pairs_of_the_same_words(sets, embedded, tmp_path):
    """Through `vlp shards curate` (cluster files): every semantic duplicate removed names a kept sample whose
    caption has the same words, its rule says so, and it removes no more than images alone do."""
    a, _ = sets
    meta = json.loads((embedded / "embed.json").read_text())
    emb = embeddings.load(embedded, [s["url"] for s in meta["shards"]])
    caption = dict(zip(emb.table.column("key").to_pylist(), emb.table.column("caption").to_pylist(), strict=True))
    rows = np.nonzero(emb.table.column("error").is_null().to_numpy(zero_copy_only=False))[0]
    x = emb.image_embeddings(rows)
    threshold = f"{float(np.quantile((x @ x.T)[np.triu_indices(len(rows), 1)], 0.9)):.4f}"
    counts = {}
    for name, extra in (("images", []), ("words", ["--semdedup-same-caption"])):
        assert main(["shards", "curate", str(a), "--output", str(tmp_path / name), "--embeddings", str(embedded),
                     "--semdedup-threshold", threshold, "--semdedup-clusters", "3", *extra, "--quiet"]) == 0
        dups = [r for r in _removed(tmp_path / name) if r["reason"] == "semantic_duplicate"]
        counts[name] = len(dups)
        if name == "words":
            assert all(r["detail"].endswith("same caption words") for r in dups)
            assert all(dedup.caption_words(caption[r["key"]]) == dedup.caption_words(caption[r["matched"]])
                       for r in dups)
    assert counts["words"] < counts["images"]


def test_caption_threshold_needs_embeddings(sets, tmp_path, capsys):
    a, _ = sets
    assert main(["shards", "curate", str(a), "--output", str(tmp_path / "o"), "--semdedup-caption-threshold",
                 "0.9"]) == 2
    assert "semdedup_caption_threshold need --embeddings" in capsys.readouterr().err


def test_metadata_balancing_removes_unmatched_and_over_full_entries_and_counts_them(sets, tmp_path, capsys):
    """MetaCLIP on real shards: entries are shape words; 'star' (a common one) is capped."""
    a, _ = sets
    entries = tmp_path / "entries.txt"
    entries.write_text("Star\nsquare\n\ncircle\nred triangle\nstar\n")
    out = tmp_path / "balanced"
    printed = _run(capsys, "shards", "curate", str(a), "--output", str(out), "--metadata", str(entries),
                   "--metadata-cap", "2", "--quiet")
    curated = _samples(out)
    captions = {k: v["txt"].decode() for k, v in _samples(a).items()}
    import re

    def found(caption: str) -> set[str]:
        words = " ".join(re.findall(r"\w+", caption.lower()))
        return {e for e in ("star", "square", "circle", "red triangle") if re.search(rf"\b{e}\b", words)}

    removed = _removed(out)
    reasons = {r["key"]: r["reason"] for r in removed}
    assert set(curated) | set(reasons) == set(captions) and not set(curated) & set(reasons)
    for key, caption in captions.items():
        if not found(caption):
            assert reasons[key] == "no_metadata_entry", caption
        elif key in reasons:
            assert reasons[key] == "metadata_balance"
    counts = json.loads((out / "metadata_counts.json").read_text())
    assert counts["entries"] == 4 and counts["cap"] == 2
    before = Counter(e for c in captions.values() for e in found(c))
    assert counts["before"] == dict(before)
    assert counts["after"] == dict(Counter(e for k in curated for e in found(captions[k])))
    assert any(n > 2 for n in before.values()) and "metadata_balance" in reasons.values()
    for entry, n in before.items():  # an entry at or under the cap keeps every pair
        if n <= 2:
            assert counts["after"][entry] == n
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["curation"]["metadata"]["entries_over_cap"] == sum(n > 2 for n in before.values())
    assert f"rows={ROWS} kept={len(curated)}" in printed and "(rows == kept + removed: ok)" in printed
    # the draws are a function of (seed, key, entry): the same again; another seed, other pairs
    again = _run(capsys, "shards", "curate", str(a), "--output", str(out), "--metadata", str(entries),
                 "--metadata-cap", "2", "--overwrite", "--quiet")
    assert again == printed and set(_samples(out)) == set(curated)
    assert main(["shards", "curate", str(a), "--output", str(tmp_path / "none"), "--metadata",
                 str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.txt: no such file")
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_embed_over_two_torchrun_ranks_writes_the_single_process_files(sets, embedded, tmp_path):
    """Each rank embeds every second shard; together they write what one process writes."""
    import os
    import subprocess
    import sys

    a, _ = sets
    out = tmp_path / "emb2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "0", "-m", "vlp", "shards", "embed", str(a), "--out", str(out), "--model", "vlp-micro",
                           "--random-init", "--batch-size", "8", "--quiet"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2: 2 shards embedded" in done.stdout and "rank 1/2: 1 shards embedded" in done.stdout
    for i in range(3):
        for path in (embeddings.img_path, embeddings.text_path):
            # the same model and batches; float16 files, and thread counts may differ in the last bit
            assert np.allclose(np.load(path(out, i)), np.load(path(embedded, i)), atol=2e-3)
    assert json.loads((out / "embed.json").read_text())["shards"] == json.loads(
        (embedded / "embed.json").read_text())["shards"]


@pytest.mark.slow
def test_planted_defects_are_found_with_few_good_pairs_lost(short_demo, tmp_path):
    """The issue's evidence, small: a short-trained model (the shortened demo's, tests/conftest.py), 300 synthetic
    pairs with 20% captions swapped, 20 near-duplicates (1-4% crop + JPEG) and 10 eval-suite images planted;
    bench/curation.py runs it big."""
    from short_demo import run_vlp
    from vlp.data_tools.curation.planted import plant, score

    pairs = plant(tmp_path / "pairs", 300, seed=1, image_size=64, mismatched=0.2, near_duplicates=20,
                  eval_images=10)
    run_vlp(["shards", "build", str(pairs), "--output", str(tmp_path / "shards"), "--image-size", "64",
             "--resize-mode", "no", "--quiet"])
    run_vlp(["shards", "embed", str(tmp_path / "shards"), "--out", str(tmp_path / "emb"), "--model",
             str(short_demo.run), "--quiet"])
    printed = run_vlp(["shards", "curate", str(tmp_path / "shards"), "--output", str(tmp_path / "curated"),
                       "--embeddings", str(tmp_path / "emb"), "--decontaminate-suite", "default",
                       "--decontaminate-hash-distance", "2", "--semdedup-threshold", "0.9", "--semdedup-hash-distance",
                       "10", "--clip-score-top", "0.8", "--quiet"])
    found = score(tmp_path / "pairs", tmp_path / "shards", tmp_path / "curated")
    print(printed, found)
    # the bench's target is 90% of swapped captions; this model, trained for 120 steps, ranks a few swapped
    # captions that name the image's shape or colour above the cut, and the CPU kind moves one or two of the
    # 60 across it: the margin is for that
    assert found["mismatched_removed"] >= 0.85 and found["good_removed"] <= 0.05
    assert found["near_duplicates_removed"] >= 0.95 and found["eval_removed"] == 1.0
    # every good pair that went is named by the filter that took it
    good_gone = round(found["good_removed"] * found["counts"]["good"])
    assert sum(found["good_removed_by"].values()) == good_gone
    assert set(found["good_removed_by"]) <= {"low_clip_score", "semantic_duplicate", "eval_contamination"}
    assert "(rows == kept + removed: ok)" in printed
    rules = {r["detail"] for r in _removed(tmp_path / "curated") if r["reason"] == "semantic_duplicate"}
    assert rules == {"image cosine >= 0.9, hash within 10 bits"}  # the rule that removed each one


@pytest.mark.slow
def test_a_curated_folder_trains_unchanged(sets, tmp_path, capsys):
    import subprocess
    import sys

    a, b = sets
    out = tmp_path / "curated"
    _run(capsys, "shards", "curate", str(a), str(b), "--output", str(out), "--min-words", "2", "--quiet")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vlp", "train", f"data.sources=[{{shards: '{out}'}}]",
                           "data.workers=0", "model.name=vlp-micro", "train.batch_size=8", "train.steps=2",
                           "train.log_keys=true", f"train.output_dir={run}"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    curated = set(_samples(out))
    assert all(k in curated for line in lines for k in line["keys"])


def test_a_cut_shard_is_accounted_sample_by_sample_not_reported_ok(sets, tmp_path, capsys):
    """A truncated shard lost samples while the summary said rows == kept + removed: ok."""
    a, _ = sets
    cut = tmp_path / "cut"
    shutil.copytree(a, cut)
    (cut / ".vlp-owner.json").unlink()
    tar = cut / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    printed = _run(capsys, "shards", "curate", str(cut), "--output", str(tmp_path / "out"), "--quiet")
    listed = sum(s["samples"] for s in json.loads((cut / "manifest.json").read_text())["shards"])
    missing = [r for r in _removed(tmp_path / "out") if r["reason"] == "missing_from_shard"]
    kept = len(_samples(tmp_path / "out"))
    assert listed == ROWS and 0 < len(missing) < 16 and all(r["key"] is None for r in missing)
    assert f"rows={ROWS} kept={kept}" in printed and "(rows == kept + removed: ok)" in printed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["failure_reasons"]["missing_from_shard"] == len(missing) and manifest["rows"] == ROWS


def test_non_finite_scores_are_a_removal_reason_and_the_manifest_stays_strict_json(sets, embedded, tmp_path, capsys):
    """NaN CLIP scores disabled the score filter and wrote "clip_threshold": NaN into the manifest."""
    import pyarrow.parquet as pq

    a, _ = sets
    emb = tmp_path / "emb"
    shutil.copytree(embedded, emb)
    path = embeddings.metadata_path(emb, 0)
    table = pq.read_table(path)
    scores = table.column("clip_score").to_numpy().copy()
    scores[:5] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("clip_score"), "clip_score",
                                    pa.array(scores, pa.float32())), path)
    printed = _run(capsys, "shards", "curate", str(a), "--output", str(tmp_path / "out"), "--embeddings", str(emb),
                   "--clip-score-top", "0.5", "--quiet")
    removed = Counter(r["reason"] for r in _removed(tmp_path / "out"))
    assert removed["non_finite_embedding"] == 5 and "(rows == kept + removed: ok)" in printed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert np.isfinite(manifest["curation"]["clip_threshold"])


def test_a_decontamination_suite_none_of_whose_images_can_be_read_is_an_error_first(sets, embedded, tmp_path, capsys):
    a, _ = sets
    suite = tmp_path / "suite.yaml"
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "pairs.csv").write_text("image,caption\nmissing.png,a thing\n")
    suite.write_text("name: s\ntasks:\n  - name: ret\n    type: retrieval\n"
                     f"    dataset: {{format: csv, path: {tmp_path / 'gone' / 'pairs.csv'}}}\n")
    assert main(["shards", "curate", str(a), "--output", str(tmp_path / "out"), "--embeddings", str(embedded),
                 "--decontaminate-suite", str(suite), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none of its 1 images could be read" in err and not (tmp_path / "out").exists()
