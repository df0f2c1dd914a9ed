"""Gradient caching gives the gradient of the uncached big batch: plain module, DDP and
DeepSpeed ZeRO 0/2/3 over gloo ranks, both losses, hard negatives, patch dropout on.

The reference is independent of the cache and of any distributed gradient code: one
process forwards every rank's chunks with grad (replaying each rank's RNG seed in rank
order, so patch dropout draws the same masks), computes the single-process loss on the
concatenated global batch and calls backward once.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from ranks import run_local_ranks

from vlp.core import distributed as vdist
from vlp.core.config import LossConfig, ModelConfig
from vlp.core.models import create_model, forward, image_normalization
from vlp.train.gradcache import GradCache, RngState
from vlp.train.loader.batches import normalize
from vlp.train.losses import ContrastiveLoss
from vlp.train.tokendrop import allow_smaller_images

CHUNK, PER_RANK, CTX = 4, 12, 16


def build(kind: str, patch_dropout: float = 0.5, lock_image: bool = False):
    """vlp-micro with patch dropout, so pass 2 is only right if it replays pass 1's RNG."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="vlp-micro", patch_dropout=patch_dropout, lock_image=lock_image)
    model, *_ = create_model(cfg, LossConfig(kind=kind))
    return model.train()


def batch(rank: int, k: int):
    """This rank's data (any rank can rebuild any other rank's batch)."""
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(PER_RANK, 3, 32, 32, generator=g)
    texts = torch.randint(1, 5000, (PER_RANK, CTX), generator=g)
    hn = torch.randint(1, 5000, (PER_RANK, k, CTX), generator=g) if k else None
    return images, texts, hn


def mask_of(rank: int, k: int) -> torch.Tensor:
    """Padding slots for hard negatives: every third image has only its first negative."""
    mask = torch.ones(PER_RANK, k, dtype=torch.bool)
    mask[rank % 3 :: 3, 1:] = False
    return mask


def seed(rank: int) -> int:
    return 1000 + rank


def reference_grads(
    model, kind: str, world: int, k: int, autocast=None, masked: bool = False, **loss_opts
) -> dict[str, torch.Tensor]:
    """d(global loss)/d(params), uncached, in this process alone."""
    model.zero_grad(set_to_none=True)
    img, txt, hns, out = [], [], [], None
    for r in range(world):
        images, texts, hn = batch(r, k)
        torch.manual_seed(seed(r))
        for s in range(0, PER_RANK, CHUNK):
            t = (
                texts[s : s + CHUNK]
                if hn is None
                else torch.cat([texts[s : s + CHUNK], hn[s : s + CHUNK].flatten(0, 1)])
            )
            dev = next(model.parameters()).device
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                out = forward(model, images[s : s + CHUNK].to(dev), t.to(dev))
            img.append(out.image)
            txt.append(out.text[:CHUNK])
            if hn is not None:
                hns.append(out.text[CHUNK:].reshape(CHUNK, k, -1))
    loss = ContrastiveLoss(kind, rank=0, world_size=1, **loss_opts)
    extra = {"hard_negative_mask": torch.cat([mask_of(r, k) for r in range(world)])} if masked else {}
    total = loss(
        torch.cat(img), torch.cat(txt), out.logit_scale, out.logit_bias, torch.cat(hns) if hns else None,
        **extra,
    )
    total["loss"].backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor max|got - want| / max|want| (missing gradients count as wrong)."""
    assert set(got) == set(want), set(got) ^ set(want)
    worst = 0.0
    for name, w in want.items():
        scale = w.abs().max().item()
        if scale > 0:
            worst = max(worst, (got[name].float() - w).abs().max().item() / scale)
    return worst


def global_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max|got - want| over all tensors / the largest reference gradient (for bf16)."""
    top = max(w.abs().max().item() for w in want.values())
    return max((got[n].float() - w).abs().max().item() for n, w in want.items()) / top


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def cached_grads(model, kind, k, rank=0, chunk=CHUNK, **gc_opts) -> dict[str, torch.Tensor]:
    images, texts, hn = batch(rank, k)
    torch.manual_seed(seed(rank))
    GradCache(model, ContrastiveLoss(kind), chunk, **gc_opts).step(images, texts, hn)
    return grads_of(model.module if hasattr(model, "module") else model)


# ------------------------------------------------------------------ one process


