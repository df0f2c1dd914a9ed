"""Run config: YAML + dotted overrides, validated up front with one-line errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlp.config import ConfigError, RunConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_yaml_then_overrides_in_that_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  warmup_steps: 7\nloss:\n  kind: sigmoid\n")
    cfg = load_config(path, ["optim.lr=1e-3", "train.batch_size=64", "train.micro_batch_size=16",
                             "data.sources=[{shards: a/, weight: 2}, {shards: 'b/{0..3}.tar'}]"])
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML's '1e-3' string is coerced to a float
    assert cfg.optim.warmup_steps == 7  # kept from the file
    assert cfg.loss.kind == "sigmoid"
    assert (cfg.train.batch_size, cfg.train.micro_batch_size) == (64, 16)
    assert [(s.shards, s.weight) for s in cfg.data.sources] == [("a/", 2.0), ("b/{0..3}.tar", 1.0)]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (allowed: beta1, beta2, eps, grad_clip, lr,"),
        ("nosuch.key=1", "unknown config key 'nosuch' (allowed: data, demo, launch, loss, model, optim, train)"),
        ("optim.lr=-1", "config key 'optim.lr': Input should be greater than 0 (got -1)"),
        ("optim.lr=fast", "config key 'optim.lr': Input should be a valid number"),
        ("loss.kind=cosine", "config key 'loss.kind': Input should be 'softmax' or 'sigmoid' (got 'cosine')"),
        ("train.zero_stage=4", "config key 'train.zero_stage': Input should be 0, 1, 2 or 3"),
        ("train.micro_batch_size=48", "micro_batch_size (48) must divide batch_size (128)"),
        ("data.sources=[{shards: x, weight: 0}]", "config key 'data.sources.0.weight': Input should be greater than 0"),
        ("optim", "expected section.key=value"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ ships at least the embedded default"
    for path in configs:
        load_config(path)


def test_cli_rejects_bad_config_before_any_work():
    """`vlp train` with a bad key exits 2 with one line on stderr; no heavy import happens first."""
    code = "import sys; from vlp.cli import main; rc = main(['train', 'optim.lr=-1']); " \
           "print('torch' in sys.modules); sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vlp: error: config key 'optim.lr': Input should be greater than 0 (got -1)"
    assert proc.stdout.strip() == "False"
