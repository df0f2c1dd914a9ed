"""Coming from open_clip_train: its flags map to vlp keys (printed), or fail in one line naming the key to use."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from vlp.app.cli import main
from vlp.app.openclip_flags import FLAGS, mapping_table


def test_open_clip_train_flags_set_vlp_keys_and_say_which(capsys):
    assert main(["train", "--train-data", "/data/{00000..00009}.tar", "--lr", "5e-4", "--epochs=3", "--siglip",
                 "--precision", "amp_bf16", "--resume", "latest", "model.name=vlp-micro", "--print-config"]) == 0
    out, err = capsys.readouterr()
    cfg = yaml.safe_load(out)
    assert cfg["data"]["sources"][0]["shards"] == "/data/{00000..00009}.tar" and cfg["optim"]["lr"] == 5e-4
    assert cfg["train"]["epochs"] == 3 and cfg["loss"]["kind"] == "sigmoid" and cfg["train"]["precision"] == "bf16"
    assert cfg["train"]["resume"] == "auto" and cfg["model"]["name"] == "vlp-micro"
    assert "vlp: --lr is open_clip_train's flag: optim.lr=5e-4" in err.splitlines()


def test_a_flag_without_a_counterpart_is_one_line_naming_what_to_use(capsys):
    assert main(["train", "--val-data", "/val/{0..3}.tar"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--val-data" in err and "train.eval_suite" in err


def test_a_list_item_is_set_by_its_index(capsys):
    assert main(["train", "data.sources.0.shards=/mine", "data.sources.0.weight=2", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["sources"] == [{"shards": "/mine", "weight": 2.0, "manifest": None}]
    assert main(["train", "data.sources.1.shards=/x"]) == 2
    assert "no item 1 in a list of 1" in capsys.readouterr().err


def test_the_mapping_table_lists_every_flag():
    table = mapping_table()
    assert all(f"`{f.flag}`" in table for f in FLAGS) and len(FLAGS) >= 40


def test_train_epochs_is_the_plan_s_epochs(tmp_path):
    from shard_helpers import tiny_shards

    shards = tiny_shards(tmp_path, n=40)  # 40 samples, batch 8: 5 steps per epoch
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vlp", "train", "model.name=vlp-micro", "data.workers=0",
                           f"data.sources=[{{shards: '{shards}'}}]", "train.batch_size=8", "--epochs", "2",
                           f"train.output_dir={out}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and [m["epoch"] for m in lines] == [0] * 5 + [1] * 5


def test_slurm_and_environment_keys_reach_the_launch_lines(capsys):
    """The SLURM submission had no partition, time, account, cpus-per-task or environment line to set."""
    assert main(["launch", "--config", "configs/vit-b-16-gpu.yaml", "launch.launcher=slurm", "launch.partition=gpu",
                 "launch.account=proj", "launch.time=02:00:00", "launch.cpus_per_task=32",
                 "launch.env_setup=source /opt/venv/bin/activate", "--dry-run"]) == 0
    sbatch = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sbatch"))
    for flag in ("--partition=gpu", "--account=proj", "--time=02:00:00", "--cpus-per-task=32",
                 "'--export=ALL,VLP_ENV_SETUP=source /opt/venv/bin/activate'"):
        assert flag in sbatch, sbatch
    assert main(["launch", "--config", "demo", "launch.env_setup=module load cuda", "--dry-run"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert lines and all(x.startswith("module load cuda && torchrun ") for x in lines)


def test_a_run_writes_out_log_as_plain_lines(tmp_path):
    from shard_helpers import tiny_shards

    shards = tiny_shards(tmp_path, n=16)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vlp", "train", "model.name=vlp-micro", "data.workers=0",
                           f"data.sources=[{{shards: '{shards}'}}]", "train.batch_size=8", "train.steps=3",
                           f"train.output_dir={out}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (out / "out.log").read_text()
    assert "\r" not in log and "\r" not in done.stderr  # no progress bar in a log that is not a terminal
    lines = log.splitlines()
    assert "vlp train: starting" in lines[0] and lines[-1].endswith("vlp train: done")
    assert sum(" step " in x and " loss " in x for x in lines) == 3
