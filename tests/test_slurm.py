"""vlp on a real SLURM cluster: two slurmd "hosts" in network namespaces (tests/slurm_cluster.py).

The shipped launch/slurm.sbatch is submitted as a user would, with a short time
limit: SLURM's warning signal -> the run checkpoints and exits 0 -> the script
requeues the job -> the requeued job resumes, and its per-step sample keys and
losses equal those of an uninterrupted run with the same world size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from shard_helpers import tiny_shards

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
STEPS = 100  # SLURM's warning comes 10-40 s in; three jobs' start-up alone takes ~30 s on 2 CPUs
# one xdist worker runs all of group "slurm": the tests share one slurm setup
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        if os.environ.get("VLP_CI") == "1":  # CI installs SLURM: there, a missing piece is a failure
            pytest.fail(f"the SLURM tests must run in CI: {why}")
        pytest.skip(why)
    running = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield running
    slurm_cluster.stop(running)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("slurm-data"))


def _run_args(shards: Path, out: Path) -> list[str]:
    return ["model.name=vlp-micro", f"data.sources=[{{shards: '{shards}'}}]", "data.workers=0",
            "train.batch_size=8", f"train.steps={STEPS}", "train.checkpoint_every=100000", "train.zero_stage=2",
            f"train.output_dir={out}"]


def _steps(out: Path) -> list[tuple[int, float, str]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"], r["keys_sha1"]) for r in records if "loss" in r]


def _wait_job(cluster, job: str, until, timeout: float) -> dict[str, str]:
    end = time.monotonic() + timeout
    while True:
        state = cluster.job_state(job)
        if until(state):
            return state
        assert time.monotonic() < end, f"job {job} stuck: {state.get('JobState')} {state.get('Reason')}"
        time.sleep(0.5)


def test_time_limit_requeues_and_resumes_exactly_in_both_styles(cluster, shards, tmp_path):
    env = {**cluster.env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "GLOO_SOCKET_IFNAME": "eth0"}
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)

    def submit(*options: str, out: str) -> str:
        done = subprocess.run(["sbatch", "--parsable", *options, str(REPO / "launch" / "slurm.sbatch"),
                               *_run_args(shards, tmp_path / out)],
                              cwd=work, env=env, capture_output=True, text=True, check=True)
        return done.stdout.strip().split(";")[0]

    # A 3-minute limit with the warning 170 s before its end: slurmctld checks limits about
    # every 30 s, so the signal comes 10-40 s in, during startup or early training, and the
    # run has minutes to reach its next step and save (three jobs share 2 CPUs here).
    # Both styles: one torchrun per node, and one srun task per rank (open_clip's).
    limited = ["--time=3", "--signal=B:USR1@170"]
    jobs = {"torchrun": submit(*limited, out="run-torchrun"),
            "srun": submit(*limited, "--export=ALL,VLP_RANKS_FROM=srun", out="run-srun")}
    # The reference: the same script on the same two hosts, with no limit near.
    reference = submit(out="reference")

    for job in jobs.values():  # the first attempt ends at its limit by requeueing itself; let the second finish
        _wait_job(cluster, job, lambda s: int(s.get("Restarts", 0)) >= 1, timeout=300)
        cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    ref_state = _wait_job(cluster, reference, lambda s: s.get("JobState") in done, timeout=400)
    assert ref_state["JobState"] == "COMPLETED", (work / "logs" / f"vlp-{reference}.out").read_text()[-3000:]
    want = _steps(tmp_path / "reference")

    for style, job in jobs.items():
        final = _wait_job(cluster, job, lambda s: s.get("JobState") in done, timeout=400)
        log = (work / "logs" / f"vlp-{job}.out").read_text()
        assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) == 1, log[-3000:]
        assert f"ranks from {style}" in log and "signal: time limit near" in log and "requeueing job" in log
        assert f"job {job} restart 1:" in log and "nodes node[1-2]" in log, log[-3000:]
        stopped_at = int(log.split("at step ")[1].split(";")[0])
        assert "stopped by stop file" in log and f"(step {stopped_at})" in log, log[-3000:]
        assert log.count("vlp train: world size 2 on ") == 2, log[-3000:]  # both attempts: every rank joined
        lines = [line.split("\r")[-1] for line in log.splitlines()]  # the progress bar's redraws end in \r
        print(f"--- {style} job {job}:\n" + "\n".join(line for line in lines if line.startswith(
            ("vlp:", "vlp train:", "stopped by", "resumed from"))))  # for the record (pytest -s)
        assert 0 < stopped_at < STEPS

        got = _steps(tmp_path / f"run-{style}")
        assert [s for s, _, _ in got] == list(range(1, STEPS + 1)), style
        assert [k for _, _, k in got] == [k for _, _, k in want], style  # the same samples at every step
        assert [loss for _, loss, _ in got] == [loss for _, loss, _ in want], style  # bit for bit


def test_hostnames_come_from_slurms_own_expansion(cluster, monkeypatch):
    from vlp.core.hosts import slurm_hostnames

    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    assert slurm_hostnames("rack1-[1-2]n[01-02],gpu[003-004,9]") == [
        "rack1-1n01", "rack1-1n02", "rack1-2n01", "rack1-2n02", "gpu003", "gpu004", "gpu9"]
    assert slurm_hostnames("node7") == ["node7"]
