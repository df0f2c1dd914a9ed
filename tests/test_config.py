"""Run config: YAML + dotted overrides, validated up front with one-line errors that name the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlp.core.config import ConfigError, RunConfig, dump_config, load_config

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
    code = "import sys; from vlp.app.cli import main; rc = main(['train', 'optim.lr=-1']); " \
           "print('torch' in sys.modules); sys.exit(rc)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vlp: error: config key 'optim.lr': Input should be greater than 0 (got -1)"
    assert proc.stdout.strip() == "False"


# ------------------------------------------------------------ one schema family, every command


@pytest.mark.parametrize("name", ["train", "shards", "eval", "demo"])
def test_config_show_describes_every_key_with_type_default_and_description(name, capsys):
    from vlp.app.cli import main
    from vlp.core.config import COMMAND_SCHEMAS

    assert main(["config", "show", name, "--describe"]) == 0
    out = capsys.readouterr().out
    schema = COMMAND_SCHEMAS[name]
    for field in schema.model_fields:
        assert f"  {field}" in out or f"  {field}." in out, field
    if name == "shards":
        assert re.search(r"  image_size +int = 256\n +target side in pixels", out)
    if name == "train":
        assert "optim.lr" in out and "float = 0.001" in out


def test_config_show_prints_loadable_defaults(tmp_path, capsys):
    from vlp.app.cli import main
    from vlp.core.config import ShardsBuildConfig, load

    assert main(["config", "show", "shards"]) == 0
    path = tmp_path / "build.yaml"
    path.write_text(capsys.readouterr().out)
    assert load(ShardsBuildConfig, path) == ShardsBuildConfig()


def test_train_help_lists_the_keys(capsys):
    from vlp.app.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "train.micro_batch_size" in out and "chunk for gradient caching" in out and "examples:" in out


def test_shards_build_takes_yaml_then_overrides_then_flags(tmp_path):
    from vlp.app.cli import _config, build_parser
    from vlp.core.config import ShardsBuildConfig

    path = tmp_path / "build.yaml"
    path.write_text("inputs: [a.csv]\noutput: out\nimage_size: 128\nshard_size: 7\nkeep_cols: kind\n")
    args = build_parser().parse_args(["shards", "build", "--config", str(path), "shard_size=9", "b.csv",
                                      "--image-size", "64"])
    cfg = _config(args, ShardsBuildConfig, positional="inputs")
    assert (cfg.inputs, cfg.output, cfg.image_size, cfg.shard_size, cfg.keep_cols) == (
        ["b.csv"], "out", 64, 9, ["kind"])


def test_eval_takes_yaml_and_set_overrides(tmp_path):
    from vlp.app.cli import _config, build_parser
    from vlp.core.config import EvalConfig

    path = tmp_path / "eval.yaml"
    path.write_text("model: runs/x\nout: reports/x\nbatch_size: 32\nonly: a,b\n")
    args = build_parser().parse_args(["eval", "--config", str(path), "--set", "batch_size=8", "--quiet"])
    cfg = _config(args, EvalConfig)
    assert (cfg.model, cfg.batch_size, cfg.only, cfg.quiet) == ("runs/x", 8, ["a", "b"], True)


def test_a_run_file_may_carry_sibling_sections_which_are_still_checked(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("demo:\n  pairs: 10\nlaunch:\n  nodes: 2\ntrain:\n  steps: 3\n")
    cfg = load_config(path)
    assert cfg.train.steps == 3 and not hasattr(cfg, "demo")
    path.write_text("demo:\n  pairz: 10\n")
    with pytest.raises(ConfigError, match="unknown config key 'demo.pairz'"):
        load_config(path)


def _float_keys() -> list[tuple[str, str]]:
    from vlp.app.flags import describe
    from vlp.core.config import COMMAND_SCHEMAS

    return [(name, key) for name, schema in COMMAND_SCHEMAS.items() for key, kind, _, _ in describe(schema)
            if "float" in kind and "[]" not in key]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_of_every_command_must_be_finite(value):
    """weight_decay=inf, init_logit_scale=nan, eps=inf... once started runs that ended in NaN losses."""
    from vlp.core.config import COMMAND_SCHEMAS, load

    keys = _float_keys()
    assert len(keys) > 30 and ("train", "optim.weight_decay") in keys and ("shards", "timeout") in keys
    for name, key in keys:
        with pytest.raises(ConfigError) as caught:
            load(COMMAND_SCHEMAS[name], None, [f"{key}={value}"])
        assert key in str(caught.value) and "\n" not in str(caught.value), (name, key, caught.value)
