"""vlp.core.models: open_clip factory models, our tiny configs, options, safe weights and export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from shard_helpers import tiny_shards

from vlp.core.config import LossConfig, ModelConfig
from vlp.core.errors import UserError
from vlp.core.models import (
    check_model,
    create_model,
    encode,
    list_models,
    make_tokenizer,
    to_open_clip_state_dict,
)
from vlp.core.weights import write_weights


def inputs(model, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    images = torch.randn(n, 3, *size, generator=g)
    texts = torch.randint(1, 5000, (n, model.context_length), generator=g)
    return images, texts


def test_tiny_configs_are_registered_with_the_documented_shape():
    assert {"vlp-tiny", "vlp-tiny-p16", "vlp-tiny-sigmoid", "vlp-micro", "ViT-B-32", "RN50"} <= set(
        list_models()
    )
    model, train_tf, val_tf, tokenizer = create_model(ModelConfig(name="vlp-tiny"), LossConfig())
    assert model.visual.image_size == (64, 64) and model.visual.conv1.kernel_size == (8, 8)
    assert len(model.visual.transformer.resblocks) == 4 and model.visual.transformer.width == 128
    assert len(model.transformer.resblocks) == 4 and model.transformer.width == 128
    assert model.context_length == 32 and model.vocab_size == 49408
    assert tokenizer(["two red squares"]).shape == (1, 32)
    # shape (1,), not 0-dim: deepspeed.initialize cannot broadcast 0-dim parameters
    assert model.logit_scale.shape == (1,) and model.logit_bias is None
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


@pytest.mark.parametrize(
    "name,loss_cfg", [("vlp-micro", LossConfig(kind="sigmoid")), ("vlp-tiny-sigmoid", None)]
)
def test_sigmoid_init(name, loss_cfg):
    model, *_ = create_model(ModelConfig(name=name), loss_cfg)
    assert model.logit_scale.shape == (1,) and model.logit_bias.shape == (1,)
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    assert model.logit_bias.item() == pytest.approx(-10)


def test_loss_config_overrides_init():
    cfg = LossConfig(kind="sigmoid", init_logit_scale=1.5, init_logit_bias=-3.0)
    model, *_ = create_model(ModelConfig(name="vlp-micro"), cfg)
    assert (model.logit_scale.item(), model.logit_bias.item()) == pytest.approx((1.5, -3.0))


def test_open_clip_model_by_name():
    model, *_ = create_model(ModelConfig(name="RN50"), LossConfig())
    assert type(model.visual).__name__ == "ModifiedResNet" and model.logit_scale.shape == (1,)


def test_options_lock_checkpointing_patch_dropout():
    cfg = ModelConfig(name="vlp-micro", lock_image=True, grad_checkpointing=True, patch_dropout=0.25)
    model, *_ = create_model(cfg, LossConfig())
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert model.token_embedding.weight.requires_grad
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    assert model.visual.patch_dropout.prob == 0.25
    model, *_ = create_model(ModelConfig(name="vlp-micro", lock_text=True), LossConfig())
    assert (
        not model.token_embedding.weight.requires_grad
        and not model.transformer.resblocks[0].mlp.c_fc.weight.requires_grad
    )
    assert all(p.requires_grad for p in model.visual.parameters())


def test_encode_is_normalised():
    model, *_ = create_model(ModelConfig(name="vlp-micro"), LossConfig())
    img, txt = encode(model.eval(), *inputs(model))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name,kind", [("vlp-micro", "softmax"), ("vlp-tiny-sigmoid", "sigmoid")])
def test_export_loads_in_stock_open_clip(tmp_path, suffix, name, kind):
    torch.manual_seed(1)
    model, *_ = create_model(ModelConfig(name=name), LossConfig(kind=kind))
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # a trained value, not the init
    state = to_open_clip_state_dict(model)
    assert state["logit_scale"].shape == () and (kind == "softmax" or state["logit_bias"].shape == ())
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        write_weights(model.state_dict(), path, name)
    else:
        torch.save(state, path)
    stock, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(path))
    assert stock.logit_scale.shape == () and stock.logit_scale.item() == pytest.approx(2.5)
    batch = inputs(model)
    for ours, theirs in zip(encode(model.eval(), *batch), encode(stock.eval(), *batch), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # and back: our factory loads it as local pretrained weights, reshaping to (1,)
    again, *_ = create_model(ModelConfig(name=name, pretrained=str(path)), LossConfig(kind=kind))
    assert again.logit_scale.shape == (1,) and again.logit_scale.item() == pytest.approx(2.5)
    for ours, theirs in zip(encode(model, *batch), encode(again.eval(), *batch), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_pretrained_must_be_a_local_weights_file(tmp_path):
    with pytest.raises(UserError, match="model.pretrained"):
        create_model(ModelConfig(name="vlp-micro", pretrained="openai"), LossConfig())
    bad = tmp_path / "weights.pkl"
    bad.write_bytes(b"not weights")
    with pytest.raises(UserError, match="model.pretrained"):
        create_model(ModelConfig(name="vlp-micro", pretrained=str(bad)), LossConfig())
    with pytest.raises(UserError, match="model.name"):
        create_model(ModelConfig(name="no-such-model"), LossConfig())


class Payload:
    """Stands in for an object a malicious checkpoint would make torch.load construct."""


def test_pickled_objects_are_refused(tmp_path):
    """torch.load runs with weights_only=True: a checkpoint carrying arbitrary objects is rejected."""

    model, *_ = create_model(ModelConfig(name="vlp-micro"), LossConfig())
    state = to_open_clip_state_dict(model)
    state["extra"] = Payload()  # any non-tensor global
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"(?i)model.pretrained.*could not be loaded into model 'vlp-micro' \(UnpicklingError: weights only"):
        create_model(ModelConfig(name="vlp-micro", pretrained=str(path)), LossConfig())


# ------------------------------------------------------------------ a user's model JSON and tokenizer


def local_hf_tokenizer(folder) -> str:
    """A small word-level Hugging Face tokenizer saved to `folder` (made here: nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "a", "red", "blue", "circle", "square", "two", "picture", "number"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(folder))
    return str(folder)


