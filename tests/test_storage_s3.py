"""Object storage for real: builds, the loader and training against an S3 API on loopback.

moto's S3 server runs in this process behind a small proxy (tests/s3_server.py) that
counts requests and can throttle like S3 (503 Slow Down). vlp's commands run as a user
runs them, in subprocesses configured only by the usual AWS environment variables.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import S3Server
from shard_helpers import tree_bytes, write_csv
from vlp.data_tools.synth import generate

# one xdist worker runs all of group "s3": the tests share one s3 setup
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("s3")]

ROWS, SHARD = 48, 20


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def store(s3):
    """A clean server with the buckets `data` (inputs) and `shards` (outputs)."""
    s3.reset()
    client = s3.client()
    for bucket in ("data", "shards"):
        client.create_bucket(Bucket=bucket)
    return s3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Synthetic pairs: pairs.csv with relative image paths, plus one row whose image is missing."""
    root = tmp_path_factory.mktemp("pairs")
    csv_path = generate(root, n=ROWS - 1, seed=3, image_size=32, progress=False)
    with open(csv_path, newline="") as fh:
        rows = [{"url": r["url"], "caption": r["caption"]} for r in csv.DictReader(fh)]
    rows.append({"url": "images/not-there.png", "caption": "a missing image"})
    write_csv(root / "pairs.csv", rows)
    pq.write_table(pa.Table.from_pylist(rows), root / "pairs.parquet")
    return root


def _upload_inputs(s3: S3Server, root: Path) -> None:
    client = s3.client()
    client.upload_file(str(root / "pairs.parquet"), "data", "set/pairs.parquet")
    for image in sorted((root / "images").iterdir()):
        client.upload_file(str(image), "data", f"set/images/{image.name}")


def _env(s3: S3Server, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **s3.env(), "OMP_NUM_THREADS": "1", **extra}


