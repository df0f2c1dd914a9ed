"""Crash safety of the shard builder: kill -9 and rerun; a worker killed mid-build.

Rows are served by a loopback HTTP server that answers each request late, so
the build runs long enough to be killed part-way, deterministically.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from http_server import serve
from shard_helpers import (
    build,
    finished_shards,
    noise_image,
    options,
    reasons_by_url,
    save,
    tree_bytes,
    write_csv,
)
from vlp.data_tools.verify import verify_shards

pytestmark = pytest.mark.slow

ROWS, SHARD = 120, 10


@pytest.fixture
def slow_input(tmp_path):
    www = tmp_path / "www"
    for i in range(ROWS // 2):  # each image twice: dedup has to survive the resume too
        save(noise_image(48, 40, seed=i), www / f"{i}.jpg", quality=90)
    with serve(www) as (base, _):
        rows = [{"url": f"{base}/slow/0.05/{i % (ROWS // 2)}.jpg", "caption": f"image {i}"} for i in range(ROWS)]
        rows[7]["url"] = f"{base}/status/404"  # image 7 is then first written at row 67
        yield write_csv(tmp_path / "pairs.csv", rows), tmp_path


def _start(csv_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlp", "shards", "build", str(csv_path), "--output", str(out),
           "--shard-size", str(SHARD), "--image-size", "32", "--workers", "2", "--threads", "2", "--quiet", *extra]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def _reference(csv_path: Path, out: Path) -> dict[str, bytes]:
    build([csv_path], out, shard_size=SHARD, threads=32)
    return tree_bytes(out)


def test_kill_9_then_rerun_equals_an_uninterrupted_build(slow_input):
    csv_path, root = slow_input
    out = root / "out"
    proc = _start(csv_path, out)
    _wait_for(lambda: finished_shards(out) >= 3)
    os.killpg(proc.pid, signal.SIGKILL)  # the builder and its workers, no cleanup
    proc.wait()
    done_before = finished_shards(out)
    assert done_before < ROWS // SHARD and not (out / "manifest.json").exists()

    rerun = _start(csv_path, out)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr.decode()
    assert f"{done_before} resumed" in stdout.decode()
    assert "rows=120 written=60 failed=1 duplicates=59" in stdout.decode()

    expected = _reference(csv_path, root / "reference")
    got = tree_bytes(out)
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    assert verify_shards(out, progress=False).ok


def _worker_pids(parent: int) -> list[int]:
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{parent}\n" in text and b"spawn_main" in cmdline:
            pids.append(int(status.parent.name))
    return pids


def test_a_killed_worker_does_not_lose_rows(slow_input):
    csv_path, root = slow_input
    out = root / "out"
    proc = _start(csv_path, out)
    _wait_for(lambda: (out / "00000_stats.json").exists() and _worker_pids(proc.pid))
    os.kill(_worker_pids(proc.pid)[0], signal.SIGKILL)  # as the OOM killer would
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert tree_bytes(out) == _reference(csv_path, root / "reference")


def test_a_worker_dead_before_the_next_submit_loses_no_chunk():
    """The pool can break between two results; the next submit then fails at once. Its chunk is
    resubmitted with the ones in flight instead of taking the build down."""
    from vlp.data_tools.build import _Workers, row_options
    from vlp.data_tools.readers import Row

    rows = [Row(index=i, source="x.csv", line=i + 1, ref=None, base_dir=".", caption=None, error="no_image")
            for i in range(12)]
    workers = _Workers(1, row_options(options()))
    results = workers.map(iter([rows[i:i + 2] for i in range(0, 12, 2)]))
    got = [next(results)]
    os.kill(next(iter(workers.pool._processes)), signal.SIGKILL)
    _wait_for(lambda: workers.pool._broken)  # the pool knows; no chunk has been submitted since
    got += list(results)
    assert [[r.index for r in chunk] for chunk, _ in got] == [[i, i + 1] for i in range(0, 12, 2)]
    assert [[(r.index, r.reason) for r in res] for _, res in got] == [[(i, "no_image"), (i + 1, "no_image")]
                                                                      for i in range(0, 12, 2)]


def test_workers_die_with_a_killed_build(tmp_path):
    """kill -9 of the builder leaves no orphan worker fetching on (the kernel kills them with it)."""
    www = tmp_path / "www"
    save(noise_image(48, 40), www / "a.jpg", quality=90)
    with serve(www) as (base, _):
        rows = [{"url": f"{base}/slow/30/a.jpg", "caption": f"image {i}"} for i in range(8)]
        proc = _start(write_csv(tmp_path / "pairs.csv", rows), tmp_path / "out")
        _wait_for(lambda: len(_worker_pids(proc.pid)) >= 1)
        workers = _worker_pids(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the builder alone, not its process group
        proc.wait()
        # well before the server answers (30 s), the workers are gone
        _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10.0)


def test_synth_workers_die_with_a_killed_parent(tmp_path):
    """The same for `vlp shards synth`'s pool (the demo's first stage)."""
    proc = subprocess.Popen([sys.executable, "-m", "vlp", "shards", "synth", "--out", str(tmp_path / "synth"),
                             "--n", "200000", "--workers", "2", "--image-size", "1024"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(_worker_pids(proc.pid)) >= 2)
        workers = _worker_pids(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10.0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# Loaded by every Python process the test starts (PYTHONPATH): an image carrying the marker kills the process
# that decodes it, as a decoder's segfault would.
CRASHING_DECODER = """
import os, signal
import vlp.data_tools.pipeline as pipeline
_process_image = pipeline.process_image
def _process_image_or_die(data, suffix, opts):
    if b"KILLS-ITS-DECODER" in data:
        os.kill(os.getpid(), signal.SIGKILL)
    return _process_image(data, suffix, opts)
pipeline.process_image = _process_image_or_die
"""


def test_a_row_that_kills_its_decoder_fails_alone(tmp_path, monkeypatch):
    """A row whose image kills every process that decodes it: the pool restarts, the chunk is tried again,
    then halved in fresh processes until only that row is left; it fails as worker_crashed, every other row
    of its chunk (and of the next) is written."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(CRASHING_DECODER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    rows = []
    for i in range(70):  # a chunk of 64 rows and one of 6
        path = save(noise_image(24, 24, seed=i), tmp_path / "img" / f"{i}.jpg", quality=90)
        if i == 37:
            path.write_bytes(path.read_bytes() + b"KILLS-ITS-DECODER")  # after the end marker: still a valid JPEG
        rows.append({"url": str(path), "caption": f"image {i}"})
    out = tmp_path / "out"
    summary = build([write_csv(tmp_path / "p.csv", rows)], out, workers=1, shard_size=100)
    assert (summary.rows, summary.written, summary.failed, summary.duplicates) == (70, 69, 1, 0)
    assert reasons_by_url(out) == {str(tmp_path / "img" / "37.jpg"): "worker_crashed"}
    assert verify_shards(out, progress=False).ok
