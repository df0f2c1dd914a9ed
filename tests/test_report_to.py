"""`train.report_to`: tensorboard and wandb get the numbers metrics.jsonl gets; a missing backend fails first.

Real runs of `vlp train` (vlp-micro, one CPU process) in subprocesses. wandb runs in
offline mode with every folder it uses under tmp_path, and its server address is a
loopback socket that must see no connection: nothing leaves the machine. The files
are read back with the backends' own readers: tensorboard's EventAccumulator, and
wandb's protobuf schema for the records of the offline run's .wandb file.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from shard_helpers import tiny_shards

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("report"))


@pytest.fixture
def no_server():
    """A listening loopback socket to stand for the wandb server; the test asserts nobody connected."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def _assert_untouched(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):  # no connection waiting to be accepted
        server.accept()[0].close()


def _env(tmp_path: Path, server: socket.socket | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "RANK"}
    home = tmp_path / "wandb-home"
    env.update(OMP_NUM_THREADS="1", VLP_CACHE_DIR=str(tmp_path / "cache"), WANDB_MODE="offline",
               WANDB_SILENT="true", WANDB_ERROR_REPORTING="false",
               WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
               WANDB_DATA_DIR=str(home / "data"))
    if server is not None:
        env["WANDB_BASE_URL"] = f"http://127.0.0.1:{server.getsockname()[1]}"
    env.update(extra)
    return env


