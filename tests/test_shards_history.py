"""A shard set that grows: `vlp shards retry` fetches again only the rows that failed for a passing reason,
`vlp shards build --append` adds new inputs' rows; neither rewrites a finished shard, the accounting holds
over the whole history, and a killed retry resumes to the same bytes as an uninterrupted one.

Images come from a real HTTP server on loopback (tests/http_server.py): /flaky/1/<file> answers 500 once
and then the file, /slow/<s>/<file> answers late (a timeout at a short --timeout), /status/404 never.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from http_server import serve
from shard_helpers import (
    build,
    failures,
    finished_shards,
    noise_image,
    read_back,
    save,
    tree_bytes,
    write_csv,
)
from vlp.data_tools.build import retry_shards
from vlp.data_tools.verify import verify_shards

from vlp.core.config import ShardsRetryConfig
from vlp.core.errors import UserError


def _retry(out, **kw):
    return retry_shards(ShardsRetryConfig(output=str(out), workers=0, threads=4, **kw), progress=False)


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    for i in range(12):
        save(noise_image(40, 36, seed=i), root / f"{i}.jpg", quality=90)
    with serve(root) as (base, hits):
        yield base, hits


def test_retry_fetches_only_the_passing_failures_into_new_shards(tmp_path, www):
    base, hits = www
    rows = [{"url": f"{base}/{i}.jpg", "caption": f"good {i}"} for i in range(6)]
    rows += [{"url": f"{base}/flaky/1/{i}.jpg", "caption": f"flaky {i}"} for i in (6, 7, 8)]  # http_500 once
    rows += [{"url": f"{base}/slow/1.5/9.jpg", "caption": "late"}]  # a timeout at --timeout 0.5
    rows += [{"url": f"{base}/status/404", "caption": "gone"}, {"url": f"{base}/missing.jpg", "caption": "gone too"}]
    rows += [{"url": f"{base}/flaky/1/0.jpg", "caption": "the same image as row 0"}]  # a duplicate once fetched
    out = tmp_path / "out"
    first = build([write_csv(tmp_path / "pairs.csv", rows)], out, shard_size=4, retries=0, timeout=0.5)
    assert (first.rows, first.written, first.failed, first.duplicates) == (13, 6, 7, 0)
    before = tree_bytes(out)

    tried, summary = _retry(out, timeout=5.0)
    assert tried == 5  # 4 x http_500 and the timeout; never the two 404s
    assert (summary.rows, summary.written, summary.failed, summary.duplicates) == (13, 10, 2, 1)
    assert hits["/status/404"] == 1 and hits["/missing.jpg"] == 1  # asked once, by the build
    assert {name: data for name, data in tree_bytes(out).items() if name in before and name.endswith(
        (".tar", ".parquet", "_stats.json"))} == {n: d for n, d in before.items() if n.endswith(
            (".tar", ".parquet", "_stats.json"))}  # no finished shard rewritten
    manifest = _manifest(out)
    assert [s["name"] for s in manifest["shards"]] == [f"{i:05d}.tar" for i in range(6)]  # 13 rows, then 5
    assert [p["kind"] for p in manifest["parts"]] == ["build", "retry"] and manifest["parts"][1]["first_shard"] == 4
    assert manifest["failure_reasons"] == {"http_404": 2}
    assert sorted((f["row"], f["status"]) for f in failures(out)) == [(10, "failed"), (11, "failed"), (12, "duplicate")]
    samples = read_back(out)
    assert sorted(s["meta"]["row"] for s in samples.values()) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert {s["caption"] for k, s in samples.items() if k.startswith("00004")} == {"flaky 6", "flaky 7", "flaky 8",
                                                                                  "late"}
    assert verify_shards(out, progress=False).ok

    again, after = _retry(out)  # nothing passing is left: the set stays as it is
    assert again == 0 and (after.written, after.failed) == (10, 2)
    assert _manifest(out) == manifest


def test_append_numbers_new_rows_after_the_set_and_keeps_its_shards(tmp_path, www):
    base, _ = www
    first = write_csv(tmp_path / "a.csv", [{"url": f"{base}/{i}.jpg", "caption": f"a {i}"} for i in range(6)])
    more = write_csv(tmp_path / "b.csv", [{"url": f"{base}/{i}.jpg", "caption": f"b {i}"} for i in (5, 6, 7, 8)])
    out = tmp_path / "out"
    build([first], out, shard_size=4)
    before = tree_bytes(out)

    summary = build([more], out, shard_size=4, append=True)
    assert (summary.rows, summary.written, summary.failed, summary.duplicates) == (10, 9, 0, 1)
    manifest = _manifest(out)
    assert manifest["inputs"] == [str(first), str(more)]
    assert [(p["kind"], p["first_shard"], p["first_row"]) for p in manifest["parts"]] == [
        ("build", 0, 0), ("append", 2, 6)]
    assert all(tree_bytes(out)[name] == data for name, data in before.items() if name.startswith("0000"))
    assert failures(out) == [{"row": 6, "input": str(more), "line": 2, "key": "000020", "url": f"{base}/5.jpg",
                              "status": "duplicate", "reason": "duplicate", "detail": "same image as row 5"}]
    keys = {s["meta"]["row"]: k for k, s in read_back(out).items()}
    assert keys[7] == "000021" and keys[9] == "000023" and sorted(keys) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert verify_shards(out, progress=False).ok

    rerun = build([first], out, shard_size=4)  # the first build's command again: nothing to redo
    assert (rerun.rows, rerun.written) == (10, 9) and _manifest(out) == manifest
    with pytest.raises(UserError, match=r"other options \(shard_size\)"):
        build([more], out, shard_size=5, append=True)
    with pytest.raises(UserError, match="holds no vlp shard build"):
        build([more], tmp_path / "new", shard_size=4, append=True)


def test_no_new_part_on_an_unfinished_build(tmp_path, www):
    base, _ = www
    out = tmp_path / "out"
    build([write_csv(tmp_path / "a.csv", [{"url": f"{base}/0.jpg", "caption": "a"}])], out)
    (out / "manifest.json").unlink()  # as a build killed before its end leaves it
    with pytest.raises(UserError, match="the build is not finished; rerun it before a retry"):
        _retry(out)


@pytest.mark.slow
def test_a_killed_retry_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, www):
    base, _ = www
    rows = [{"url": f"{base}/slow/0.3/{i % 12}.jpg", "caption": f"late {i}"} for i in range(60)]
    out = tmp_path / "out"
    first = build([write_csv(tmp_path / "pairs.csv", rows)], out, shard_size=6, timeout=0.05, retries=0)
    assert first.failed == 60
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    _retry(reference, timeout=10.0)

    cmd = [sys.executable, "-m", "vlp", "shards", "retry", str(out), "--timeout", "10", "--workers", "1",
           "--threads", "2", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.monotonic() + 60
    while finished_shards(out) < 12:  # the build's 10 shards, then 2 of the retry's
        assert time.monotonic() < end and proc.poll() is None, "the retry ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _manifest(out)["failed"] == 60  # the manifest of the build, until the retry finishes

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "retry: 60 row(s) fetched again" in rerun.stdout and "2 resumed" in rerun.stdout
    assert "rows=60 written=12 failed=0 duplicates=48" in rerun.stdout
    assert tree_bytes(out) == tree_bytes(reference)
