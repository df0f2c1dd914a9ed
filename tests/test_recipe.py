"""vlp's recipe: caption-aware image augmentation, EDA text augmentation, several captions per image,
token dropping as a schedule, and the presets; every augmentation keeps resume exact."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer
from vlp.data_tools.build import build_shards
from vlp.data_tools.synth import generate

from vlp.core.config import (
    DataConfig,
    DataSource,
    RunConfig,
    ShardsBuildConfig,
    TextAugmentConfig,
    load_config,
)
from vlp.core.errors import UserError
from vlp.core.models import create_model
from vlp.train.loader.augment import allows_flip, allows_grayscale, augment_text, pick_caption
from vlp.train.loader.batches import ShardLoader
from vlp.train.tokendrop import FULL, Phase, TokenDrop, allow_smaller_images, truncate_tokens

TOKENIZER = SimpleTokenizer(context_length=32)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """96 synthetic pairs, each with two more captions: one column of text, one of JSON lists."""
    root = tmp_path_factory.mktemp("recipe")
    csv_path = generate(root / "synth", n=96, seed=9, image_size=32, progress=False)
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    for i, row in enumerate(rows):
        row["alt"] = f"picture {i}: {row['caption']}"
        row["more"] = json.dumps([f"scene number {i}", ""])  # the empty one is left out
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_shards(ShardsBuildConfig(inputs=[str(csv_path)], output=str(root / "shards"), image_size=32,
                                   caption_cols=["alt", "more"], shard_size=32, workers=0), progress=False)
    return root / "shards"


def _loader(shards: Path, **data) -> ShardLoader:
    cfg = DataConfig(sources=[DataSource(shards=str(shards))], workers=0, shuffle_buffer=32, **data)
    return ShardLoader(cfg, batch_size=16, image_size=24, tokenizer=TOKENIZER, seed=3)


def test_captions_decide_which_image_augmentations_apply():
    assert allows_flip("a red circle above a square")
    assert not allows_flip("a cat to the left of a dog") and not allows_flip("a sign that says STOP")
    assert allows_grayscale("a circle above a square")
    assert not allows_grayscale("a Red circle") and not allows_grayscale("two grey cats")


def test_text_augmentation_is_seeded_and_keeps_a_word():
    cfg = TextAugmentConfig(word_dropout=0.3, word_mask=0.2, word_swap=1.0)
    caption = "a small red circle above two blue squares"
    outs = {augment_text(caption, cfg, random.Random(s)) for s in range(20)}
    assert len(outs) > 10 and caption not in outs  # swap always applies: never the caption itself
    assert augment_text(caption, cfg, random.Random(4)) == augment_text(caption, cfg, random.Random(4))
    assert all(set(o.split()) <= set(caption.split()) | {"*"} for o in outs)
    assert augment_text("word", TextAugmentConfig(word_dropout=0.99), random.Random(0)) == "word"
    assert augment_text(caption, TextAugmentConfig(), random.Random(0)) == caption


def test_build_keeps_every_caption_of_an_image(shards):
    samples = list(wds.WebDataset(str(shards / "00000.tar"), shardshuffle=False))
    meta = json.loads(samples[5]["json"])
    caption = samples[5]["txt"].decode()
    assert meta["captions"] == [caption, f"picture {meta['row']}: {caption}", f"scene number {meta['row']}"]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["written"] == 96


def test_multi_caption_picks_one_per_sample_per_epoch_from_the_seed(shards):
    meta = {"captions": ["a", "b", "c", "d"]}
    picks = [pick_caption("a", meta, 0, epoch, "k1") for epoch in range(40)]
    assert set(picks) == {"a", "b", "c", "d"} and picks == [pick_caption("a", meta, 0, e, "k1") for e in range(40)]
    assert pick_caption("main", {}, 0, 0, "k") == "main"
    loader = _loader(shards, multi_caption=True)
    seen: dict[str, set[str]] = {}
    for epoch in range(4):
        for batch in loader.epoch(epoch):
            for key, caption in zip(batch.keys, batch.captions, strict=True):
                seen.setdefault(key, set()).add(caption)
    assert sum(len(c) > 1 for c in seen.values()) > len(seen) // 2  # captions vary across epochs
    assert any(c.startswith("scene number") for cs in seen.values() for c in cs)


AUGMENTATIONS = {
    "crop+flip": {"augment": {"scale_min": 0.4, "flip": 0.5}},
    "colour": {"augment": {"color_jitter": 0.4, "grayscale": 0.5}},
    "text": {"text_augment": {"word_dropout": 0.2, "word_swap": 0.5, "word_mask": 0.1}},
    "multi-caption": {"multi_caption": True},
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_augmentation_keeps_resume_exact(shards, name):
    """Batches 3-5 of epoch 1 read from the start equal those of a loader resumed at batch 3, bit for bit,
    and differ from the batches without the augmentation (so the augmentation did something)."""
    data = AUGMENTATIONS[name]
    whole = [b for b in _loader(shards, **data).epoch(1)]
    resumed = list(_loader(shards, **data).epoch(1, start=3))
    plain = [b for b in _loader(shards).epoch(1)]
    assert len(resumed) == len(whole) - 3
    for got, want in zip(resumed, whole[3:], strict=True):
        assert got.keys == want.keys and got.captions == want.captions
        assert torch.equal(got.images, want.images) and torch.equal(got.texts, want.texts)
    changed = [not torch.equal(a.images, p.images) or a.captions != p.captions for a, p in zip(whole, plain, strict=True)]
    assert all(changed)


def test_truncated_captions_keep_their_end_of_text():
    tokens = TOKENIZER(["a b c d e f g h i j", "a b"])
    cut = truncate_tokens(tokens, 6)
    eot = TOKENIZER.eot_token_id
    assert cut.shape == (2, 6)
    assert cut[0, 5] == eot and torch.equal(cut[0, :5], tokens[0, :5])  # cut short: end-of-text moved in
    assert torch.equal(cut[1], tokens[1, :6])  # short enough: unchanged
    negatives = tokens.view(1, 2, -1)
    assert torch.equal(truncate_tokens(negatives, 6)[0], cut)


def test_token_drop_is_a_schedule_of_the_step():
    cfg = load_config(None, ["model.name=vlp-micro", "train.steps=10", "train.token_drop.until=0.6",
                             "train.token_drop.patch_dropout=0.5", "train.token_drop.text_length=8"])
    model, *_ = create_model(cfg.model, cfg.loss)
    drop = TokenDrop(cfg, 10)
    drop.prepare(model)
    phases = [drop.at(step, model) for step in range(10)]
    assert phases == [Phase(text_length=8)] * 6 + [FULL] * 4
    drop.at(3, model)
    assert model.visual.patch_dropout.prob == 0.5
    drop.at(6, model)
    assert model.visual.patch_dropout.prob == 0.0
    rn = load_config(None, ["model.name=vlp-tiny-rn", "train.steps=10", "train.token_drop.until=0.5",
                            "train.token_drop.patch_dropout=0.5"])
    with pytest.raises(UserError, match="train.token_drop.patch_dropout"):
        TokenDrop(rn, 10).prepare(create_model(rn.model, rn.loss)[0])


def test_small_image_phase_interpolates_the_position_embeddings_and_is_exact_at_full_size():
    cfg = load_config(None, ["model.name=vlp-micro", "train.steps=10", "train.token_drop.until=0.5",
                             "train.token_drop.image_size=16"])
    model, *_ = create_model(cfg.model, cfg.loss)
    visual = model.visual
    images = torch.randn(3, 3, 32, 32)
    before = visual(images)
    drop = TokenDrop(cfg, 10)
    drop.prepare(model)
    assert [drop.at(step, model) for step in (0, 4, 5, 9)] == [Phase(image_size=16)] * 2 + [FULL] * 2
    assert torch.equal(visual(images), before)  # full size: open_clip's own computation
    seen = []
    visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    small = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    visual(small).square().sum().backward()
    assert seen == [1 + 2 * 2]  # the class token and a 2x2 grid of 8 px patches
    grad = visual.positional_embedding.grad
    assert grad.shape == (1 + 4 * 4, 64) and bool((grad.abs().sum(1) > 0).all())  # all 16 reached, and the class's


@pytest.mark.parametrize(("model_name", "size", "match"), [
    ("vlp-micro", 12, "multiple of 'vlp-micro'.s patch size 8"),
    ("vlp-micro", 32, "smaller than its image size 32"),
    ("vlp-tiny-rn", 32, "not open_clip's ViT"),
])
def test_small_image_phase_refuses_what_it_cannot_resize(model_name, size, match):
    cfg = load_config(None, [f"model.name={model_name}"])
    model, *_ = create_model(cfg.model, cfg.loss)
    with pytest.raises(UserError, match=match):
        allow_smaller_images(model.visual, size, model_name)


@pytest.mark.parametrize("preset", ["recipe-small", "recipe-small-siglip"])
def test_presets_load_with_the_recipe_on(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.train.trim_text and cfg.train.direct_attention and cfg.train.log_every > 1
    siglip = preset.endswith("siglip")
    assert cfg.loss.kind == ("sigmoid" if siglip else "softmax")
    assert cfg.loss.label_smoothing == (0.0 if siglip else 0.2)


# Every augmentation and schedule of the recipe on at once (the preset keeps only what measured better on
# small data; resume must stay exact with all of them).
EVERY_KNOB = ("data.augment.scale_min=0.5", "data.augment.flip=0.5", "data.augment.color_jitter=0.3",
              "data.augment.grayscale=0.1", "data.text_augment.word_dropout=0.1", "data.text_augment.word_swap=0.1",
              "data.text_augment.word_mask=0.05", "data.multi_caption=true", "train.token_drop.patch_dropout=0.5",
              "train.token_drop.text_length=16", "train.token_drop.image_size=16")


def _train(shards: Path, out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "vlp", "train", "--config", str(REPO / "configs" / "recipe-small.yaml"),
           f"data.sources=[{{shards: '{shards}'}}]", "data.workers=1", "data.shuffle_buffer=32",
           "model.name=vlp-micro", "train.batch_size=16", "train.steps=8", "train.samples=null",
           "train.log_every=1", "train.checkpoint_every=4", "train.keep_last=4", "optim.warmup_steps=2",
           "train.log_keys=true", f"train.output_dir={out}", *EVERY_KNOB, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_recipe_run_resumes_exactly_across_the_phase_switch(shards, tmp_path):
    """The preset with every knob (augmentations, several captions, token dropping until step 6 of 8) resumed from its
    step-4 checkpoint repeats steps 5-8 of the uninterrupted run: same keys, same losses."""
    whole = _train(shards, tmp_path / "whole", "train.token_drop.until=0.75")
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000004"
    assert checkpoint.is_dir(), sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    resumed = _train(shards, tmp_path / "resumed", "train.token_drop.until=0.75", f"train.resume={checkpoint}")
    assert [m["step"] for m in resumed] == [5, 6, 7, 8]
    for got, want in zip(resumed, whole[4:], strict=True):
        assert got["keys"] == want["keys"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