@pytest.mark.parametrize("k", [0, 2], ids=["no-hn", "hard-negs"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_cached_equals_full_batch(kind, k):
    model = build(kind)
    want = reference_grads(copy.deepcopy(model), kind, 1, k)
    assert rel_diff(cached_grads(model, kind, k), want) <= 1e-5


def test_pairwise_hard_negatives_through_the_cache():
    opts = {"hard_negative_mode": "pairwise", "hard_negative_weight": 2.0}
    model = build("softmax")
    want = reference_grads(copy.deepcopy(model), "softmax", 1, 3, masked=True, **opts)
    images, texts, hn = batch(0, 3)
    torch.manual_seed(seed(0))
    result = GradCache(model, ContrastiveLoss("softmax", **opts), CHUNK).step(images, texts, hn, mask_of(0, 3))
    assert rel_diff(grads_of(model), want) <= 1e-5
    assert result.terms["hard_negative"] > 0


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_masked_hard_negatives_through_the_cache(kind):
    model = build(kind)
    want = reference_grads(copy.deepcopy(model), kind, 1, 3, masked=True)
    unmasked = reference_grads(copy.deepcopy(model), kind, 1, 3)
    images, texts, hn = batch(0, 3)
    torch.manual_seed(seed(0))
    GradCache(model, ContrastiveLoss(kind), CHUNK).step(images, texts, hn, mask_of(0, 3))
    assert rel_diff(grads_of(model), want) <= 1e-5
    assert rel_diff(unmasked, want) > 1e-4  # 10x the tolerance: the mask matters, the check can fail


def test_without_rng_replay_gradients_differ():
    """The check above can fail: skipping the replay changes the patch-dropout masks."""
    model = build("softmax")
    want = reference_grads(copy.deepcopy(model), "softmax", 1, 0)
    assert rel_diff(cached_grads(model, "softmax", 0, replay_rng=False), want) > 1e-2


def test_opt_in_terms_through_the_cache():
    opts = {"decoupled": True, "align_uniform": 0.5}
    model = build("softmax")
    want = reference_grads(copy.deepcopy(model), "softmax", 1, 2, **opts)
    images, texts, hn = batch(0, 2)
    torch.manual_seed(seed(0))
    result = GradCache(model, ContrastiveLoss("softmax", **opts), CHUNK).step(images, texts, hn)
    assert rel_diff(grads_of(model), want) <= 1e-5
    assert {"contrastive", "alignment", "uniformity", "logit_scale"} <= set(result.terms)


def test_locked_image_tower_skips_its_reforward():
    model = build("softmax", lock_image=True)
    want = reference_grads(copy.deepcopy(model), "softmax", 1, 0)
    calls = []
    model.visual.register_forward_hook(lambda *a: calls.append(1))
    assert rel_diff(cached_grads(model, "softmax", 0), want) <= 1e-5
    assert len(calls) == PER_RANK // CHUNK  # pass 1 only
    assert all(p.grad is None for p in model.visual.parameters())


@pytest.mark.parametrize("chunk,forwards", [(None, 1), (PER_RANK, 1), (CHUNK, 2 * PER_RANK // CHUNK)])
def test_one_chunk_is_a_plain_step(chunk, forwards):
    model = build("softmax", patch_dropout=0.0)
    calls = []
    model.visual.register_forward_hook(lambda *a: calls.append(1))
    images, texts, _ = batch(0, 0)
    result = GradCache(model, ContrastiveLoss("softmax"), chunk).step(images, texts)
    assert len(calls) == forwards
    assert result.chunks == (1 if forwards == 1 else PER_RANK // CHUNK)
    assert result.loss == pytest.approx(result.terms["contrastive"])


def test_normalising_uint8_chunks_equals_normalised_input():
    """The trainer's seam: uint8 images normalised per chunk give the normalised batch's gradients, bit for bit."""
    model = build("softmax")
    reference = copy.deepcopy(model)
    mean, std = image_normalization(model)
    raw = torch.randint(0, 256, (PER_RANK, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    _, texts, hn = batch(0, 2)
    torch.manual_seed(seed(0))
    want = GradCache(reference, ContrastiveLoss("softmax"), CHUNK).step(normalize(raw, mean, std), texts, hn)
    torch.manual_seed(seed(0))
    gc = GradCache(model, ContrastiveLoss("softmax"), CHUNK, normalize_images=partial(normalize, mean=mean, std=std))
    got = gc.step(raw, texts, hn)
    assert got.loss == want.loss
    got_grads, want_grads = grads_of(model), grads_of(reference)
    assert set(got_grads) == set(want_grads)
    assert all(torch.equal(got_grads[name], g) for name, g in want_grads.items())


def test_small_images_through_the_cache():
    """The first phase's small images (vlp.train.tokendrop): each chunk resized inside the cache gives the gradients
    of a plain step on the batch resized beforehand."""
    model = build("softmax", patch_dropout=0.0)
    allow_smaller_images(model.visual, 16, "vlp-micro")
    reference = copy.deepcopy(model)
    images, texts, _ = batch(0, 0)
    small = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    want = GradCache(reference, ContrastiveLoss("softmax")).step(small, texts)
    cache = GradCache(model, ContrastiveLoss("softmax"), CHUNK)
    cache.image_size = 16
    got = cache.step(images, texts)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    assert rel_diff(grads_of(model), grads_of(reference)) <= 1e-5
    assert grads_of(model)["visual.positional_embedding"].abs().sum() > 0


def test_bf16_autocast():
    """bf16: the cache matches the uncached bf16 computation closely and fp32 to bf16 precision."""
    model = build("softmax")
    want16 = reference_grads(copy.deepcopy(model), "softmax", 1, 2, autocast=torch.bfloat16)
    want32 = reference_grads(copy.deepcopy(model), "softmax", 1, 2)
    got = cached_grads(model, "softmax", 2, autocast_dtype=torch.bfloat16)
    assert global_rel_diff(got, want16) <= 1e-2
    assert global_rel_diff(got, want32) <= 5e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_replays_cpu_and_cuda_streams():
    """CUDA dropout draws from the device generator, open_clip's PatchDropout from the CPU one."""
    state = RngState(torch.device("cuda"))
    first = torch.randn(4), torch.randn(4, device="cuda")
    torch.randn(1), torch.randn(1, device="cuda")
    torch.manual_seed(0)  # disturb the live stream; replay must not depend on it
    with state.replay():
        again = torch.randn(4), torch.randn(4, device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    model = build("sigmoid").cuda()
    want = reference_grads(copy.deepcopy(model), "sigmoid", 1, 2)
    assert (
        rel_diff(
            {k: v.cpu() for k, v in cached_grads(model, "sigmoid", 2).items()},
            {k: v.cpu() for k, v in want.items()},
        )
        <= 1e-4
    )


# ------------------------------------------------------------------ DDP over gloo


def _ddp_worker(rank: int, world: int) -> None:
    for kind, k in (("softmax", 0), ("softmax", 2), ("sigmoid", 0), ("sigmoid", 2)):
        model = build(kind)
        want = reference_grads(copy.deepcopy(model), kind, world, k)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        diff = rel_diff(cached_grads(ddp, kind, k, rank), want)
        assert diff <= 1e-5, (kind, k, diff)
    model = build("softmax")
    want = reference_grads(copy.deepcopy(model), "softmax", world, 0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert rel_diff(cached_grads(ddp, "softmax", 0, rank, replay_rng=False), want) > 1e-2


@pytest.mark.slow
def test_cached_ddp_two_ranks():
    run_local_ranks(_ddp_worker, 2)


# ------------------------------------------------------------------ DeepSpeed over gloo


def _engine(model, stage: int, bf16: bool = False):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW: no JIT-built optimizer op
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _engine_grads(engine, stage: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.module.named_parameters():  # collective under ZeRO-3: same order on all ranks
        g = p.grad if stage == 0 else safe_get_full_grad(p)
        if g is not None:
            out[name] = g.detach().float().clone()
    return out


def _deepspeed_worker(rank: int, world: int) -> None:
    vdist.prepare_for_deepspeed()
    cases = [
        (0, "softmax", 2, CHUNK),
        (0, "sigmoid", 0, CHUNK),
        (2, "softmax", 0, CHUNK),
        (2, "sigmoid", 2, CHUNK),
        (3, "softmax", 2, CHUNK),
        (3, "sigmoid", 2, CHUNK),
        (2, "softmax", 2, None),
    ]
    for stage, kind, k, chunk in cases:
        model = build(kind)
        want = reference_grads(copy.deepcopy(model), kind, world, k)
        engine = _engine(model, stage)
        images, texts, hn = batch(rank, k)
        torch.manual_seed(seed(rank))
        GradCache(engine, ContrastiveLoss(kind), chunk).step(images, texts, hn)
        diff = rel_diff(_engine_grads(engine, stage), want)
        assert diff <= 1e-5, (stage, kind, k, chunk, diff)
        engine.step()  # the trainer's half of the contract must work after the cached backward
    masked_cases = [("softmax", {}), ("sigmoid", {}), ("softmax", {"hard_negative_mode": "pairwise"})]
    for kind, opts in masked_cases:  # padding slots of hard negatives, masked across ranks
        model = build(kind)
        want = reference_grads(copy.deepcopy(model), kind, world, 3, masked=True, **opts)
        engine = _engine(model, 2)
        images, texts, hn = batch(rank, 3)
        torch.manual_seed(seed(rank))
        GradCache(engine, ContrastiveLoss(kind, **opts), CHUNK).step(images, texts, hn, mask_of(rank, 3))
        diff = rel_diff(_engine_grads(engine, 2), want)
        assert diff <= 1e-5, ("masked", kind, opts, diff)
        engine.step()
    model = build("softmax")
    want = reference_grads(copy.deepcopy(model), "softmax", world, 2)
    engine = _engine(model, 2, bf16=True)
    images, texts, hn = batch(rank, 2)
    torch.manual_seed(seed(rank))
    GradCache(engine, ContrastiveLoss("softmax"), CHUNK).step(images, texts, hn)
    diff = global_rel_diff(_engine_grads(engine, 2), want)
    assert diff <= 5e-2, ("bf16", diff)
    engine.step()


@pytest.mark.slow
def test_cached_deepspeed_two_ranks():
    run_local_ranks(_deepspeed_worker, 2)
