"""Coming from open_clip_train: its flags map to vlp keys (printed), or fail in one line naming the key to use."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from vlp.app.cli import main
from vlp.app.foreign_flags import FLAGS, mapping_table


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


def test_img2dataset_habits_a_folder_of_tables_stats_fields_and_a_build_that_writes_nothing(tmp_path, capsys):
    """A folder of parquet files was read as an image folder (two rows, both missing_caption, exit 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from shard_helpers import noise_image, save

    for i in range(4):
        save(noise_image(24, 24, seed=i), tmp_path / "img" / f"{i}.png")
    lists = tmp_path / "url_list"
    lists.mkdir()
    for part in range(2):
        rows = [{"url": str(tmp_path / "img" / f"{2 * part + j}.png"), "caption": f"picture {2 * part + j}"}
                for j in range(2)]
        pq.write_table(pa.Table.from_pylist(rows), lists / f"part-{part}.parquet")
    out = tmp_path / "shards"
    assert main(["shards", "build", str(lists), "--output", str(out), "--image-size", "24", "--quiet"]) == 0
    assert "rows=4 written=4" in capsys.readouterr().out
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["successes"] == 4 and stats["failed_to_download"] == 0 and stats["failed_to_resize"] == 0
    assert stats["config"]["image"]["image_size"] == 24
    # every row failing is a failed command, with one line saying so
    bad = tmp_path / "bad.csv"
    bad.write_text("url,caption\nnowhere/1.png,a\nnowhere/2.png,b\n")
    assert main(["shards", "build", str(bad), "--output", str(tmp_path / "none"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlp: error: no row was written: all 2") and len(err.splitlines()) == 1
    stats = json.loads((tmp_path / "none" / "00000_stats.json").read_text())
    assert stats["failed_to_download"] == 2 and stats["failed_to_resize"] == 0


def test_img2dataset_flags_build_as_vlp_flags(tmp_path, capsys):
    from shard_helpers import noise_image, save, write_csv

    save(noise_image(24, 24), tmp_path / "img" / "0.png")
    pairs = write_csv(tmp_path / "p.csv", [{"link": "img/0.png", "text": "a picture", "lic": "cc"}])
    assert main(["shards", "build", "--url_list", str(pairs), "--output_folder", str(tmp_path / "out"),
                 "--input_format", "csv"]) == 2  # vlp reads the format from the suffix: said in one line
    assert "--input_format" in capsys.readouterr().err
    assert main(["shards", "build", "--url_list", str(pairs), "--output_folder", str(tmp_path / "out"),
                 "--url_col", "link", "--caption_col", "text", "--save_additional_columns", "['lic']",
                 "--image_size", "16", "--output_format", "webdataset", "--processes_count", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "rows=1 written=1" in out and "vlp: --image_size is img2dataset's flag: image_size=16" in err
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert stats["config"]["image"]["image_size"] == 16 and stats["config"]["keep_cols"] == ["lic"]
