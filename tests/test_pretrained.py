"""Pretrained weights the open_clip way: `local-dir:` folders, `hf-hub:` repositories and open_clip's pretrained
tags, resolved by open_clip and huggingface_hub themselves from a Hugging Face cache folder the test writes
(offline: HF_HUB_OFFLINE=1, nothing is downloaded), and open_clip's partial locking keys.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported, so the cache tests run vlp in a
fresh process with those set, as a user's shell would.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlp.core.config import ModelConfig
from vlp.core.errors import UserError
from vlp.core.models import check_model, create_model
from vlp.core.weights import write_weights
from vlp.train.export import export_open_clip_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHECKSUM = """
import hashlib, sys
from vlp.core.config import ModelConfig
from vlp.core.models import check_model, create_model
cfg = ModelConfig(name=sys.argv[1], pretrained=sys.argv[2] or None)
check_model(cfg)
model = create_model(cfg)[0]
digest = hashlib.sha256()
for key, value in sorted(model.state_dict().items()):
    digest.update(key.encode() + value.float().numpy().tobytes())
print(digest.hexdigest())
"""


def _checksum(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(key.encode() + value.float().reshape(value.shape or (1,)).numpy().tobytes())
    return digest.hexdigest()


def _open_clip_dir(tmp_path: Path, name: str = "vlp-tiny") -> Path:
    """An open_clip-dir export (config + weights) of a freshly initialised model, as `vlp export` writes it."""
    torch.manual_seed(7)
    model = create_model(ModelConfig(name=name))[0]
    weights = tmp_path / "weights.safetensors"
    write_weights(model.state_dict(), weights, name)
    return export_open_clip_dir(weights, tmp_path / "export")[0]


def _hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache holding `files` as the main revision of model repo `repo`."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        (snapshot / name).write_bytes(path.read_bytes())
    return root


def _run_offline(cache: Path, name: str, pretrained: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf")}
    return subprocess.run([sys.executable, "-c", CHECKSUM, name, pretrained], capture_output=True, text=True,
                          env=env, timeout=300)


def test_local_dir_model_loads_its_folder(tmp_path):
    folder = _open_clip_dir(tmp_path)
    cfg = ModelConfig(name=f"local-dir:{folder}")
    check_model(cfg)
    model = create_model(cfg)[0]
    assert _checksum(model.state_dict()) == _checksum(load_file(folder / "open_clip_model.safetensors"))
    with pytest.raises(UserError, match="weights come from the folder"):
        check_model(ModelConfig(name=f"local-dir:{folder}", pretrained=str(tmp_path / "weights.safetensors")))
    with pytest.raises(UserError, match="no open_clip_config.json"):
        check_model(ModelConfig(name=f"local-dir:{tmp_path}"))


def test_hf_hub_model_from_the_cache_offline(tmp_path):
    folder = _open_clip_dir(tmp_path)
    cache = _hub_cache(tmp_path / "hub", "vlp-test/tiny-clip", {
        "open_clip_config.json": folder / "open_clip_config.json",
        "open_clip_model.safetensors": folder / "open_clip_model.safetensors"})
    done = _run_offline(cache, "hf-hub:vlp-test/tiny-clip")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == _checksum(load_file(folder / "open_clip_model.safetensors"))

    missing = _run_offline(cache, "hf-hub:vlp-test/not-cached")
    assert missing.returncode != 0
    error = missing.stderr.strip().splitlines()[-1]
    assert "UserError" in error and "hf-hub:vlp-test/not-cached" in error and "HF_HUB_OFFLINE" in error


def test_unknown_pretrained_tag_names_the_known_ones():
    with pytest.raises(UserError, match=r"'yfcc15" + r"x'.*RN50.*(openai|yfcc15m)"):
        check_model(ModelConfig(name="RN50", pretrained="yfcc15x"))
    with pytest.raises(UserError, match="weights file not found"):
        check_model(ModelConfig(name="vlp-tiny", pretrained="runs/x/model.safetensors"))


@pytest.mark.slow
def test_pretrained_tag_resolved_through_open_clip_from_the_cache(tmp_path):
    """RN50 `yfcc15m`: open_clip maps the tag to its Hub repository (timm/resnet50_clip.yfcc15m) and file."""
    torch.manual_seed(3)
    model = create_model(ModelConfig(name="RN50"))[0]
    weights = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cache = _hub_cache(tmp_path / "hub", "timm/resnet50_clip.yfcc15m", {"open_clip_model.safetensors": weights})
    done = _run_offline(cache, "RN50", "yfcc15m")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == _checksum(model.state_dict())

    absent = _run_offline(cache, "RN50", "cc12m")  # a real tag, not in this cache
    assert absent.returncode != 0 and "'cc12m'" in absent.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name, key, groups", [("vlp-tiny", "lock_image_unlocked_groups", 1),
                                               ("vlp-tiny", "lock_text_unlocked_layers", 2)])
def test_partial_locking_follows_open_clip(name, key, groups):
    image = key.startswith("lock_image")
    cfg = ModelConfig(name=name, **{"lock_image" if image else "lock_text": True, key: groups})
    model = create_model(cfg)[0]
    reference = create_model(ModelConfig(name=name))[0]
    if image:
        reference.lock_image_tower(unlocked_groups=groups, freeze_bn_stats=True)
    else:
        reference.lock_text_tower(unlocked_layers=groups, freeze_layer_norm=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    everything_but_the_tower = {n for n, _ in model.named_parameters() if n.startswith("visual.") != image}
    assert frozen and not frozen & everything_but_the_tower and trainable - everything_but_the_tower


def test_locking_a_resnet_tower():
    """open_clip locks a ModifiedResNet whole only; its BatchNorm statistics freeze as the key says."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    with pytest.raises(UserError, match="cannot lock model 'vlp-tiny-rn' that way"):
        create_model(ModelConfig(name="vlp-tiny-rn", lock_image=True, lock_image_unlocked_groups=1))
    for freeze in (True, False):
        model = create_model(ModelConfig(name="vlp-tiny-rn", lock_image=True, lock_image_freeze_bn_stats=freeze))[0]
        frozen_norms = sum(isinstance(m, FrozenBatchNorm2d) for m in model.visual.modules())
        assert (frozen_norms > 0) == freeze
        assert not any(p.requires_grad for p in model.visual.parameters())


def test_eval_takes_local_dir_models_and_pretrained_as_weights(tmp_path):
    """`vlp eval --model local-dir:DIR` and `--model NAME --pretrained FILE` encode as the weights they name."""
    from vlp.eval.encoders import load_encoder, resolve_model

    from vlp.core.config import EvalConfig

    folder = _open_clip_dir(tmp_path)
    captions = ["two red circles", "a blue star"]
    by_dir, info = load_encoder(resolve_model(f"local-dir:{folder}"))
    cfg = EvalConfig(model="vlp-tiny", pretrained=str(folder / "open_clip_model.safetensors"), out="o")
    by_name, _ = load_encoder(resolve_model(cfg.model, cfg.weights))
    assert torch.equal(by_dir.encode_texts(captions), by_name.encode_texts(captions))
    assert not info["random_init"] and info["name"] == f"local-dir:{folder}"
    with pytest.raises(UserError, match="brings its own weights"):
        resolve_model(f"local-dir:{folder}", str(folder / "open_clip_model.safetensors"))
    with pytest.raises(UserError, match="'nope' is neither a file nor one of open_clip's tags for RN50"):
        resolve_model("RN50", "nope")
