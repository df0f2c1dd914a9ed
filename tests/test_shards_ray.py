"""`vlp shards build --engine ray` on a real two-node Ray cluster (tests/ray_cluster.py).

Each Ray build must write byte for byte the files a local build of the same
input and options writes (tars, records, stats, failures.jsonl, manifest):
with bad rows among the good ones, with a Ray worker killed mid-task, and
when a killed build is rerun. The builds run as a user runs them: the `vlp`
command in a subprocess, from the data's parent folder with relative input
paths (so the Ray tasks must resolve relative paths as a local build does).

The slow inputs are served over HTTP from the bridge address, which both
nodes reach, each request answered late so that a build runs long enough to
be interrupted part-way.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import ray_cluster
from http_server import _handler, closed_port
from shard_helpers import build, finished_shards, noise_image, save, tree_bytes
from vlp.data_tools.synth import generate

from vlp.core.errors import UserError

# one xdist worker runs all of group "ray": the tests share one ray setup
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

ROWS = 480  # synthetic pairs
SHARD = 100  # mixed.csv: 5 shards of 64-row chunks (and a shorter one before each shard boundary)
SLOW_ROWS, SLOW_SHARD, SLOW_DELAY = 320, 40, 0.1  # slow.csv: 8 shards; a chunk takes ~2 s with 2 threads
TASK = "ray::vlp_shards_chunk"  # the process title of a Ray worker running a chunk
MARK = ":task_name:vlp_shards_chunk"  # what Ray writes to a worker's log when it starts a chunk


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = ray_cluster.missing()
    if why:
        if os.environ.get("VLP_CI") == "1":  # CI installs vlp[dev], which has Ray: there, a failure
            pytest.fail(f"the Ray engine tests must run in CI: {why}")
        pytest.skip(why)
    netns_why = ray_cluster.netns_missing()
    if netns_why and os.environ.get("VLP_CI") == "1":
        pytest.fail(f"the Ray engine tests need a second host in CI: {netns_why}")
    # without network namespaces (not root), the second node runs on this host, over loopback
    running = ray_cluster.start(tmp_path_factory.mktemp("ray"), netns=netns_why is None)
    yield running
    ray_cluster.stop(running)


@pytest.fixture(scope="module")
def data(tmp_path_factory, cluster) -> Path:
    """root/data: synthetic pairs as mixed.csv (with missing files and duplicates) and slow.csv (HTTP)."""
    root = tmp_path_factory.mktemp("raydata")
    generate(root / "data", ROWS, seed=3, image_size=32, workers=1, progress=False)
    with open(root / "data" / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    mixed = list(rows)
    for k, at in enumerate((0, 5, 63, 64, 99, 150, 301, 479)):  # missing files, at and around chunk edges
        mixed.insert(at, {**rows[at], "url": f"images/missing_{k}.png"})
    for at in (10, 200, 420):  # the same image again: a duplicate
        mixed.insert(at, {**rows[at], "caption": "again"})
    _write(root / "data" / "mixed.csv", mixed)
    return root


@pytest.fixture(scope="module")
def slow(data, cluster):
    """slow.csv: SLOW_ROWS rows fetched from an HTTP server on the bridge (two of them 404)."""
    host = cluster.address.rpartition(":")[0]
    server = ThreadingHTTPServer((host, 0), _handler(data / "data", Counter()))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{host}:{server.server_address[1]}"
    rows = [{"url": f"{base}/slow/{SLOW_DELAY}/images/{i % ROWS:06d}.png", "caption": f"image {i}"}
            for i in range(SLOW_ROWS)]
    rows[17]["url"] = rows[250]["url"] = f"{base}/status/404"
    _write(data / "data" / "slow.csv", rows)
    _build(data, "data/slow.csv", "slow-reference", SLOW_SHARD, "--threads", "32")  # local: the reference
    yield "data/slow.csv", tree_bytes(data / "slow-reference")
    server.shutdown()
    server.server_close()


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _command(csv_rel: str, out_rel: str, shard: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlp", "shards", "build", csv_rel, "--output", out_rel, "--shard-size", str(shard),
            "--image-size", "32", "--workers", "1", "--threads", "2", "--quiet", *extra]




def _build(root: Path, csv_rel: str, out_rel: str, shard: int, *extra: str, env: dict | None = None) -> str:
    done = subprocess.run(_command(csv_rel, out_rel, shard, *extra), cwd=root, env=env or ray_cluster.env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _ray(cluster) -> tuple[str, ...]:
    return ("--engine", "ray", "--ray-address", cluster.address)


def _assert_same(got: Path, expected: dict[str, bytes]) -> None:
    files = tree_bytes(got)
    assert sorted(files) == sorted(expected)
    assert [name for name in expected if files[name] != expected[name]] == []
    manifest = json.loads(files["manifest.json"])
    assert manifest["rows"] == manifest["written"] + manifest["failed"] + manifest["duplicates"]


def _marks(cluster) -> dict[str, int]:
    return {node: cluster.worker_logs(node).count(MARK) for node in cluster.temp_dirs}


def test_a_ray_build_equals_a_local_build_and_runs_on_both_nodes(cluster, data):
    before = _marks(cluster)
    out = _build(data, "data/mixed.csv", "ray-out", SHARD, *_ray(cluster), env=cluster.env)
    after = _marks(cluster)
    rows = ROWS + 8 + 3
    assert f"rows={rows} written={ROWS} failed=8 duplicates=3 (rows == written + failed + duplicates: ok)" in out
    _build(data, "data/mixed.csv", "local-out", SHARD)
    _assert_same(data / "ray-out", tree_bytes(data / "local-out"))
    failures = (data / "ray-out" / "failures.jsonl").read_text().splitlines()
    assert sum('"missing_file"' in line for line in failures) == 8
    # Ray's own per-node worker logs: chunks started on both nodes (10 chunks, a 2-CPU cluster)
    ran = {node: after[node] - before[node] for node in after}
    assert sum(ran.values()) >= 10 and all(n > 0 for n in ran.values()), ran


def _chunk_workers(cluster) -> list[psutil.Process]:
    """Ray workers of this cluster that are running a chunk now."""
    ours = {p.pid for proc in cluster.procs for p in ray_cluster._tree(proc)}
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in ours and " ".join(p.info["cmdline"] or []).startswith(TASK):
            found.append(p)
    return found


def _wait_for(predicate, timeout: float = 180.0):
    end = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)
    return value


def test_a_ray_worker_killed_mid_task_loses_nothing(cluster, data, slow):
    csv_rel, expected = slow
    proc = subprocess.Popen(_command(csv_rel, "killed-worker", SLOW_SHARD, *_ray(cluster)), cwd=data, env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        victim = _wait_for(lambda: _chunk_workers(cluster))[0]
        victim.kill()  # kill -9, mid-task, as the OOM killer would
        victim.wait(timeout=30)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    assert "(rows == written + failed + duplicates: ok)" in stdout
    _assert_same(data / "killed-worker", expected)


def test_a_killed_ray_build_resumes_to_the_same_output(cluster, data, slow):
    csv_rel, expected = slow
    out = data / "resumed"
    proc = subprocess.Popen(_command(csv_rel, "resumed", SLOW_SHARD, *_ray(cluster)), cwd=data, env=cluster.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: finished_shards(out) >= 2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, no cleanup
        proc.wait()
    done_before = finished_shards(out)
    assert done_before < SLOW_ROWS // SLOW_SHARD and not (out / "manifest.json").exists()
    stdout = _build(data, csv_rel, "resumed", SLOW_SHARD, *_ray(cluster), env=cluster.env)
    assert f"{done_before} resumed" in stdout
    _assert_same(out, expected)


def test_images_a_node_cannot_read_stop_the_build_before_it_starts(cluster, tmp_path):
    """Images on this machine's disk only: a one-line error naming the node, and no shard written."""
    if not cluster.netns:
        pytest.skip("without network namespaces the second node shares every folder")
    folder = cluster.private / "pairs"
    rows = []
    for i in range(6):
        save(noise_image(24, 24, seed=i), folder / "img" / f"{i}.png")
        rows.append({"url": f"img/{i}.png", "caption": f"picture {i}"})
    _write(folder / "pairs.csv", rows)
    done = subprocess.run(_command(str(folder / "pairs.csv"), str(tmp_path / "out"), 10, *_ray(cluster)),
                          cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    node2 = ray_cluster.HOSTS.addr(ray_cluster.HOSTS.names[0])
    assert f"node {node2} reads image {folder}/img/0.png as missing_file, this machine as " in done.stderr
    assert "shared by every node" in done.stderr
    assert not list((tmp_path / "out").glob("*.tar"))


@pytest.mark.parametrize("case", ["refused", "silent"])
def test_an_unreachable_cluster_is_a_one_line_error(tmp_path, case):
    """Exit 2 with one line, in bounded time: a refused port; a port that accepts connections but never
    answers (Ray alone would wait for minutes). Loopback only: tests send nothing elsewhere."""
    timeout = 10
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = {"refused": f"127.0.0.1:{closed_port()}", "silent": f"127.0.0.1:{silent.getsockname()[1]}"}[case]
        (tmp_path / "p.csv").write_text("url,caption\na.png,a picture\n")
        start = time.monotonic()
        done = subprocess.run(_command("p.csv", "out", 10, "--engine", "ray", "--ray-address", address),
                              cwd=tmp_path, env={**ray_cluster.env(), "VLP_RAY_CONNECT_TIMEOUT": str(timeout)},
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and f"--ray-address {address}" in done.stderr, done.stderr
    assert time.monotonic() - start < timeout + 30


def test_without_ray_installed_the_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    (tmp_path / "p.csv").write_text("url,caption\na.png,a picture\n")
    with pytest.raises(UserError, match=r"pip install 'vlp\[ray\]'"):
        build([tmp_path / "p.csv"], tmp_path / "out", engine="ray")


def test_a_killed_builds_local_ray_instance_is_ended_by_the_next_build(tmp_path):
    """The driver killed alone: Ray stops most of its instance, its agents linger for minutes; the next build
    that starts a local instance ends every process the dead one recorded."""
    from http_server import serve

    save(noise_image(24, 24, seed=1), tmp_path / "www" / "a.png")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with serve(tmp_path / "www") as (base, _):
        (tmp_path / "slow.csv").write_text("url,caption\n" + "".join(f"{base}/slow/0.5/a.png,picture {i}\n"
                                                                     for i in range(400)))
        proc = subprocess.Popen(_command("slow.csv", "out", 50, "--engine", "ray"), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        record = _wait_for(lambda: next(iter(Path("/tmp").glob(f"vlp-ray-{proc.pid}-*/processes.json")), None))
        _wait_for(lambda: record.stat().st_size > 0)
        recorded = json.loads(record.read_text())
        assert recorded  # raylet, GCS, agents, workers
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, no cleanup
        proc.wait()
    (tmp_path / "one.csv").write_text("url,caption\nwww/a.png,one picture\n")
    _build(tmp_path, "one.csv", "next", 10, "--engine", "ray", env=env)

    def running(rec: dict) -> bool:
        try:
            p = psutil.Process(rec["pid"])
            return abs(p.create_time() - rec["started"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    assert not [r for r in recorded if running(r)]
    assert not list(Path("/tmp").glob(f"vlp-ray-{proc.pid}-*"))  # the record is gone with them
