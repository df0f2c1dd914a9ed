"""Checkpoints under attack and under faults: crafted pickles, torn files, a full disk, hostile metadata.

Real training runs (vlp-micro, one CPU process, DeepSpeed ZeRO-2 so that an
optimizer file exists) in subprocesses, real files, a real tmpfs to fill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from shard_helpers import tiny_shards

from vlp.core.weights import META_NAME, STATE_FILE, read_metadata

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class Payload:
    """A pickle that runs a command when unpickled: what a crafted checkpoint file holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _vlp(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "vlp", *args], capture_output=True, text=True, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("trust"))


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "model.name=vlp-micro", f"data.sources=[{{shards: '{shards}'}}]", "data.workers=0",
            "train.batch_size=8", "train.checkpoint_every=1", "train.keep_last=3", "train.zero_stage=2",
            f"train.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("run") / "run"
    _vlp(*_train_args(shards, out, "train.steps=2"))
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    (dest / ".vlp-lock").unlink(missing_ok=True)
    return dest


def _reseal(checkpoint: Path) -> None:
    """What an attacker who can write files can also do: make the completion mark match the new file."""
    from vlp.train.checkpoint import _file_record

    mark = json.loads((checkpoint / STATE_FILE).read_text())
    mark["files"] = {name: _file_record(checkpoint / name) for name in mark["files"]}
    (checkpoint / STATE_FILE).write_text(json.dumps(mark))


def test_the_completion_mark_lists_every_file_with_size_and_hash(run):
    newest = run / "checkpoints" / "step_00000002"
    mark = json.loads((newest / STATE_FILE).read_text())
    assert mark["step"] == 2
    on_disk = {p.name for p in newest.iterdir()} - {STATE_FILE}
    assert set(mark["files"]) == on_disk and {"rng_rank0.pt", "model.safetensors"} <= on_disk
    assert any(name.endswith("optim_states.pt") for name in on_disk)
    assert all(f["size"] == (newest / n).stat().st_size and len(f["sha256"]) == 64 for n, f in mark["files"].items())


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_rank0.pt"])
def test_a_crafted_pickle_in_any_checkpoint_file_never_runs(run, shards, tmp_path, victim):
    out = _copy(run, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), newest / victim)
    _reseal(newest)
    proc = _vlp(*_train_args(shards, out, "train.steps=3", "train.resume=auto"), check=False)
    assert not marker.exists(), "the payload ran"
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlp: error: ") and victim in last and "refused to load" in last


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(run, shards, tmp_path):
    out = _copy(run, tmp_path / "run")
    newest = out / "checkpoints" / "step_00000002"
    model_file = newest / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])  # power loss mid-write
    proc = _vlp(*_train_args(shards, out, "train.steps=3", "train.resume=auto"))
    assert f"skipping checkpoint {newest}: mp_rank_00_model_states.pt has" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000001 (step 1)" in proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # steps 2-3 redone after step 1, one consistent history


def test_when_every_checkpoint_is_torn_resume_auto_stops_instead_of_starting_over(run, shards, tmp_path):
    """It printed skip lines, restarted from step 0 and overwrote the old checkpoint folders."""
    out = _copy(run, tmp_path / "run")
    for step in ("step_00000001", "step_00000002"):
        model_file = out / "checkpoints" / step / "mp_rank_00_model_states.pt"
        model_file.write_bytes(model_file.read_bytes()[:100])
    before = {p: p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()}
    proc = _vlp(*_train_args(shards, out, "train.steps=3", "train.resume=auto"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "none of the 2 checkpoints" in last and "verifies" in last
    assert {p: p.read_bytes() for p in sorted((out / "checkpoints").rglob("*")) if p.is_file()} == before


def test_a_full_disk_is_one_line_and_older_checkpoints_stay(shards, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], check=True)
    try:
        out = mount / "run"
        proc = _vlp(*_train_args(shards, out, "train.steps=4", "train.zero_stage=0"), check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "no space left on the device" in last and "older checkpoints are intact" in last
        kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
        assert kept == ["step_00000001"]
        assert not any((out / "checkpoints" / ".staging").glob("step_*"))
        from vlp.train.checkpoint import verify_checkpoint

        assert verify_checkpoint(out / "checkpoints" / "step_00000001") is None
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("name", ["/tmp/evil/x", "../../x", "a/b"])
def test_a_model_name_from_metadata_is_never_a_path(run, tmp_path, name, capsys):
    from vlp.app.cli import main

    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    meta = read_metadata(weights)
    hostile = tmp_path / "hostile.safetensors"
    save_file(load_file(str(weights)), str(hostile), metadata={**meta, META_NAME: name})
    for args in (["export", str(hostile), "--out", str(tmp_path / "x" / "m.safetensors")],
                 ["eval", "--model", str(hostile), "--out", str(tmp_path / "report"), "--quiet"]):
        code = main(args)  # in this process: the check comes before any work, as the command's
        err = capsys.readouterr().err
        assert code == 2 and "is not a model name" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "report").exists()
    assert not Path("/tmp/evil").exists()


# ------------------------------------------------------------------ two writers, killed parents


def test_a_second_train_into_a_running_run_stops_naming_it_and_a_killed_run_leaves_no_worker(shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "vlp", *_train_args(shards, out, "train.steps=100000", "train.checkpoint_every=100000",
                                                   "data.workers=2")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = out / ".vlp-lock"
        _wait_for(lambda: lock.is_file() and lock.read_text().startswith(f"pid {first.pid} "), first)
        second = _vlp(*_train_args(shards, out, "train.steps=1", "train.resume=auto"), check=False)
        assert second.returncode == 2
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"pid {first.pid} " in second.stderr and "another vlp process" in second.stderr
        # The running one trains on, its loader workers up; kill -9 of it (no cleanup runs) takes them along.
        _wait_for(lambda: len(psutil.Process(first.pid).children()) >= 2, first)
        workers = psutil.Process(first.pid).children()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.1)