def _vlp(args: list[str], env: dict, prelude: str = "") -> subprocess.CompletedProcess:
    """`python -m vlp ARGS`, after `prelude` runs in the same interpreter."""
    code = f"import sys\n{prelude}\nfrom vlp.app.cli import main\nsys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "model.name=vlp-micro", f"data.sources=[{{shards: '{shards}'}}]", "data.workers=0",
            "train.batch_size=8", f"train.steps={STEPS}", "train.checkpoint_every=100", f"train.output_dir={out}",
            *extra]


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file as wandb's own protobuf messages.

    The file is a 7-byte header (':W&B', magic, version) and then LevelDB's log
    framing: 32 KiB blocks of chunks, each with a 7-byte header (crc32 of type and
    data, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero fill
            continue
        assert crc == zlib.crc32(bytes([kind]) + chunk), f"{path}: corrupt chunk at byte {pos}"
        pending += chunk
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def _wandb_run(out: Path) -> dict:
    """The one offline run under out/wandb (out: the run folder or WANDB_DIR): its run record, history rows by step, and exit code."""
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, files
    run, history, exit_code = None, {}, None
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = row
        elif kind == "exit":
            exit_code = record.exit.exit_code
    assert run is not None
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    return {"run": run, "config": config, "history": history, "exit_code": exit_code}


def _tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> (step, value) of every scalar event TensorBoard would show, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_and_wandb_offline_get_the_metrics_jsonl_values(shards, tmp_path, no_server):
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: tiny\ntasks:\n  - name: shape\n    type: zeroshot_classification\n"
                     "    dataset: {format: synthetic, attribute: shape, n: 4}\n    templates: ['a {c}.']\n")
    out = tmp_path / "run"
    proc = _vlp(_train_args(shards, out, "train.report_to=tensorboard,wandb", "train.eval_every=2",
                            f"train.eval_suite={suite}", "train.wandb_project=vlp-test"),
                _env(tmp_path, no_server, WANDB_DIR=str(tmp_path / "wandb-dir")))  # honoured, as wandb's users expect
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = _lines(out / "metrics.jsonl")
    evals = _lines(out / "eval.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and [e["step"] for e in evals] == [2]
    scalars = ["loss", "lr", "epoch", "samples", "samples_per_s", "skipped_samples", "peak_memory_mb"]

    # wandb: the run record, every step's scalars at its global step, the eval at its step, a clean exit
    wb = _wandb_run(tmp_path / "wandb-dir")
    assert wb["run"].project == "vlp-test" and wb["run"].display_name == "run"  # the output folder's name
    assert wb["config"]["train"]["report_to"] == ["tensorboard", "wandb"]  # the resolved run config
    assert wb["config"]["model"]["name"] == "vlp-micro"
    assert sorted(wb["history"]) == [1, 2, 3]
    for m in metrics:
        row = wb["history"][m["step"]]
        assert {key: row[f"train/{key}"] for key in scalars} == {key: m[key] for key in scalars}
        assert "train/keys_sha1" not in row and "train/step" not in row  # strings and the axis stay out
    assert wb["history"][3]["train/loss"] == metrics[-1]["loss"]
    assert wb["history"][2]["eval/shape/acc1"] == evals[0]["eval/shape/acc1"]
    assert wb["exit_code"] == 0
    _assert_untouched(no_server)
    assert not (tmp_path / "wandb-home").exists() or not any((tmp_path / "wandb-home").rglob("offline-run-*"))

    # tensorboard: the same numbers (stored as float32)
    tb = _tensorboard_scalars(out)
    for key in scalars:
        assert tb[f"train/{key}"] == [(m["step"], float(np.float32(m[key]))) for m in metrics], key
    assert tb["eval/shape/acc1"] == [(2, float(np.float32(evals[0]["eval/shape/acc1"])))]


def test_a_stopped_run_finishes_its_wandb_run_and_a_resume_continues_it(shards, tmp_path, no_server):
    """A requeued job resumes the same wandb run (its id kept in the run folder), not a new one per start."""
    out, stop = tmp_path / "run", tmp_path / "stop"
    stop.touch()  # asks for a clean stop after the first step, as SLURM's warning does via the launch scripts
    env = _env(tmp_path, no_server, VLP_STOP_FILE=str(stop))
    proc = _vlp(_train_args(shards, out, "train.report_to=[wandb]", "train.run_name=first"), env)
    assert proc.returncode == 0 and "stopped by stop file" in proc.stderr, proc.stderr[-4000:]
    first = _wandb_run(out)
    assert sorted(first["history"]) == [1] and first["exit_code"] == 0 and first["run"].display_name == "first"
    loss_1 = _lines(out / "metrics.jsonl")[0]["loss"]
    assert first["history"][1]["train/loss"] == loss_1
    assert not (out / "tensorboard").exists()  # only the backends asked for

    stop.unlink()
    first_dir = next((out / "wandb").glob("offline-run-*"))
    proc = _vlp(_train_args(shards, out, "train.report_to=[wandb]", "train.resume=auto"), env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (second_dir,) = set((out / "wandb").glob("offline-run-*")) - {first_dir}  # offline: a folder per start ...
    first_dir.rename(tmp_path / first_dir.name)
    second = _wandb_run(out)
    assert second["run"].run_id == first["run"].run_id == (out / "wandb_run_id").read_text()  # ... of one run
    assert sorted(second["history"]) == [2, 3] and second["exit_code"] == 0
    metrics = _lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [second["history"][s]["train/loss"] for s in (2, 3)] == [m["loss"] for m in metrics[1:]]
    _assert_untouched(no_server)


@pytest.mark.parametrize("backend", ["wandb", "tensorboard"])
def test_a_missing_backend_is_one_line_before_training(shards, tmp_path, backend):
    """Not installed, as Python sees it: a None in sys.modules makes `import X` raise ModuleNotFoundError."""
    out = tmp_path / "run"
    proc = _vlp(_train_args(shards, out, f"train.report_to={backend}"), _env(tmp_path),
                prelude=f"sys.modules[{backend!r}] = None")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines() == [
        f"vlp: error: train.report_to lists {backend}, which is not installed: pip install 'vlp[{backend}]' "
        "(or remove it from train.report_to)"]
    assert not out.exists()  # nothing made: no checkpoint, no metrics.jsonl


def test_an_unknown_backend_is_a_one_line_config_error(tmp_path):
    proc = _vlp(["train", "train.report_to=tensorboard,mlflow", f"train.output_dir={tmp_path / 'run'}"],
                _env(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vlp: error: config key 'train.report_to.1': Input should be 'tensorboard' or 'wandb' (got 'mlflow')"]


def test_wandb_online_without_a_login_is_one_line_and_never_connects(tmp_path, no_server):
    out = tmp_path / "run"
    out.mkdir()
    code = ("from pathlib import Path\nfrom vlp.core.config import RunConfig\nfrom vlp.train.trainer import _Metrics\n"
            "cfg = RunConfig.model_validate({'train': {'report_to': ['wandb']}})\n"
            f"_Metrics(cfg, Path({str(out)!r}), enabled=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=_env(tmp_path, no_server, WANDB_MODE="online"), stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlp.core.errors.UserError: train.report_to: wandb could not start a run ("), last
    assert last.endswith("run `wandb login`, or set WANDB_MODE=offline")
    _assert_untouched(no_server)


def test_a_resumed_run_replaces_the_tensorboard_steps_past_its_checkpoint(tmp_path):
    """After kill -9, steps past the checkpoint are redone: tensorboard shows the redone values only."""
    from vlp.core.config import RunConfig
    from vlp.train.trainer import _Metrics

    cfg = RunConfig.model_validate({"train": {"report_to": ["tensorboard"]}})
    killed = _Metrics(cfg, tmp_path, enabled=True)
    for step in (1, 2, 3):
        killed.log({"step": step, "loss": 10.0 + step})
    killed.close()  # (a killed run's writer stops wherever it was; its events are on disk)
    resumed = _Metrics(cfg, tmp_path, enabled=True, resumed_step=1)
    for step in (2, 3):
        resumed.log({"step": step, "loss": 20.0 + step})
    resumed.close()
    assert _tensorboard_scalars(tmp_path)["train/loss"] == [(1, 11.0), (2, 22.0), (3, 23.0)]
    assert [m["loss"] for m in _lines(tmp_path / "metrics.jsonl")] == [11.0, 22.0, 23.0]
