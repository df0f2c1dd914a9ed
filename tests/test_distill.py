"""Distillation from a frozen teacher (open_clip_train's --distill-model): the term's mathematics on a
hand-checked case and against open_clip's DistillClipLoss, the gradient contract across gloo ranks, and a real
`vlp train` with a teacher: gradient caching gives the plain step's losses, the teacher moves the student, and a
teacher that reads other inputs is refused in one line before training.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from open_clip.loss import DistillClipLoss
from ranks import reduce_mean, run_local_ranks
from shard_helpers import tiny_shards
from train_runs import train_metrics

from vlp.core.config import ModelConfig
from vlp.core.models import create_model
from vlp.core.weights import write_weights
from vlp.train.losses import ContrastiveLoss, Teacher, distillation

SCALE = torch.tensor([4.0])


def _feats(n: int, seed: int, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def test_distillation_by_hand():
    """Student logits [[2, 0], [0, 2]], a teacher whose logits are all equal (uniform targets): each row's
    cross-entropy is -(log p + log(1 - p)) / 2 with p = e^2 / (e^2 + 1), that is log(1 + e^2) - 1."""
    eye = torch.eye(2)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = distillation(eye, eye, torch.tensor(2.0), Teacher(same, same, torch.tensor([3.0])))
    assert got.item() == pytest.approx(math.log(1 + math.e**2) - 1, rel=1e-6)


def test_equals_open_clip_distill_clip_loss():
    img, txt = _feats(6, 0)
    t_img, t_txt = _feats(6, 1)
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    out = ContrastiveLoss("softmax", distill_weight=0.7)(a, b, SCALE, teacher=Teacher(t_img, t_txt, SCALE / 2))
    contrastive, distill = DistillClipLoss()(img, txt, SCALE.reshape(()), t_img, t_txt, (SCALE / 2).reshape(()))
    assert out["distill"].item() == pytest.approx(distill.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(contrastive.item() + 0.7 * distill.item(), rel=1e-6)
    out["loss"].backward()
    plain = ContrastiveLoss("softmax")(img.clone().requires_grad_(), txt, SCALE)["loss"]
    assert a.grad is not None and out["loss"].item() != pytest.approx(plain.item())


def _distill_worker(rank: int, world: int) -> None:
    """Per-rank losses average to the global one; local gradients are world x the global ones."""
    n = 4
    img, txt = _feats(n * world, 2)
    t_img, t_txt = _feats(n * world, 3)
    sl = slice(rank * n, (rank + 1) * n)
    a, b = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
    out = ContrastiveLoss("softmax", distill_weight=0.5)(a, b, SCALE, teacher=Teacher(t_img[sl], t_txt[sl], SCALE))
    out["loss"].backward()
    ga, gb = img.clone().requires_grad_(), txt.clone().requires_grad_()
    ref = ContrastiveLoss("softmax", distill_weight=0.5, world_size=1, rank=0)(
        ga, gb, SCALE, teacher=Teacher(t_img, t_txt, SCALE))
    ref["loss"].backward()
    assert reduce_mean(out["loss"]) == pytest.approx(ref["loss"].item(), rel=1e-5)
    torch.testing.assert_close(a.grad, world * ga.grad[sl], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad, world * gb.grad[sl], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_distillation_across_gloo_ranks():
    run_local_ranks(_distill_worker, 2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(11)
    teacher = root / "teacher.safetensors"
    write_weights(create_model(ModelConfig(name="vlp-micro"))[0].state_dict(), teacher, "vlp-micro")
    return tiny_shards(root, n=32), teacher


def _train(shards: Path, out: Path, *extra: str) -> list[dict]:
    return train_metrics(shards, out, "data.workers=0", "train.steps=3", "train.log_every=1",
                         "optim.warmup_steps=1", *extra)


def test_training_with_a_teacher(setup, tmp_path):
    shards, teacher = setup
    with_teacher = ("loss.distill_model=vlp-micro", f"loss.distill_pretrained={teacher}")
    plain = _train(shards, tmp_path / "plain", *with_teacher)
    cached = _train(shards, tmp_path / "cached", *with_teacher, "train.micro_batch_size=4")
    alone = _train(shards, tmp_path / "alone")
    assert all("distill" in m for m in plain) and "distill" not in alone[0]
    for p, c in zip(plain, cached, strict=True):  # gradient caching stays exact with the teacher's term
        assert c["loss"] == pytest.approx(p["loss"], rel=1e-5) and c["distill"] == pytest.approx(p["distill"], rel=1e-5)
    assert plain[0]["contrastive"] == pytest.approx(alone[0]["contrastive"], rel=1e-6)  # same start, same batch
    assert plain[-1]["contrastive"] != pytest.approx(alone[-1]["contrastive"], rel=1e-4)  # the teacher moved it


def test_a_teacher_that_reads_other_inputs_is_refused(setup, tmp_path):
    shards, _ = setup
    cmd = [sys.executable, "-m", "vlp", "train", f"data.sources=[{{shards: '{shards}'}}]", "model.name=vlp-micro",
           "loss.distill_model=vlp-tiny-p16", f"train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("vlp: error: config key 'loss.distill_model': the teacher")
    assert not (tmp_path / "run").exists()  # refused before any folder was made
