"""DeGLA-style fine-tuning: the EMA teacher, feature distillation and the text-grounded contrast."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from train_runs import train_metrics
from vlp.data_tools.build import build_shards
from vlp.data_tools.synth import generate

from vlp.core.config import LossConfig, ShardsBuildConfig
from vlp.train.distill import EMA_FILE, EmaTeacher
from vlp.train.losses import ContrastiveLoss, Teacher


def test_feature_distillation_and_the_text_grounded_contrast_on_a_hand_checked_case():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    teacher = Teacher(img.clone(), torch.tensor([[0.6, 0.8], [0.0, 1.0]]), torch.tensor(1.0))
    negatives = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # one per caption, orthogonal to it
    loss = ContrastiveLoss("softmax", world_size=1, hard_negative_weight=0.0, distill_weight=0.0,
                           feature_distill_weight=1.0, text_grounded_weight=0.5, text_grounded_scale=10.0)
    terms = loss(img, txt, torch.tensor(1.0), hard_negatives=negatives, teacher=teacher)
    # features: caption 0 is ||(1,0) - (0.6,0.8)||^2 = 0.8 from its teacher embedding, the rest 0; mean over 2 pairs
    assert terms["feature_distill"].item() == pytest.approx(0.4, rel=1e-6)
    # text-grounded: caption 0 with the teacher's at 10 * 0.6 = 6 against its negative at 0; caption 1 at 10 against 0
    want = (math.log1p(math.exp(-6)) + math.log1p(math.exp(-10))) / 2
    assert terms["text_grounded"].item() == pytest.approx(want, abs=1e-6)  # fp32 logsumexp near its max
    assert terms["loss"].item() == pytest.approx(terms["contrastive"].item() + 0.4 + 0.5 * want, rel=1e-6)
    terms["loss"].backward()
    assert txt.grad is not None and txt.grad.abs().sum() > 0
    # a padding slot takes no part: caption 1's only negative masked leaves just caption 0's share (log 1 = 0 for 1)
    masked = loss(img, txt.detach(), torch.tensor(1.0), hard_negatives=negatives,
                  hard_negative_mask=torch.tensor([[True], [False]]), teacher=teacher)
    assert masked["text_grounded"].item() == pytest.approx(math.log1p(math.exp(-6)) / 2, abs=1e-6)


def test_the_ema_teacher_moves_a_share_of_the_way_each_update():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EmaTeacher(student, decay=0.9, model_name="unused")
    start = copy.deepcopy(student.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(4, 3))  # moves the batch-norm statistics: buffers are copied, not averaged
    ema.update(student)
    got = ema.model.state_dict()
    for name, p in student.named_parameters():
        torch.testing.assert_close(got[name], 0.9 * start[name] + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["1.running_mean"], student.state_dict()["1.running_mean"])
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_a_second_teacher_or_terms_without_one_are_refused():
    with pytest.raises(ValidationError, match="one teacher at a time"):
        LossConfig(ema_teacher=0.99, distill_model="vlp-micro")
    with pytest.raises(ValidationError, match="need a teacher"):
        LossConfig(text_grounded_weight=1.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """64 synthetic pairs with the generator's counterfactual captions (the hard negatives)."""
    root = tmp_path_factory.mktemp("degla")
    csv_path = generate(root / "synth", n=64, seed=3, image_size=32, progress=False)
    opts = ShardsBuildConfig(inputs=[str(csv_path)], output=str(root / "shards"), image_size=32,
                             keep_cols=["kind", "hard_negatives"], shard_size=32, workers=0)
    build_shards(opts, progress=False)
    return root / "shards"


DEGLA = ("loss.ema_teacher=0.9", "loss.distill_weight=0", "loss.feature_distill_weight=1.0",
         "loss.text_grounded_weight=0.5", "data.hard_negatives=1", "loss.hard_negative_mode=pairwise",
         "data.workers=0", "train.log_every=1", "optim.warmup_steps=1", "train.checkpoint_every=2", "train.steps=4")


@pytest.mark.slow
def test_a_degla_run_trains_its_terms_and_resumes_with_the_same_teacher(shards, tmp_path):
    whole = [m for m in train_metrics(shards, tmp_path / "whole", *DEGLA) if "step" in m]
    assert [m["step"] for m in whole] == [1, 2, 3, 4]
    assert all("text_grounded" in m and "hard_negative" in m for m in whole)
    assert whole[0]["feature_distill"] < 1e-10  # the teacher starts as the model
    assert whole[-1]["feature_distill"] > 1e-8  # and then trails it
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000002"
    assert (checkpoint / EMA_FILE).is_file()
    resumed = [m for m in train_metrics(shards, tmp_path / "resumed", *DEGLA, f"train.resume={checkpoint}")
               if "step" in m]
    assert [m["step"] for m in resumed] == [3, 4]
    for got, want in zip(resumed, whole[2:], strict=True):
        for key in ("loss", "feature_distill", "text_grounded"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_an_ema_teacher_under_zero_3_is_one_line(shards, tmp_path):
    cmd = [sys.executable, "-m", "vlp", "train", f"data.sources=[{{shards: '{shards}'}}]", "model.name=vlp-micro",
           "loss.ema_teacher=0.99", "train.zero_stage=3", f"train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("vlp: error: config key 'loss.ema_teacher': works with")
