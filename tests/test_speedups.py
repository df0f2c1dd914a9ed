"""Each step speed-up gives the step it replaces: same loss and gradients (to float rounding), through the
gradient cache (both passes), and for compile as a DeepSpeed engine trains the model.

Tolerances: trimmed text and channels-last change only the order of float operations inside matmuls and
convolutions (relative 1e-5 on every gradient tensor); compile fuses operations (relative 1e-4).
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
from ranks import run_local_ranks
from test_gradcache import grads_of
from train_runs import train_metrics
from vlp.data_tools.build import build_shards
from vlp.data_tools.synth import generate

from vlp.core import distributed as vdist
from vlp.core.config import LossConfig, ModelConfig, ShardsBuildConfig
from vlp.core.errors import UserError
from vlp.core.models import create_model, image_normalization
from vlp.train.gradcache import GradCache
from vlp.train.loader.batches import normalize
from vlp.train.losses import ContrastiveLoss
from vlp.train.speedups import (
    TRIM_MULTIPLE,
    allow_trimmed_text,
    compile_engine,
    trim_tokens,
    use_channels_last,
    use_direct_attention,
)

CAPTIONS = ["a red circle", "two blue squares above a triangle", "one yellow star", "three purple circles",
            "a cat", "green", "a square below a circle", "four stars"]  # at most 6 words: 8 tokens


def _model(name: str, patch_dropout: float = 0.0):
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(ModelConfig(name=name, patch_dropout=patch_dropout), LossConfig())
    return model.train(), tokenizer


def _batch(tokenizer, size: int, n: int = 16):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    texts = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(n)])
    negatives = tokenizer([CAPTIONS[(i + 3) % len(CAPTIONS)] for i in range(2 * n)]).view(n, 2, -1)
    return images, texts, negatives


def _step(model, images, texts, negatives, memory_format=torch.contiguous_format):
    mean, std = image_normalization(model)
    torch.manual_seed(1)  # patch dropout draws the same masks in both runs
    gc = GradCache(model, ContrastiveLoss("softmax"), 4,
                   normalize_images=partial(normalize, mean=mean, std=std, memory_format=memory_format))
    return gc.step(images, texts, negatives).loss, grads_of(model)


def _image_size(model) -> int:
    size = model.visual.image_size
    return size if isinstance(size, int) else size[0]


def rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor max|got - want| / max|want|; a tensor whose gradient is zero in exact arithmetic
    (attention-pooling key bias: softmax ignores a shift shared by all keys) is measured against 1e-3 of
    the largest gradient instead of its own rounding noise."""
    assert set(got) == set(want), set(got) ^ set(want)
    top = max(w.abs().max().item() for w in want.values())
    return max((got[n] - w).abs().max().item() / max(w.abs().max().item(), 1e-3 * top) for n, w in want.items())


def test_trim_tokens_cuts_after_the_longest_caption_at_a_multiple_of_8():
    _, tokenizer = _model("vlp-tiny")  # context 32
    texts = tokenizer(["a red circle", "one two three four five six seven eight nine ten"])
    longest = int((texts != 0).sum(1).max())  # start + 10 words + end = 12
    cut, _ = trim_tokens(texts)
    assert cut.shape[1] == 16 and cut.shape[1] % TRIM_MULTIPLE == 0 and cut.shape[1] >= longest
    assert torch.equal(cut, texts[:, :16]) and not texts[:, 16:].any()
    negatives = tokenizer(["x " * 20]).view(1, 1, -1).expand(2, 1, -1)
    cut, cut_negatives = trim_tokens(texts, negatives)  # both cut to the longer of the two
    assert cut.shape[1] == cut_negatives.shape[2] == 24


@pytest.mark.parametrize("name", ["vlp-micro", "vlp-tiny"])
def test_trimmed_text_gives_the_same_step(name):
    """Cutting the padding of a causal, end-of-text-pooled tower: same loss and gradients, hard negatives too."""
    model, tokenizer = _model(name, patch_dropout=0.5)
    reference = copy.deepcopy(model)
    images, texts, negatives = _batch(tokenizer, _image_size(model))
    want_loss, want = _step(reference, images, texts, negatives)
    allow_trimmed_text(model, name)
    cut, cut_negatives = trim_tokens(texts, negatives)
    assert cut.shape[1] < texts.shape[1]  # the test trims something
    loss, got = _step(model, images, cut, cut_negatives)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert rel_diff(got, want) <= 1e-5


def test_trimmed_text_refused_where_it_would_change_the_model():
    model, _ = _model("vlp-micro")
    model.text_pool_type = "last"  # pooling at the last position: the padding would matter
    with pytest.raises(UserError, match="train.trim_text"):
        allow_trimmed_text(model, "vlp-micro")


