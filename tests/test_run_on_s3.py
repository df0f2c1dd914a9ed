"""`train.output_dir` on object storage (moto's S3 server on loopback): checkpoints and logs go up at each
checkpoint (a checkpoint's mark last), keep_last prunes the bucket too, a fresh run into a URL that holds a run
is refused, and a run resumed from the URL alone (a new machine: an empty local mirror) continues exactly as the
same run resumed from a local folder does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from s3_server import S3Server
from shard_helpers import tiny_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.client().create_bucket(Bucket="runs")
    yield server
    server.stop()


def _train(shards: Path, out: str, cache: Path, env: dict, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlp", "train", f"data.sources=[{{shards: '{shards}'}}]", "data.workers=0",
           "model.name=vlp-micro", "train.batch_size=8", f"train.steps={steps}", "train.log_every=1",
           "train.checkpoint_every=2", "train.keep_last=2", "optim.warmup_steps=1", "train.log_keys=true",
           f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env, "VLP_CACHE_DIR": str(cache)})


def _metrics(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_run_on_s3_uploads_its_checkpoints_and_resumes_from_them(s3, tmp_path):
    shards = tiny_shards(tmp_path / "data", n=32)
    client = s3.client()
    local = tmp_path / "local"  # the same two commands into a local folder: what the bucket must hold
    for steps, extra in ((4, ()), (6, ("train.resume=auto",))):
        done = _train(shards, str(local), tmp_path / "cache0", s3.env(), steps, *extra)
        assert done.returncode == 0, done.stderr[-3000:]

    first = _train(shards, "s3://runs/a", tmp_path / "cache1", s3.env(), 4)
    assert first.returncode == 0, first.stderr[-3000:]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="runs", Prefix="a/")["Contents"]}
    steps = sorted({k.split("/")[2] for k in keys if k.startswith("a/checkpoints/")})
    assert steps == ["step_00000002", "step_00000004"]  # keep_last=2 of 2 and 4
    assert {"a/metrics.jsonl", "a/config.yaml", "a/out.log", "a/.vlp-owner.json"} <= keys
    assert "output_dir: s3://runs/a" in client.get_object(Bucket="runs", Key="a/config.yaml")["Body"].read().decode()

    again = _train(shards, "s3://runs/a", tmp_path / "cache1", s3.env(), 4)  # a fresh run into it: refused
    assert again.returncode != 0 and "holds a training run" in again.stderr.strip().splitlines()[-1]

    # another machine: nothing local, the run continues from the bucket's step-4 checkpoint to step 6
    resumed = _train(shards, "s3://runs/a", tmp_path / "cache2", s3.env(), 6, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _metrics(client.get_object(Bucket="runs", Key="a/metrics.jsonl")["Body"].read().decode())
    want = _metrics((local / "metrics.jsonl").read_text())
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want, strict=True):
        assert g["keys"] == w["keys"] and g["loss"] == pytest.approx(w["loss"], rel=1e-6)
    steps = sorted({o["Key"].split("/")[2] for o in client.list_objects_v2(Bucket="runs", Prefix="a/checkpoints/")[
        "Contents"]})
    assert steps == ["step_00000004", "step_00000006"]
    shutil.rmtree(tmp_path / "cache2")


def test_a_prefix_vlp_did_not_make_is_refused(s3, tmp_path):
    s3.client().put_object(Bucket="runs", Key="theirs/notes.txt", Body=b"a user's file")
    shards = tiny_shards(tmp_path / "data", n=16)
    done = _train(shards, "s3://runs/theirs", tmp_path / "cache", s3.env(), 2)
    assert done.returncode != 0 and "was not made by vlp" in done.stderr.strip().splitlines()[-1]
