"""vlp.train.losses against open_clip's ClipLoss / SigLipLoss and hand-written formulas, in one
process and across gloo ranks; plus the launcher-environment helpers of vlp.core.distributed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from ranks import reduce_mean, run_local_ranks

import vlp.train.losses as vl
from vlp.core import distributed as vdist
from vlp.core.config import LossConfig
from vlp.train.losses import ContrastiveLoss


def feats(n: int, d: int = 16, k: int = 0, seed: int = 0):
    """Normalised image/text (and [n, k, d] hard-negative) features, reproducible on every rank."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=g), dim=-1)
    hn = F.normalize(torch.randn(n, k, d, generator=g), dim=-1) if k else None
    return img, txt, hn


def leaves(*xs):
    return [None if x is None else x.clone().requires_grad_() for x in xs]


SCALE, BIAS = torch.tensor([12.0]), torch.tensor([-4.0])


@pytest.fixture(params=[False, True], ids=["one-block", "row-blocks"])
def blocks(request, monkeypatch):
    """Run each test with the loss in one piece and split into checkpointed row blocks."""
    if request.param:
        monkeypatch.setattr(vl, "BLOCK_ELEMENTS", 64)
    return request.param


# ------------------------------------------------------------------ single process


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_matches_open_clip_single_process(kind, blocks):
    img, txt, _ = feats(33)
    a, b, s, bias = leaves(img, txt, SCALE, BIAS)
    ours = ContrastiveLoss(kind)(a, b, s, bias)["loss"]
    ours.backward()
    a2, b2, s2, bias2 = leaves(img, txt, SCALE.reshape(()), BIAS.reshape(()))
    ref = ClipLoss()(a2, b2, s2) if kind == "softmax" else SigLipLoss()(a2, b2, s2, bias2)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for x, y in ((a, a2), (b, b2), (s, s2)):
        torch.testing.assert_close(x.grad.reshape(y.grad.shape), y.grad, rtol=1e-5, atol=1e-6)
    if kind == "sigmoid":
        torch.testing.assert_close(bias.grad.reshape(()), bias2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_is_cross_entropys(eps, blocks):
    img, txt, _ = feats(33)
    a, b, s = leaves(img, txt, SCALE)
    ours = ContrastiveLoss("softmax", label_smoothing=eps)(a, b, s)["loss"]
    ours.backward()
    a2, b2, s2 = leaves(img, txt, SCALE.reshape(()))
    logits, labels = s2 * a2 @ b2.T, torch.arange(33)
    ref = (F.cross_entropy(logits, labels, label_smoothing=eps) + F.cross_entropy(logits.T, labels,
                                                                                  label_smoothing=eps)) / 2
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ours.item() > ContrastiveLoss("softmax")(img, txt, SCALE)["loss"].item()  # smoothing costs on a fit
    for x, y in ((a, a2), (b, b2), (s, s2)):
        torch.testing.assert_close(x.grad.reshape(y.grad.shape), y.grad, rtol=1e-5, atol=1e-6)


def _softmax_by_hand(img, txt, scale, hn=None, w=1.0, decoupled=False):
    """Direct formula: -log( e^pos / (sum over kept columns + w * sum over hard negatives) )."""
    n = img.shape[0]
    logits = scale * img @ txt.T
    total = 0.0
    for direction in (logits, logits.T):
        for i in range(n):
            row = direction[i]
            denom = row.exp().sum() - (row[i].exp() if decoupled else 0)
            if hn is not None and direction is logits:
                denom = denom + w * (scale * hn[i] @ img[i]).exp().sum()
            total = total - (row[i] - denom.log())
    return total / (2 * n)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("k,w", [(0, 1.0), (3, 1.0), (3, 0.5)])
def test_softmax_hard_negatives_and_dcl(decoupled, k, w, blocks):
    img, txt, hn = feats(10, k=k)
    loss = ContrastiveLoss("softmax", decoupled=decoupled, hard_negative_weight=w)
    got = loss(img, txt, SCALE, None, hn)["loss"]
    want = _softmax_by_hand(img, txt, SCALE, hn, w, decoupled)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_hard_negatives_change_only_image_to_text_and_weight_zero_removes_them():
    img, txt, hn = feats(8, k=2)
    plain = ContrastiveLoss("softmax")(img, txt, SCALE)["loss"]
    assert (
        ContrastiveLoss("softmax", hard_negative_weight=0.0)(img, txt, SCALE, None, hn)["loss"].item()
        == plain.item()
    )
    assert ContrastiveLoss("softmax")(img, txt, SCALE, None, hn)["loss"].item() > plain.item()


def test_sigmoid_hard_negatives_by_hand():
    img, txt, hn = feats(6, k=2)
    w = 0.7
    got = ContrastiveLoss("sigmoid", hard_negative_weight=w)(img, txt, SCALE, BIAS, hn)["loss"]
    logits = SCALE * img @ txt.T + BIAS
    labels = 2 * torch.eye(6) - 1
    base = -F.logsigmoid(labels * logits).sum()
    extra = -F.logsigmoid(-(SCALE * torch.einsum("nd,nkd->nk", img, hn) + BIAS)).sum()
    assert got.item() == pytest.approx(((base + w * extra) / 6).item(), rel=1e-6)


def _by_hand_with_mask(kind, img, txt, hn, mask):
    """Each image's real negatives only: softmax denominators / sigmoid negative pairs."""
    n = img.shape[0]
    if kind == "sigmoid":
        logits = SCALE * img @ txt.T + BIAS
        base = -F.logsigmoid((2 * torch.eye(n) - 1) * logits).sum()
        neg = sum(F.softplus(SCALE * hn[i][mask[i]] @ img[i] + BIAS).sum() for i in range(n))
        return (base + neg) / n
    logits = SCALE * img @ txt.T
    total = 0.0
    for i in range(n):
        i2t = logits[i].exp().sum() + (SCALE * hn[i][mask[i]] @ img[i]).exp().sum()
        t2i = logits[:, i].exp().sum()
        total = total - (logits[i, i] - i2t.log()) - (logits[i, i] - t2i.log())
    return total / (2 * n)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_masked_hard_negatives_count_as_absent(kind, blocks):
    """A padding slot (mask False) changes neither the loss nor any gradient, whatever it holds."""
    img, txt, hn = feats(6, k=3)
    mask = torch.tensor([[True, False, False]] * 3 + [[True, True, False]] * 3)
    a, b, h, s, bias = leaves(img, txt, hn, SCALE, BIAS)
    masked = ContrastiveLoss(kind)(a, b, s, bias, h, hard_negative_mask=mask)["loss"]
    masked.backward()
    assert masked.item() == pytest.approx(_by_hand_with_mask(kind, img, txt, hn, mask).item(), rel=1e-5)
    assert h.grad[~mask].abs().max().item() == 0.0 and h.grad[mask].abs().max().item() > 0
    junk = hn.clone()  # whatever the padding slots hold
    junk[~mask] = F.normalize(torch.randn(int((~mask).sum()), hn.shape[-1]), dim=-1)
    again = ContrastiveLoss(kind)(img, txt, SCALE, BIAS, junk, hard_negative_mask=mask)["loss"]
    assert again.item() == pytest.approx(masked.item(), rel=1e-6)
    ones, zeros = torch.ones(6, 3, dtype=torch.bool), torch.zeros(6, 3, dtype=torch.bool)
    loss = ContrastiveLoss(kind)
    assert loss(img, txt, SCALE, BIAS, hn, hard_negative_mask=ones)["loss"].item() == pytest.approx(
        loss(img, txt, SCALE, BIAS, hn)["loss"].item(), rel=1e-6)
    assert loss(img, txt, SCALE, BIAS, hn, hard_negative_mask=zeros)["loss"].item() == pytest.approx(
        loss(img, txt, SCALE, BIAS)["loss"].item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_pairwise_hard_negative_term_by_hand(kind):
    img, txt, hn = feats(6, k=2)
    mask = torch.tensor([[True, True], [True, False]] * 3)
    w = 0.5
    out = ContrastiveLoss(kind, hard_negative_weight=w, hard_negative_mode="pairwise")(
        img, txt, SCALE, BIAS, hn, hard_negative_mask=mask)
    plain = ContrastiveLoss(kind)(img, txt, SCALE, BIAS)["loss"]
    by_hand = 0.0
    for i in range(6):
        pos = SCALE * img[i] @ txt[i]
        negs = SCALE * hn[i][mask[i]] @ img[i]
        by_hand = by_hand - (pos - torch.logsumexp(torch.cat([pos.reshape(1), negs]), 0))
    assert out["hard_negative"].item() == pytest.approx(w * by_hand.item() / 6, rel=1e-5)
    assert out["contrastive"].item() == pytest.approx(plain.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(plain.item() + w * by_hand.item() / 6, rel=1e-5)


def test_alignment_uniformity_by_hand(blocks):
    img, txt, _ = feats(12)
    out = ContrastiveLoss("softmax", align_uniform=0.5)(img, txt, SCALE)
    align = (img - txt).norm(dim=1).pow(2).mean()
    unif = [torch.pdist(x).pow(2).mul(-2).exp().mean().log() for x in (img, txt)]
    assert out["alignment"].item() == pytest.approx(align.item(), rel=1e-5)
    assert out["uniformity"].item() == pytest.approx(((unif[0] + unif[1]) / 2).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        (out["contrastive"] + 0.5 * (align + out["uniformity"])).item(), rel=1e-6
    )


def test_logit_scale_parameter_is_clamped_after_the_update_not_in_the_loss():
    """open_clip_train's rule: the loss uses exp(t) as given (its gradient reaches t at the cap), and the
    parameter is clamped to [0, log max] after each update."""
    from vlp.train.schedule import clamp_logit_scale

    img, txt, _ = feats(8)
    s = torch.tensor([math.log(100)], requires_grad=True)
    out = ContrastiveLoss("softmax")(img, txt, s.exp())
    assert out["loss"].item() == pytest.approx(ClipLoss()(img, txt, s.exp()).item(), rel=1e-6)
    out["loss"].backward()
    assert s.grad.item() != 0.0
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor([6.0]))
    clamp_logit_scale(model, 100.0)
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    model.logit_scale.data.fill_(-1.0)
    clamp_logit_scale(model, 100.0)
    assert model.logit_scale.item() == 0.0


def test_invalid_combinations_are_refused():
    with pytest.raises(ValueError, match="local_loss"):
        ContrastiveLoss("softmax", local_loss=True, gather_with_grad=False)
    img, txt, _ = feats(4)
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("sigmoid")(img, txt, SCALE)
    for kind, decoupled in (("sigmoid", False), ("softmax", True)):
        with pytest.raises(ValueError, match="label_smoothing"):
            ContrastiveLoss(kind, decoupled=decoupled, label_smoothing=0.1)
        with pytest.raises(ValueError, match="label_smoothing"):
            LossConfig(kind=kind, decoupled=decoupled, label_smoothing=0.1)


# ------------------------------------------------------------------ several ranks


def _global_reference(kind, img, txt, hn, **opts):
    """Single-process loss on the global batch and its gradients (the ground truth)."""
    a, b, h, s, bias = leaves(img, txt, hn, SCALE, BIAS)
    loss = ContrastiveLoss(kind, world_size=1, rank=0, **opts)(a, b, s, bias, h)["loss"]
    loss.backward()
    return loss.detach(), a.grad, b.grad, None if h is None else h.grad, s.grad, bias.grad


def _check_contract(kind, rank, world, n_local, img, txt, hn, **opts):
    """Per-rank loss averaged over ranks = global loss; local grads = W x global grads; scale grads average."""
    sl = slice(rank * n_local, (rank + 1) * n_local)
    a, b, h, s, bias = leaves(img[sl], txt[sl], None if hn is None else hn[sl], SCALE, BIAS)
    out = ContrastiveLoss(kind, **opts)(a, b, s, bias, h)
    out["loss"].backward()
    ref_loss, ga, gb, gh, gs, gbias = _global_reference(kind, img, txt, hn, **opts)
    assert reduce_mean(out["loss"]) == pytest.approx(ref_loss.item(), rel=1e-5), opts
    torch.testing.assert_close(a.grad, world * ga[sl], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad, world * gb[sl], rtol=1e-4, atol=1e-6)
    if h is not None:
        torch.testing.assert_close(h.grad, world * gh[sl], rtol=1e-4, atol=1e-6)
    for g, want in ((s.grad, gs), (bias.grad, gbias)):
        if want is not None:
            dist.all_reduce(g)
            torch.testing.assert_close(g / world, want, rtol=1e-4, atol=1e-6)
    return out["loss"].detach(), a.grad, b.grad


def _loss_worker(rank: int, world: int) -> None:
    """Runs on every rank: values vs open_clip, gradient contract, chunked == full sigmoid."""
    n_local = 5
    img, txt, hn = feats(n_local * world, k=2, seed=1)
    sl = slice(rank * n_local, (rank + 1) * n_local)
    li, lt = img[sl], txt[sl]
    # softmax: every open_clip option combination we support gives open_clip's value
    for local_loss, with_grad in ((False, False), (False, True), (True, True)):
        ref = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
        ours = ContrastiveLoss("softmax", local_loss=local_loss, gather_with_grad=with_grad)
        assert ours(li, lt, SCALE)["loss"].item() == pytest.approx(
            ref(li, lt, SCALE.reshape(())).item(), rel=1e-6
        )
        for extra in ({}, {"decoupled": True}, {"align_uniform": 0.3}):
            _check_contract(
                "softmax",
                rank,
                world,
                n_local,
                img,
                txt,
                hn,
                local_loss=local_loss,
                gather_with_grad=with_grad,
                **extra,
            )
    # open_clip's gather_with_grad gradient equals ours (both are DDP-exact)
    a, a2 = leaves(li)[0], leaves(li)[0]
    ContrastiveLoss("softmax")(a, lt, SCALE)["loss"].backward()
    ClipLoss(gather_with_grad=True, rank=rank, world_size=world)(a2, lt, SCALE.reshape(())).backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-6)
    # sigmoid: chunked (neighbour exchange) and full (gather) both equal open_clip's bidir SigLipLoss
    ref = SigLipLoss(rank=rank, world_size=world)(li, lt, SCALE.reshape(()), BIAS.reshape(())).item()
    results = {}
    for chunked in (True, False):
        ours = ContrastiveLoss("sigmoid", sigmoid_chunked=chunked)(li, lt, SCALE, BIAS)["loss"].item()
        assert ours == pytest.approx(ref, rel=1e-6)
        results[chunked] = _check_contract(
            "sigmoid", rank, world, n_local, img, txt, hn, sigmoid_chunked=chunked
        )
        _check_contract(
            "sigmoid", rank, world, n_local, img, txt, None, sigmoid_chunked=chunked, align_uniform=0.2
        )
    for x, y in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_losses_across_gloo_ranks(world):
    """world 2 uses the one-way exchange; 3 the bidirectional one."""
    run_local_ranks(_loss_worker, world)


# ------------------------------------------------------------------ launcher environments


@pytest.mark.parametrize(
    "env,want",
    [
        ({}, vdist.DistEnv()),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, vdist.DistEnv(3, 8, 1, "torchrun")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, vdist.DistEnv(5, 16, 1, "slurm")),
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
            vdist.DistEnv(2, 4, 0, "openmpi"),
        ),
        # torchrun / accelerate variables win over SLURM's when both are present (srun + torchrun)
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
            vdist.DistEnv(1, 2, 1, "torchrun"),
        ),
    ],
)
def test_detect_env(env, want):
    assert vdist.detect_env(env) == want


def test_backend():
    assert vdist.pick_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert vdist.get_world_size() == 1 and vdist.get_rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert vdist.all_gather_with_grad(x) is x and vdist.all_gather_replicated(x) is x
    assert math.isclose(reduce_mean(2.5), 2.5)


def test_deepspeed_op_builds_use_the_ninja_of_this_environment(tmp_path, monkeypatch):
    """Two ninja versions reading one build folder each rebuild the other's ops: this environment's wins."""
    import os
    import sys

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    vdist.use_this_environments_ninja()
    assert os.environ["PATH"] == "/usr/bin:/bin"  # no ninja installed here: PATH untouched
    (bin_dir / "ninja").write_text("#!/bin/sh\n")
    vdist.use_this_environments_ninja()
    vdist.use_this_environments_ninja()
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"  # first, and only once