@pytest.mark.parametrize(("name", "trim"), [("vlp-micro", False), ("vlp-tiny", False), ("vlp-tiny", True),
                                          ("vlp-tiny-rn", True)])
def test_direct_attention_gives_the_same_step(name, trim):
    """SDPA on views of the packed projection (is_causal for the text tower): same loss and gradients."""
    model, tokenizer = _model(name, patch_dropout=0.0 if name.endswith("-rn") else 0.5)
    reference = copy.deepcopy(model)
    images, texts, negatives = _batch(tokenizer, _image_size(model))
    if trim:  # the causal mask then comes cut to the trimmed length
        allow_trimmed_text(reference, name)
        allow_trimmed_text(model, name)
        texts, negatives = trim_tokens(texts, negatives)
    want_loss, want = _step(reference, images, texts, negatives)
    blocks = use_direct_attention(model)
    text_blocks = len(model.transformer.resblocks)
    vision_blocks = 0 if name.endswith("-rn") else len(model.visual.transformer.resblocks)
    assert blocks == text_blocks + vision_blocks
    assert sum(m.causal_mask for m in model.modules() if hasattr(m, "causal_mask")) == text_blocks
    loss, got = _step(model, images, texts, negatives)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert rel_diff(got, want) <= 1e-5


def test_channels_last_gives_the_same_step():
    model, tokenizer = _model("vlp-tiny-rn")
    reference = copy.deepcopy(model)
    images, texts, negatives = _batch(tokenizer, 64)
    want_loss, want = _step(reference, images, texts, negatives)
    use_channels_last(model)
    assert model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loss, got = _step(model, images, texts, negatives, memory_format=torch.channels_last)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert rel_diff(got, want) <= 1e-5


def _compile_worker(rank: int, world: int) -> None:
    """One rank: an eager and a compiled DeepSpeed engine take the same two cached steps."""
    import deepspeed

    vdist.prepare_for_deepspeed()
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    results = []
    for compiled in (False, True):
        model, tokenizer = _model("vlp-micro", patch_dropout=0.5)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                          config=config)
        if compiled:
            compile_engine(engine)
        images, texts, negatives = _batch(tokenizer, 32)
        losses, grads = [], []
        for _ in range(2):
            loss, step_grads = _step(engine, images, texts, negatives)
            losses.append(loss)
            grads.append(step_grads)
            engine.step()
        results.append((losses, grads[0], engine.is_compiled))
    (eager_losses, eager_grads, _), (losses, grads, is_compiled) = results
    assert is_compiled
    assert losses == pytest.approx(eager_losses, rel=1e-4)
    assert rel_diff(grads, eager_grads) <= 1e-4


@pytest.mark.slow
def test_compiled_engine_gives_the_same_steps():
    run_local_ranks(_compile_worker, 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speed")
    csv_path = generate(root / "synth", n=256, seed=3, image_size=32, progress=False)
    build_shards(ShardsBuildConfig(inputs=[str(csv_path)], output=str(root / "shards"), image_size=32,
                                   shard_size=64, workers=0), progress=False)
    return root / "shards"


def _train(shards: Path, out: Path, *extra: str) -> list[dict]:
    return train_metrics(shards, out, "data.workers=1", "train.steps=7", "optim.warmup_steps=2",
                         "train.checkpoint_every=4", *extra)


def test_log_every_logs_fewer_lines_and_trim_text_keeps_the_losses(shards, tmp_path):
    """log_every=3: lines at steps 3, 4 (checkpoint), 6 and 7 (the last), with the every-step run's losses;
    trim_text, direct attention and channels-last (the patch embedding's conv) on top, under the real
    DeepSpeed engine, change the losses only by float rounding."""
    every = _train(shards, tmp_path / "every")
    sparse = _train(shards, tmp_path / "sparse", "train.log_every=3", "train.trim_text=true",
                    "train.direct_attention=true", "train.channels_last=true")
    assert [m["step"] for m in every] == list(range(1, 8))
    assert [m["step"] for m in sparse] == [3, 4, 6, 7]
    by_step = {m["step"]: m for m in every}
    for m in sparse:
        assert m["loss"] == pytest.approx(by_step[m["step"]]["loss"], rel=1e-5)
        assert m["keys_sha1"] == by_step[m["step"]]["keys_sha1"]
        assert m["samples"] == by_step[m["step"]]["samples"]
        assert m["compile_s"] == 0


def test_channels_last_under_zero_is_refused_before_training(shards, tmp_path):
    from vlp.core.config import load_config
    from vlp.train.trainer import preflight

    cfg = load_config(None, [f"data.sources=[{{shards: '{shards}'}}]", "model.name=vlp-micro", "train.zero_stage=2",
                             "train.channels_last=true", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="train.channels_last.*ZeRO stage 0 only"):
        preflight(cfg)
    assert not (tmp_path / "run").exists()