def test_config_file_names_and_shapes_the_model(tmp_path):
    spec = dict(open_clip.get_model_config("vlp-micro"), embed_dim=24)
    (tmp_path / "my-micro.json").write_text(json.dumps(spec))
    cfg = ModelConfig(config_file=str(tmp_path / "my-micro.json"))
    assert cfg.name == "my-micro"
    model, _, _, _ = create_model(cfg)
    images, texts = inputs(model)
    img, txt = encode(model, images, texts)
    assert img.shape == txt.shape == (3, 24)
    assert open_clip.get_model_config("my-micro")["embed_dim"] == 24  # registered for export and eval


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"), ("{not json", "not a JSON model config"), ('{"embed_dim": 8}', "needs vision_cfg, text_cfg"),
])
def test_config_file_errors_are_one_line(tmp_path, content, needle):
    path = tmp_path / "mine.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=needle) as err:
        check_model(ModelConfig(config_file=str(path)))
    assert "\n" not in str(err.value) and "model.config_file" in str(err.value)
    with pytest.raises(ValueError, match="set model.name=mine or drop it"):
        ModelConfig(name="vlp-micro", config_file=str(path))


def test_local_hf_tokenizer_replaces_open_clips(tmp_path):
    from transformers import AutoTokenizer

    folder = local_hf_tokenizer(tmp_path / "tok")
    tokenizer = make_tokenizer(ModelConfig(name="vlp-micro", tokenizer=folder))
    ids = tokenizer(["two red circle", "a blue square"])
    context = open_clip.get_model_config("vlp-micro")["text_cfg"]["context_length"]
    expected = AutoTokenizer.from_pretrained(folder)(["two red circle", "a blue square"], max_length=context,
                                                     padding="max_length", truncation=True, return_tensors="pt")
    assert ids.shape == (2, context) and torch.equal(ids, expected.input_ids)
    assert ids[0, :3].tolist() == [9, 5, 7]  # the folder's own vocabulary, not open_clip's BPE
    with pytest.raises(UserError, match="not a Hugging Face tokenizer folder"):
        make_tokenizer(ModelConfig(name="vlp-micro", tokenizer=str(tmp_path)))


def test_hub_tokenizer_offline_is_one_line_naming_model_tokenizer(tmp_path):
    """ViT-B-16-SigLIP's tokenizer lives on the Hugging Face Hub: offline, vlp train stops in one line."""
    shards = tiny_shards(tmp_path / "data", n=8)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "vlp", "train", f"data.sources=[{{shards: '{shards}'}}]",
                           "model.name=ViT-B-16-SigLIP", f"train.output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "timm/ViT-B-16-SigLIP" in err and "model.tokenizer=DIR" in err, err
    assert not (tmp_path / "run").exists()  # stopped before anything was made