def _vlp(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlp", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, done.stderr[-3000:]
    return err


def _objects(s3: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k.rsplit("/", 1)[-1]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


BUILD = ["--shard-size", str(SHARD), "--image-size", "32", "--workers", "1", "--quiet"]


def test_build_from_s3_to_s3_equals_a_local_build_and_trains(store, pairs, tmp_path):
    _upload_inputs(store, pairs)
    env = _env(store)
    printed = _ok(_vlp(env, "shards", "build", "s3://data/set/pairs.parquet", "--output", "s3://shards/run", *BUILD))
    assert f"rows={ROWS} written={ROWS - 1} failed=1" in printed
    _ok(_vlp(env, "shards", "build", str(pairs / "pairs.parquet"), "--output", str(tmp_path / "local"), *BUILD))

    remote, local = _objects(store, "shards", "run/"), tree_bytes(tmp_path / "local")
    names = sorted(n for n in local if n.endswith((".tar", "_stats.json")))
    assert names and all(remote[n] == local[n] for n in names)  # the shards themselves: byte for byte
    manifest = json.loads(remote["manifest.json"])
    assert manifest["inputs"] == ["s3://data/set/pairs.parquet"] and manifest["written"] == ROWS - 1
    assert [s["samples"] for s in manifest["shards"]] == [s["samples"] for s in
                                                         json.loads(local["manifest.json"])["shards"]]
    (failure,) = [json.loads(line) for line in remote["failures.jsonl"].decode().splitlines()]
    assert failure["reason"] == "missing_file" and failure["url"] == "images/not-there.png"
    assert not any(n.startswith(".vlp-staging") or n.endswith(".tmp") for n in remote)
    assert "verify: OK: 3 shards, 47 samples match manifest.json" in _ok(_vlp(env, "shards", "verify", "s3://shards/run"))
    assert "missing_file" in _ok(_vlp(env, "shards", "inspect", "s3://shards/run"))

    out = tmp_path / "trained"
    _ok(_vlp(env, "train", "data.sources=[{shards: 's3://shards/run'}]", "data.workers=1", "model.name=vlp-micro",
             "train.batch_size=8", "train.steps=3", "train.log_keys=true", f"train.output_dir={out}"))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(len(set(s["keys"])) == 8 for s in steps)


def test_resumed_build_on_s3_skips_complete_shards(store, pairs):
    _upload_inputs(store, pairs)
    env = _env(store)
    args = ["shards", "build", "s3://data/set/pairs.parquet", "--output", "s3://shards/run", *BUILD]
    _ok(_vlp(env, *args))
    first = _objects(store, "shards", "run/")
    client = store.client()
    for name in ("manifest.json", "00002_stats.json"):  # as if killed while finishing the last shard
        client.delete_object(Bucket="shards", Key=f"run/{name}")
    store.hits.clear()
    _ok(_vlp(env, *args))
    assert _objects(store, "shards", "run/") == first
    puts = {path.rsplit("/", 1)[-1] for (method, path), n in store.hits.items() if method == "PUT"}
    assert "00002.tar" in puts and not {"00000.tar", "00001.tar"} & puts  # complete shards were not redone


def test_loader_reads_s3_shards_with_a_manifest_url(store, pairs, tmp_path):
    """Shards at one prefix, their manifest given as a URL elsewhere; each shard is read whole."""
    _upload_inputs(store, pairs)
    env = _env(store)
    _ok(_vlp(env, "shards", "build", "s3://data/set/pairs.parquet", "--output", "s3://shards/run", *BUILD))
    client = store.client()
    client.copy_object(Bucket="data", Key="meta/manifest.json", CopySource={"Bucket": "shards", "Key": "run/manifest.json"})
    out = tmp_path / "trained"
    _ok(_vlp(env, "train", "data.sources=[{shards: 's3://shards/run/{00000..00002}.tar', "
             "manifest: 's3://data/meta/manifest.json'}]", "data.workers=0", "model.name=vlp-micro",
             "train.batch_size=8", "train.steps=2", "train.log_keys=true", f"train.output_dir={out}"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------ failures: one line, never a hang


def test_missing_bucket_is_one_line_for_build_and_train(store, pairs, tmp_path):
    env = _env(store)
    err = _one_line_error(_vlp(env, "shards", "build", str(pairs / "pairs.csv"), "--output", "s3://nobucket/x",
                               *BUILD))
    assert "nobucket" in err and "no such bucket" in err, err
    err = _one_line_error(_vlp(env, "train", "data.sources=[{shards: 's3://nobucket/shards'}]",
                               f"train.output_dir={tmp_path / 'r'}"))
    assert "s3://nobucket" in err and "no such bucket" in err, err
    err = _one_line_error(_vlp(env, "shards", "build", "s3://data/none.parquet", "--output", str(tmp_path / "o")))
    assert "s3://data/none.parquet" in err and "no such" in err, err


def test_server_down_is_one_line_in_bounded_time(store, pairs, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    env = _env(store, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_MAX_ATTEMPTS="2")
    start = time.monotonic()
    err = _one_line_error(_vlp(env, "shards", "build", str(pairs / "pairs.csv"), "--output", "s3://shards/x",
                               *BUILD, timeout=120))
    assert "s3://shards" in err and "cannot reach the storage endpoint" in err, err
    assert time.monotonic() - start < 60


def test_access_denied_is_one_line(s3, tmp_path, pairs):
    """A second moto server that enforces authentication: our keys are unknown to it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        env = _env(s3, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        err = _one_line_error(_vlp(env, "shards", "build", str(pairs / "pairs.csv"), "--output", "s3://shards/x",
                                   *BUILD, timeout=120))
        assert "s3://shards" in err and "access denied" in err, err
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_503_storm_is_retried_then_a_per_row_reason(store, pairs):
    _upload_inputs(store, pairs)
    env = _env(store)
    # a short storm on the images: the client's retries (with backoff) ride it out
    store.throttle, store.throttle_prefix = 3, "/data/set/images/"
    printed = _ok(_vlp(env, "shards", "build", "s3://data/set/pairs.parquet", "--output", "s3://shards/a", *BUILD))
    assert f"written={ROWS - 1} failed=1" in printed and store.throttle == 0
    # a storm that does not end: every image fails with its reason, nothing is dropped, the build ends, and
    # (as img2dataset's users expect of a build that wrote nothing) exits 1 with one line
    store.throttle = -1
    done = _vlp(env, "shards", "build", "s3://data/set/pairs.parquet", "--output", "s3://shards/b", *BUILD)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("vlp: error: no row was written")
    assert f"rows={ROWS} written=0 failed={ROWS}" in done.stdout + done.stderr
    failures = [json.loads(line) for line in _objects(store, "shards", "b/")["failures.jsonl"].decode().splitlines()]
    reasons = {f["reason"] for f in failures}
    assert len(failures) == ROWS and reasons <= {"storage_error", "missing_file"}, reasons
    assert any("503" in f["detail"] or "SlowDown" in f["detail"] for f in failures)



# ------------------------------------------------------------------ reading: one GET per shard


@pytest.fixture
def s3_here(store, monkeypatch):
    """This process's AWS settings pointed at the loopback server (for in-process readers)."""
    import s3fs

    for key, value in store.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield store
    s3fs.S3FileSystem.clear_instance_cache()


def test_an_object_past_fsspecs_block_size_is_read_with_one_get_and_resumed_after_a_drop(s3_here):
    from vlp.core import storage

    data = os.urandom(20 << 20)  # fsspec's file objects would fetch this in 3+ ranged GETs
    s3_here.client().put_object(Bucket="shards", Key="big.tar", Body=data)
    s3_here.hits.clear()
    with storage.open_read("s3://shards/big.tar") as fh:
        assert b"".join(iter(lambda: fh.read(65536), b"")) == data
    assert s3_here.gets("big.tar") == 1
    # the connection drops 5 MB into the body: the reader asks again from there, once
    s3_here.cut_after = 5 << 20
    with storage.open_read("s3://shards/big.tar") as fh:
        assert fh.read() == data
    assert s3_here.gets("big.tar") == 3 and s3_here.cut_after == 0


def test_an_epoch_over_s3_gets_each_shard_once(s3_here, pairs, tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    from vlp.core.config import DataConfig, DataSource
    from vlp.train.loader.batches import ShardLoader

    _ok(_vlp(os.environ.copy(), "shards", "build", str(pairs / "pairs.csv"), "--output", str(tmp_path / "s"), *BUILD))
    client = s3_here.client()
    for path in sorted((tmp_path / "s").iterdir()):
        client.upload_file(str(path), "shards", f"run/{path.name}")

    def keys(shards: str) -> list[list[str]]:
        cfg = DataConfig(sources=[DataSource(shards=shards)], workers=0, shuffle_buffer=8, lanes=1)  # front to back
        loader = ShardLoader(cfg, batch_size=4, image_size=24, tokenizer=SimpleTokenizer(context_length=16), seed=1)
        return [b.keys for b in loader.epoch(0)]

    local = keys(str(tmp_path / "s"))
    s3_here.hits.clear()
    assert keys("s3://shards/run") == local
    assert {n: s3_here.gets(n) for n in ("00000.tar", "00001.tar", "00002.tar")} == dict.fromkeys(
        ("00000.tar", "00001.tar", "00002.tar"), 1)


def test_img2dataset_output_on_s3_is_indexed_like_a_local_copy_then_verified(store, tmp_path):
    from test_shards_index import write_img2dataset_folder

    local = tmp_path / "i2d"
    write_img2dataset_folder(local)
    client = store.client()
    for path in sorted(local.iterdir()):
        client.upload_file(str(path), "shards", f"i2d/{path.name}")
    env = _env(store)
    store.hits.clear()
    printed = _ok(_vlp(env, "shards", "index", "s3://shards/i2d"))
    assert printed.startswith("index: wrote s3://shards/i2d/manifest.json: 3 shards, 24 samples"), printed
    assert {n: store.gets(n) for n in ("00000.tar", "00001.tar", "00002.tar")} == dict.fromkeys(
        ("00000.tar", "00001.tar", "00002.tar"), 1)  # each tar streamed once
    _ok(_vlp(env, "shards", "index", str(local)))
    assert json.loads(_objects(store, "shards", "i2d/")["manifest.json"]) == json.loads(
        (local / "manifest.json").read_text())
    assert _ok(_vlp(env, "shards", "verify", "s3://shards/i2d", "--quiet")).startswith("verify: OK: 3 shards, 24 samples")
    # a tar cut short on its way up is refused, by name, in one line
    data = (local / "00001.tar").read_bytes()
    client.put_object(Bucket="shards", Key="cut/00000.tar", Body=data[: len(data) // 2])
    err = _one_line_error(_vlp(env, "shards", "index", "s3://shards/cut"))
    assert err.startswith("vlp: error: s3://shards/cut/00000.tar:") and ("cut short" in err or "not a readable tar" in err), err


def test_an_eval_set_on_s3_gives_the_report_of_its_local_copy(store, tmp_path):
    """A SugarCrepe-format task whose JSON folder and images are s3:// URLs: mirrored, then read locally."""
    from test_eval_support import export_tiny, noise, save, write_suite

    coco, data = tmp_path / "val2017", tmp_path / "sugarcrepe"
    for i in range(3):
        save(noise(i), coco / f"{i:012d}.jpg", "JPEG")
    data.mkdir()
    entries = {str(k): {"filename": f"{k % 4:012d}.jpg", "caption": f"a thing {k}", "negative_caption": f"thing a {k}"}
               for k in (0, 1, 3, 5)}  # "3" names a missing image: skipped with its id in both runs
    (data / "swap_att.json").write_text(json.dumps(entries))
    client = store.client()
    client.create_bucket(Bucket="evals")
    for path in [*coco.iterdir(), *data.iterdir()]:
        client.upload_file(str(path), "evals", f"{path.parent.name}/{path.name}")
    model = export_tiny(tmp_path / "tiny.safetensors", seed=0)
    env = _env(store, VLP_CACHE_DIR=str(tmp_path / "cache"))
    reports = {}
    for where, folder, images in (("local", data, coco), ("s3", "s3://evals/sugarcrepe", "s3://evals/val2017")):
        suite = write_suite(tmp_path / f"{where}.yaml", [{"name": "sc", "type": "sugarcrepe", "dataset": {
            "format": "sugarcrepe", "path": str(folder), "image_root": str(images)}}])
        _ok(_vlp(env, "eval", "--model", str(model), "--suite", str(suite), "--out", str(tmp_path / where), "--quiet"))
        reports[where] = json.loads((tmp_path / where / "report.json").read_text())["tasks"]["sc"]
    s3, local = reports["s3"], reports["local"]
    assert (s3["n_items"], s3["n_scored"], s3["n_skipped"]) == (4, 3, 1)
    assert s3["metrics"] == local["metrics"] and s3["skip_reasons"] == {"missing_file": 1}
    assert (tmp_path / "cache" / "remote" / "s3" / "evals" / "val2017" / "000000000002.jpg").read_bytes() == (
        coco / "000000000002.jpg").read_bytes()
    # a second run fetches nothing again (ETags unchanged): only listings
    store.hits.clear()
    _ok(_vlp(env, "eval", "--model", str(model), "--suite", str(tmp_path / "s3.yaml"), "--out", str(tmp_path / "again"),
             "--quiet"))
    assert store.gets(".jpg") == 0 and store.gets(".json") == 0


def test_embed_and_curate_read_s3_shards_and_curate_writes_to_s3(store, pairs, tmp_path):
    env = _env(store)
    _ok(_vlp(env, "shards", "build", str(pairs / "pairs.csv"), "--output", "s3://shards/run", *BUILD))
    _ok(_vlp(env, "shards", "embed", "s3://shards/run", "--out", str(tmp_path / "emb"), "--model", "vlp-micro",
             "--random-init", "--batch-size", "8", "--quiet"))
    printed = _ok(_vlp(env, "shards", "curate", "s3://shards/run", "--output", "s3://shards/curated", "--embeddings",
                       str(tmp_path / "emb"), "--clip-score-top", "0.5", "--quiet"))
    written = ROWS - 1  # the row with the missing image was never written
    kept = -(-written // 2)
    assert f"rows={written} kept={kept} removed={written - kept}" in printed, printed
    objects = _objects(store, "shards", "curated/")
    manifest = json.loads(objects["manifest.json"])
    assert (manifest["rows"], manifest["written"], manifest["source"]) == (written, kept, "curate")
    assert len(objects["removed.jsonl"].decode().splitlines()) == written - kept
    assert _ok(_vlp(env, "shards", "verify", "s3://shards/curated", "--quiet")).startswith("verify: OK")


def test_an_eval_mirror_never_writes_outside_its_cache(s3_here, tmp_path):
    """A listing with `../` in a key (S3 keys are plain strings) must not choose where the mirror writes."""
    from vlp.core import storage
    from vlp.core.errors import UserError

    client = s3_here.client()
    client.put_object(Bucket="data", Key="evalset/items.json", Body=b"[]")
    client.put_object(Bucket="data", Key="evalset/../../../../escaped.etag", Body=b"x")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="data").get("Contents", [])]
    assert "evalset/../../../../escaped.etag" in keys  # the store keeps the key as written
    cache = tmp_path / "a" / "b" / "cache"
    with pytest.raises(UserError, match="object key"):
        storage.mirror("s3://data/evalset", cache)
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.startswith("a/b/cache/") for p in written), written
    # a clean prefix mirrors as before, stamps included, all under the cache
    client.delete_object(Bucket="data", Key="evalset/../../../../escaped.etag")
    local = storage.mirror("s3://data/evalset", cache)
    assert (local / "items.json").read_bytes() == b"[]" and local.is_relative_to(cache)
    assert list(cache.glob(".stamps/s3/data/evalset/items.json.etag"))


def test_an_s3_input_builds_into_a_new_local_folder_without_copying_into_it(store, pairs, tmp_path):
    """The input's local copy went into the output folder before the folder was claimed: refused as not vlp's."""
    _upload_inputs(store, pairs)
    out = tmp_path / "new"
    printed = _ok(_vlp(_env(store), "shards", "build", "s3://data/set/pairs.parquet", "--output", str(out), *BUILD))
    assert f"rows={ROWS} written={ROWS - 1}" in printed
    assert not (out / "inputs").exists() and not any(p.suffix == ".parquet" and not p.stem.isdigit()
                                                     for p in out.iterdir())


def test_a_resumed_read_never_mixes_two_versions_of_an_object(s3_here):
    """The connection drops mid-body and the object was replaced meanwhile: the resumed read fails (its
    request is pinned to the ETag first read) instead of splicing the new version's bytes onto the old."""
    from vlp.core import storage

    first, second = os.urandom(12 << 20), os.urandom(12 << 20)
    s3_here.client().put_object(Bucket="shards", Key="moving.tar", Body=first)
    s3_here.cut_after = 5 << 20  # this GET's body breaks 5 MB in: the reader will ask for the rest
    fh = storage.open_read("s3://shards/moving.tar")
    head = fh.read(1 << 20)
    assert head == first[: 1 << 20]
    s3_here.client().put_object(Bucket="shards", Key="moving.tar", Body=second)
    got = bytearray(head)
    with pytest.raises(Exception):  # noqa: B017 - the client's error for a failed precondition, whatever its class
        while chunk := fh.read(1 << 20):
            got += chunk
    assert bytes(got) == first[: len(got)] and len(got) < len(first)  # only the first version's bytes, then the error
    fh.close()
