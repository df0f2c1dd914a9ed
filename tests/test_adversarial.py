"""vlp under hostile input and careless use: each test is a repro that once failed.

Real processes, real files and a real HTTP server on loopback; nothing of
vlp's is mocked. (Crafted checkpoints and power loss are in their own tests.)
"""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from http_server import serve
from shard_helpers import bomb_png, build, failures, noise_image, options, read_back, save, write_csv

from vlp.app.cli import main as vlp_main
from vlp.core.atomic import TMP_PREFIX
from vlp.core.errors import UserError
from vlp.core.images import PixelBudget
from vlp.core.ownership import LOCK, MARKER

HOLD_LOCK = """
import sys, time
from vlp.core.ownership import FolderLock
with FolderLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _one_line_error(capsys, argv: list[str]) -> str:
    assert vlp_main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    save(noise_image(40, 40), d / "a.png")
    save(noise_image(40, 40, seed=1), d / "b.png")
    return d


# ------------------------------------------------------------------ hostile http server


def test_a_dripping_server_cannot_hold_a_row_past_the_timeout(image_dir, tmp_path):
    with serve(image_dir) as (base, _):
        rows = [{"url": f"{base}/drip/0.2/a.png", "caption": "drip"}, {"url": f"{base}/b.png", "caption": "ok"}]
        summary = build([write_csv(tmp_path / "p.csv", rows)], tmp_path / "out", timeout=1.0, retries=0)
    assert (summary.written, summary.failed) == (1, 1)
    assert [f["reason"] for f in failures(tmp_path / "out")] == ["timeout"]


def test_a_server_dripping_its_headers_cannot_hold_a_row_past_the_timeout(image_dir, tmp_path):
    """A per-read socket timeout never fires on a header byte a second: the request's whole time is bounded."""
    from vlp.core.fetch import FetchError, FetchOptions, fetch

    with serve(image_dir) as (base, _):
        start = time.monotonic()
        with pytest.raises(FetchError) as caught:
            fetch(f"{base}/driphead/0.5/a.png", str(tmp_path), FetchOptions(timeout=2.0, retries=0))
        took = time.monotonic() - start
        rows = [{"url": f"{base}/driphead/0.5/a.png", "caption": "drip"}, {"url": f"{base}/b.png", "caption": "ok"}]
        summary = build([write_csv(tmp_path / "p.csv", rows)], tmp_path / "out", timeout=2.0, retries=0)
    assert caught.value.reason == "timeout" and took < 10, took  # the headers alone would take about 2 minutes
    assert (summary.written, summary.failed) == (1, 1)
    assert [f["reason"] for f in failures(tmp_path / "out")] == ["timeout"]


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_a_timeout_must_be_finite_and_positive(tmp_path, capsys, value):
    csv_path = write_csv(tmp_path / "p.csv", [{"url": "files/a.png", "caption": "x"}])
    err = _one_line_error(capsys, ["shards", "build", str(csv_path), "--output", str(tmp_path / "out"),
                                   "--timeout", value, "--quiet"])
    assert "timeout" in err and not (tmp_path / "out").exists()


def test_opt_out_headers_are_respected_and_counted(image_dir, tmp_path):
    """img2dataset's default: X-Robots-Tag noai / noimageai / noindex / noimageindex, for every agent or ours."""
    from urllib.parse import quote

    tags = ["noai", "otherbot: noai", "vlp: noindex", "noarchive, NoImageAI", "mybot: noai", "noarchive"]
    with serve(image_dir) as (base, hits):
        rows = [{"url": f"{base}/robots/{quote(t, safe='')}/a.png", "caption": t} for t in tags]
        summary = build([write_csv(tmp_path / "p.csv", rows)], tmp_path / "out", retries=2,
                        user_agent_token="mybot")
    reasons = {f["caption"] if "caption" in f else f["url"]: f["reason"] for f in failures(tmp_path / "out")}
    assert summary.failed == 4 and summary.written == 1 and summary.duplicates == 1  # the two allowed: one image
    assert sorted(reasons.values()) == ["duplicate"] + ["opt_out"] * 4  # failures.jsonl also names the duplicate
    assert sum(n for path, n in hits.items() if path.startswith("/robots/")) == 6  # refused once each, no retry
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["failure_reasons"]["opt_out"] == 4


def test_an_endless_body_is_cut_at_max_bytes(image_dir, tmp_path):
    with serve(image_dir) as (base, _):
        rows = [{"url": f"{base}/endless", "caption": "endless"}]
        build([write_csv(tmp_path / "p.csv", rows)], tmp_path / "out", max_bytes=1_000_000, timeout=20.0)
    assert [f["reason"] for f in failures(tmp_path / "out")] == ["too_large"]


@pytest.mark.parametrize("target", ["ftp/127.0.0.1/a.png", "file/etc/hostname"])
def test_redirects_go_to_http_only(image_dir, tmp_path, target):
    with serve(image_dir) as (base, hits):
        to_http = f"{base}/redirect/http/{base.removeprefix('http://')}/a.png"
        rows = [{"url": f"{base}/redirect/{target}", "caption": "x"}, {"url": to_http, "caption": "y"}]
        summary = build([write_csv(tmp_path / "p.csv", rows)], tmp_path / "out", retries=0)
    assert (summary.written, summary.failed) == (1, 1)  # the http redirect is followed
    assert [f["reason"] for f in failures(tmp_path / "out")] == ["bad_redirect"]
    assert hits["/a.png"] == 1


# ------------------------------------------------------------------ shard builds


@pytest.mark.parametrize("column", ["status", "key", "row"])
def test_keep_cols_that_clash_with_vlps_fields_are_refused_up_front(tmp_path, image_dir, capsys, column):
    csv_path = write_csv(tmp_path / "p.csv", [{"url": "files/a.png", "caption": "x", column: "mine"}])
    err = _one_line_error(capsys, ["shards", "build", str(csv_path), "--output", str(tmp_path / "out"),
                                   "--keep-cols", column, "--workers", "0", "--quiet"])
    assert f"--keep-cols {column}" in err and "rename the column" in err
    assert not (tmp_path / "out").exists()


def test_a_build_refuses_a_folder_it_did_not_make(tmp_path, image_dir, capsys):
    csv_path = write_csv(tmp_path / "p.csv", [{"url": "files/a.png", "caption": "x"}])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        err = _one_line_error(capsys, ["shards", "build", str(csv_path), "--output", str(out), "--quiet", *extra])
        assert "not empty and was not made by vlp" in err and "choose a new --output folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_rebuild_cleans_only_its_own_temp_files(tmp_path, image_dir):
    csv_path = write_csv(tmp_path / "p.csv", [{"url": "files/a.png", "caption": "x"}])
    out = tmp_path / "out"
    build([csv_path], out)
    (out / "thesis.tmp").write_text("mine")
    (out / "cache.tmp").mkdir()
    (out / f"{TMP_PREFIX}00000.tar").write_bytes(b"half a shard")  # a killed build's leftover
    summary = build([csv_path], out)
    assert summary.written == 1 and (out / "thesis.tmp").read_text() == "mine" and (out / "cache.tmp").is_dir()
    assert not (out / f"{TMP_PREFIX}00000.tar").exists()
    assert json.loads((out / MARKER).read_text())["kind"] == "shards"
    assert len(read_back(out)) == 1


def _hold_lock(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_build_into_the_same_folder_stops_naming_the_holder(tmp_path, image_dir, capsys):
    csv_path = write_csv(tmp_path / "p.csv", [{"url": "files/a.png", "caption": "x"}])
    out = tmp_path / "out"
    build([csv_path], out)
    holder = _hold_lock(out)
    try:
        err = _one_line_error(capsys, ["shards", "build", str(csv_path), "--output", str(out), "--quiet",
                                       "--image-size", "32", "--workers", "0"])
        assert f"pid {holder.pid}" in err and "another vlp process" in err
    finally:
        holder.kill()
        holder.wait()
    assert build([csv_path], out).written == 1  # the lock died with its holder


# ------------------------------------------------------------------ training and demo folders


def _train_args(out, *extra) -> list[str]:
    return ["train", "model.name=vlp-micro", "data.sources=[{shards: /nonexistent}]", "train.steps=1",
            f"train.output_dir={out}", *extra]


def test_train_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "results.csv").write_text("precious")
    err = _one_line_error(capsys, _train_args(out))
    assert "not empty and was not made by vlp" in err
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]


def test_a_fresh_train_into_an_existing_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"made_by": "vlp", "kind": "run", "command": "vlp train"}))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    err = _one_line_error(capsys, _train_args(out))
    assert "holds a training run" in err and "train.resume=auto" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_a_demo_never_deletes_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "model.ckpt").write_text("weeks of compute")
    err = _one_line_error(capsys, ["demo", f"train.output_dir={out}", f"demo.data_dir={tmp_path / 'data'}"])
    assert "not a vlp demo run" in err
    assert (out / "model.ckpt").read_text() == "weeks of compute"
    assert not (tmp_path / "data").exists()  # refused before any stage ran


def test_a_demo_never_wipes_a_synth_folder_it_did_not_make(tmp_path, capsys):
    synth = tmp_path / "data" / "synth"
    synth.mkdir(parents=True)
    (synth / "photos.csv").write_text("mine")
    err = _one_line_error(capsys, ["demo", f"train.output_dir={tmp_path / 'run'}", f"demo.data_dir={tmp_path / 'data'}"])
    assert "was not made by vlp demo" in err and (synth / "photos.csv").read_text() == "mine"


def test_folder_lock_names_the_holder(tmp_path):
    from vlp.core.ownership import FolderLock

    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}"), FolderLock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path):
        assert (tmp_path / LOCK).read_text().startswith("pid ")


# ------------------------------------------------------------------ fail early, in one line


@pytest.fixture
def small_shards(tmp_path, image_dir):
    csv_path = write_csv(tmp_path / "p.csv", [{"url": "files/a.png", "caption": "a"},
                                              {"url": "files/b.png", "caption": "b"}])
    build([csv_path], tmp_path / "shards")
    return tmp_path / "shards"


@pytest.mark.parametrize("override, needle", [
    ("model.name=vlp-tinny", "unknown model 'vlp-tinny'"),
    ("model.pretrained=/nonexistent/w.safetensors", "weights file not found"),
    ("train.deepspeed_config=/nonexistent/ds.json", "train.deepspeed_config"),
    ("train.resume=/nonexistent/step_1", "is not a complete vlp checkpoint"),
    ("optim.min_lr=0.1", "min_lr (0.1) must be <= lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("train.eval_every=1", "nosuch-suite"),
])
def test_train_fails_before_setup_and_before_any_folder(tmp_path, small_shards, capsys, override, needle):
    out = tmp_path / "run"
    args = ["train", "model.name=vlp-micro", f"data.sources=[{{shards: '{small_shards}'}}]", "train.steps=1",
            f"train.output_dir={out}", "train.eval_suite=nosuch-suite", override]
    err = _one_line_error(capsys, args)
    assert needle in err, err
    assert not out.exists()


def test_missing_shards_fail_before_any_folder(tmp_path, capsys):
    out = tmp_path / "run"
    err = _one_line_error(capsys, _train_args(out))
    assert "data.sources" in err and not out.exists()


def test_an_empty_config_file_is_warned_about(tmp_path, capsys):
    from vlp.core.config import RunConfig, load

    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load(RunConfig, path) == RunConfig()
    assert f"config file {path} is empty" in capsys.readouterr().err


# ------------------------------------------------------------------ hostile files read as inputs


def test_a_huge_image_from_a_server_is_refused_before_decoding(image_dir, tmp_path):
    (image_dir / "bomb.png").write_bytes(bomb_png())
    with serve(image_dir) as (base, _):
        rows = [{"url": f"{base}/bomb.png", "caption": "bomb"}, {"url": f"{base}/a.png", "caption": "ok"}]
        summary = build([write_csv(tmp_path / "p.csv", rows)], tmp_path / "out")
    assert (summary.written, summary.failed) == (1, 1)
    assert [f["reason"] for f in failures(tmp_path / "out")] == ["decompression_bomb"]


def test_an_input_that_breaks_part_way_keeps_its_rows_and_accounts_for_the_rest(tmp_path, image_dir):
    rows = [{"url": f"files/{'ab'[i % 2]}.png", "caption": f"row {i} " + "x" * 200} for i in range(400)]
    packed = gzip.compress(write_csv(tmp_path / "p.csv", rows).read_bytes())
    (tmp_path / "p.csv.gz").write_bytes(packed[: len(packed) // 2])  # a download cut short
    summary = build([tmp_path / "p.csv.gz"], tmp_path / "out")
    broken = [f for f in failures(tmp_path / "out") if f["reason"] == "unreadable_input"]
    assert len(broken) == 1 and "p.csv.gz could not be read after record" in broken[0]["detail"]
    assert 0 < summary.written < 400 and summary.rows == summary.written + summary.failed + summary.duplicates


@pytest.mark.parametrize("content", [b"not a tar at all", b"truncated"])
def test_a_shard_that_is_not_a_readable_tar_is_one_line(tmp_path, small_shards, capsys, content):
    folder = tmp_path / "loose"
    folder.mkdir()
    tar = (small_shards / "00000.tar").read_bytes()
    (folder / "00000.tar").write_bytes(content if content != b"truncated" else tar[: len(tar) // 2 + 7])
    err = _one_line_error(capsys, ["train", "model.name=vlp-micro", f"data.sources=[{{shards: '{folder}'}}]",
                                   f"train.output_dir={tmp_path / 'run'}"])
    assert "00000.tar: not a readable tar shard" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("manifest, needle", [
    ({"shards": [{"name": "../../outside.tar", "samples": 1}]}, "not a plain .tar file name"),
    ({"shards": [{"name": "00000.tar", "samples": -3}]}, "greater than or equal to 0"),
    ({"shards": "all of them"}, "shards"),
    ([1, 2, 3], "a JSON object"),
])
def test_a_hostile_manifest_is_one_line_for_every_reader(tmp_path, small_shards, capsys, manifest, needle):
    counts = {"rows": 2, "written": 2, "failed": 0, "duplicates": 0}
    (small_shards / "manifest.json").write_text(json.dumps({**counts, **manifest} if isinstance(manifest, dict)
                                                           else manifest))
    for argv in (["shards", "verify", str(small_shards)], ["shards", "inspect", str(small_shards)],
                 ["train", "model.name=vlp-micro", f"data.sources=[{{shards: '{small_shards}'}}]",
                  f"train.output_dir={tmp_path / 'run'}"]):
        err = _one_line_error(capsys, argv)
        assert "manifest.json" in err and needle in err, (argv, err)


def test_an_eval_suite_cannot_run_a_shell_command(tmp_path, capsys):
    marker = tmp_path / "ran"
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"name": "s", "tasks": [{
        "name": "t", "type": "zeroshot_classification",
        "dataset": {"format": "wds", "path": f"pipe:touch {marker}"}}]}))
    err = _one_line_error(capsys, ["eval", "--model", "vlp-micro", "--random-init", "--suite", str(suite),
                                   "--out", str(tmp_path / "report")])
    assert "pipe:touch" in err and not marker.exists() and not (tmp_path / "report").exists()


def test_eval_never_writes_its_report_into_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.json").write_text("my own report")
    err = _one_line_error(capsys, ["eval", "--model", "vlp-micro", "--random-init", "--out", str(out)])
    assert "not empty and was not made by vlp" in err and (out / "report.json").read_text() == "my own report"


# One user error per command and kind of input: each must be one line, never a traceback.
ONE_LINE_ERRORS = [
    (["shards", "build", "{tmp}/nonexistent.csv", "--output", "{tmp}/o"], "no such file"),
    (["shards", "build", "--config", "{tmp}/latin1.yaml"], "not UTF-8"),
    (["shards", "build", "{tmp}/latin1.yaml", "--output", "{tmp}/o"], "unknown format"),
    (["shards", "build", "{tmp}/p.csv", "--output", "{tmp}/o", "--workers", "-1"], "workers"),
    (["shards", "verify", "{tmp}"], "no manifest.json"),
    (["shards", "inspect", "{tmp}/nonexistent"], "no manifest.json"),
    (["train", "--config", "{tmp}/latin1.yaml"], "not UTF-8"),
    (["train", "train.output_dir={tmp}/p.csv"], "is a file"),
    (["train", "optim.lr=inf"], "optim.lr"),
    (["eval", "--model", "vlp-micro", "--batch-size", "0"], "batch_size"),
    (["eval", "--model", "vlp-micro", "--batch-size", "-5"], "batch_size"),
    (["eval", "--model", "{tmp}/nonexistent", "--out", "{tmp}/r"], "unknown model"),
    (["eval", "--model", "vlp-micro", "--random-init", "--suite", "{tmp}/latin1.yaml", "--out", "{tmp}/r"],
     "latin1.yaml"),
    (["export", "{tmp}/nonexistent", "--out", "{tmp}/x.safetensors"], "no model.safetensors"),
    (["export", "{tmp}/p.csv", "--out", "{tmp}/x.safetensors"], "safetensors"),
    (["demo", "--config", "{tmp}/latin1.yaml"], "not UTF-8"),
    (["demo", "train.output_dir={tmp}/p.csv"], "p.csv"),
    (["launch", "--dry-run", "launch.nodes=0"], "launch.nodes"),
    (["launch", "--dry-run", "launch.launcher=mpi"], "launch.launcher"),
    (["launch", "launch.nodes=2", "launch.node_rank=2"], "launch.node_rank (2) must be < launch.nodes (2)"),
    (["launch", "launch.launcher=deepspeed", "launch.nodes=2", "launch.hostfile={tmp}/none"],
     "no such file (DeepSpeed would silently train on this machine alone)"),
    (["launch", "launch.launcher=deepspeed", "launch.nodes=2"], "needs launch.hosts (vlp writes the hostfile)"),
    (["launch", "--dry-run", "launch.launcher=deepspeed", "launch.nodes=2", "launch.hosts=a,b,c"],
     "launch.hosts names 3 host(s), launch.nodes is 2"),
    (["launch", "--dry-run", "launch.launcher=deepspeed", "launch.nodes=2", "launch.procs_per_node=2",
      "launch.hostfile={tmp}/hostfile"],
     "lists 1 host(s), launch.nodes is 2"),
    (["launch", "launch.launcher=deepspeed", "launch.procs_per_node=8", "launch.hostfile={tmp}/hostfile"],
     "gpu1 has slots=2, launch.procs_per_node is 8"),
]


@pytest.mark.parametrize("argv, needle", ONE_LINE_ERRORS, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else "")
def test_user_errors_are_one_line_in_every_command(tmp_path, capsys, argv, needle):
    (tmp_path / "latin1.yaml").write_bytes("caption: café\n".encode("latin-1"))
    write_csv(tmp_path / "p.csv", [{"url": "a.png", "caption": "a"}])
    (tmp_path / "hostfile").write_text("gpu1 slots=2\n")
    err = _one_line_error(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert err.startswith("vlp") and needle in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------------ bounded decode memory


class RecordingBudget(PixelBudget):
    """The real budget, remembering the most pixels it ever let through at once."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.peak = 0

    @contextlib.contextmanager
    def hold(self, pixels: int):
        with super().hold(pixels):
            self.peak = max(self.peak, self.in_use)
            time.sleep(0.01)  # keep the pixels a moment, so concurrent decodes would overlap
            yield


def test_a_decode_larger_than_the_budget_waits_to_be_alone():
    budget = PixelBudget(100)
    events: list[str] = []
    big_in, release = threading.Event(), threading.Event()

    def big():
        with budget.hold(80):
            events.append("big in")
            big_in.set()
            release.wait(10)
        events.append("big out")

    def small():
        big_in.wait(10)
        with budget.hold(30):
            events.append("small in")

    threads = [threading.Thread(target=big), threading.Thread(target=small)]
    for t in threads:
        t.start()
    big_in.wait(10)
    time.sleep(0.2)
    assert events == ["big in"]  # 80 + 30 > 100: the small decode waits
    release.set()
    for t in threads:
        t.join(10)
    assert events == ["big in", "big out", "small in"]
    with budget.hold(10**9):  # larger than the whole budget: runs once nothing else does
        assert budget.in_use == 100
    assert budget.in_use == 0


def test_builder_loader_and_eval_decode_under_the_budget(monkeypatch, tmp_path):
    """Eight threads, images of 10k pixels, a budget of 15k: never two full-size images at once."""
    from vlp.data_tools.build import row_options
    from vlp.data_tools.pipeline import process_row
    from vlp.data_tools.readers import Row
    from vlp.eval.image_refs import ImageRef, load_image

    import vlp.core.images as core_images
    from vlp.train.loader.batches import TrainTransform

    paths = [save(noise_image(100, 100, seed=i), tmp_path / f"{i}.png") for i in range(8)]
    for name, work in [
        ("builder", lambda p: process_row(Row(0, "t", 1, str(p), str(p.parent), "a caption"), row_options(options()))),
        ("loader", lambda p: TrainTransform(image_size=32)(p.read_bytes(), 0)),
        ("eval", lambda p: load_image(ImageRef(str(p)))),
    ]:
        budget = RecordingBudget(15_000)
        monkeypatch.setattr(core_images, "_BUDGET", budget)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, paths))
        assert len(results) == 8 and budget.peak == 10_000, name
        assert not any(getattr(r, "reason", None) for r in results), name


# ------------------------------------------------------------------ early checks


def test_a_demo_with_a_missing_suite_or_suite_file_fails_before_synthesis(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    common = [f"demo.data_dir={data}", f"train.output_dir={run}", "demo.pairs=100"]
    err = _one_line_error(capsys, ["demo", *common, "demo.eval_suite=defualt"])
    assert "defualt" in err
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ntasks:\n  - name: ret\n    type: retrieval\n"
                     f"    dataset: {{format: csv, path: {tmp_path / 'gone.csv'}}}\n")
    err = _one_line_error(capsys, ["demo", *common, f"demo.eval_suite={suite}"])
    assert "gone.csv" in err and "no such file" in err
    assert not data.exists() and not run.exists()  # nothing synthesised, nothing claimed


def test_a_train_eval_suite_naming_a_missing_file_fails_before_training(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ntasks:\n  - name: ret\n    type: retrieval\n"
                     f"    dataset: {{format: csv, path: {tmp_path / 'gone.csv'}}}\n")
    err = _one_line_error(capsys, ["train", "model.name=vlp-micro", f"data.sources=[{{shards: '{tmp_path}'}}]",
                                   "train.eval_every=5", f"train.eval_suite={suite}",
                                   f"train.output_dir={tmp_path / 'run'}"])
    assert "gone.csv" in err and not (tmp_path / "run").exists()


def test_index_reads_no_fifo_and_no_endless_file_as_stats(tmp_path):
    """A _stats.json that is a FIFO hung `vlp shards index`; one linked to /dev/zero read without limit."""
    import os

    from test_shards_index import write_img2dataset_folder

    folder = tmp_path / "i2d"
    write_img2dataset_folder(folder)
    (folder / "00000_stats.json").unlink()
    os.mkfifo(folder / "00000_stats.json")
    (folder / "00001_stats.json").unlink()
    (folder / "00001_stats.json").symlink_to("/dev/zero")
    done = subprocess.run([sys.executable, "-m", "vlp", "shards", "index", str(folder)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "00000_stats.json: not a regular file" in done.stdout and "00001_stats.json: not a regular file" in done.stdout
    assert json.loads((folder / "manifest.json").read_text())["written"] == 24  # counted from the tars


# ------------------------------------------------------------------ writes where vlp was not asked to


def test_export_writes_no_file_named_by_the_weights_and_never_into_a_checkpoint(tmp_path, capsys):
    """A model named `settings` overwrote a user's settings.json; exporting over a checkpoint's own weights
    broke that checkpoint's checksum."""
    import torch
    from safetensors.torch import load_file, save_file

    from vlp.core.config import LossConfig, ModelConfig
    from vlp.core.models import create_model
    from vlp.core.weights import META_NAME, read_metadata, write_weights

    torch.manual_seed(0)
    model, *_ = create_model(ModelConfig(name="vlp-micro"), LossConfig())
    weights = tmp_path / "w.safetensors"
    write_weights(model.state_dict(), weights, "vlp-micro")
    renamed = tmp_path / "settings.safetensors"
    save_file(load_file(str(weights)), str(renamed), metadata={**read_metadata(weights), META_NAME: "settings"})
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "settings.json").write_text("mine")
    # "settings" is no model open_clip ships: its config goes beside the export, under the output's name
    assert vlp_main(["export", str(renamed), "--out", str(proj / "model.safetensors")]) == 0
    assert (proj / "settings.json").read_text() == "mine" and (proj / "model.json").is_file()
    (proj / "other.json").write_text("mine too")
    err = _one_line_error(capsys, ["export", str(weights), "--out", str(proj / "other.safetensors")])
    assert "other.json" in err and (proj / "other.json").read_text() == "mine too"
    # a checkpoint's files are checksummed by its mark: no export lands inside one
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "vlp_state.json").write_text("{}")
    err = _one_line_error(capsys, ["export", str(weights), "--out", str(ckpt / "model.safetensors")])
    assert "inside the checkpoint" in err and not (ckpt / "model.safetensors").exists()
    err = _one_line_error(capsys, ["export", str(weights), "--out", str(weights)])
    assert "is the weights being exported" in err


def test_synth_never_writes_into_a_folder_vlp_did_not_make(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "pairs.csv").write_text("my data")
    err = _one_line_error(capsys, ["shards", "synth", "--out", str(out), "--n", "4"])
    assert "not made by vlp" in err and (out / "pairs.csv").read_text() == "my data"
    assert vlp_main(["shards", "synth", "--out", str(tmp_path / "new"), "--n", "4"]) == 0
    assert vlp_main(["shards", "synth", "--out", str(tmp_path / "new"), "--n", "4", "--seed", "1"]) == 0  # its own


def test_launch_init_follows_no_link_out_of_its_folder(tmp_path, capsys):
    site = tmp_path / "site"
    (site / "configs").mkdir(parents=True)
    outside = tmp_path / "outside.yaml"
    (site / "configs" / "default.yaml").symlink_to(outside)  # dangling: exists() is False, a copy would follow it
    err = _one_line_error(capsys, ["launch", "init", str(site)])
    assert "default.yaml" in err and not outside.exists()
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "site2").mkdir()
    (tmp_path / "site2" / "launch").symlink_to(other)  # a folder on the way that leads out
    err = _one_line_error(capsys, ["launch", "init", str(tmp_path / "site2")])
    assert "leads out" in err and not any(other.iterdir())


@pytest.mark.parametrize("mode,peak", [("RGB", 3), ("RGBA", 8), ("LA", 10), ("P+t", 9), ("I;16", 10), ("L", 4)])
def test_the_decode_budget_weighs_each_mode_by_what_its_decode_holds(mode, peak):
    """8 RGBA 9000x9000 PNGs held 2.07 GiB in one build worker, above the per-process bound: the budget
    counted pixels as if every image were RGB."""
    import numpy as np
    from PIL import Image

    from vlp.core import images

    base = "P" if mode == "P+t" else mode
    img = Image.new(base, (300, 200))
    if mode == "P+t":
        img.info["transparency"] = 0
    with images.decoding(img):
        held = images._BUDGET.in_use
    assert images.peak_bytes_per_pixel(img) == peak and held == -(-300 * 200 * peak // 3)
    # and 16-bit grey still maps onto 0..255 as before (integer arithmetic, no float64 copy)
    arr = (np.arange(300 * 200, dtype=np.uint16).reshape(200, 300) * 7) % 65535
    grey = images.to_rgb_pixels(Image.fromarray(arr))  # a uint16 array: mode I;16
    want = np.round(arr.astype(np.float64) * (255.0 / 65535.0))
    assert np.abs(np.asarray(grey)[..., 0].astype(int) - want).max() <= 1


def test_staging_folders_of_a_killed_build_are_removed_by_the_next_one(tmp_path):
    """A killed S3 build left its staging folder in the temp folder for good."""
    import os
    import tempfile
    from pathlib import Path

    from vlp.data_tools.output import BuildOutput

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = Path(tempfile.gettempdir()) / f"vlp-staging-{dead.pid}-abc123"
    left.mkdir()
    (left / "00000.tar").write_bytes(b"half a shard")
    mine = Path(tempfile.gettempdir()) / f"vlp-staging-{os.getpid()}-keep"  # a live process's: kept
    mine.mkdir(exist_ok=True)
    out = BuildOutput("s3://bucket/prefix")
    try:
        assert not left.exists() and mine.exists() and out.local.name.startswith(f"vlp-staging-{os.getpid()}-")
    finally:
        out.close()
        mine.rmdir()


def test_a_run_whose_loss_is_no_longer_finite_stops_in_one_line(tmp_path):
    """NaN losses ran on to the end, exit 0, and metrics.jsonl held NaN (not JSON)."""
    from shard_helpers import tiny_shards

    shards = tiny_shards(tmp_path)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vlp", "train", "model.name=vlp-micro", "data.workers=0",
                           f"data.sources=[{{shards: '{shards}'}}]", "train.batch_size=8", "train.steps=6",
                           "optim.lr=1e30", "optim.warmup_steps=0", f"train.output_dir={out}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "the loss is nan (not finite)" in last or "the loss is inf (not finite)" in last, last
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: 1 / 0)  # strict JSON: no NaN written


# ------------------------------------------------------------------ one line, not a traceback (third pass)


def test_a_torn_build_state_is_one_line(tmp_path):
    save(noise_image(16, 16), tmp_path / "a.png")
    csv_path = write_csv(tmp_path / "p.csv", [{"url": "a.png", "caption": "noise"}])
    build([csv_path], tmp_path / "out")
    (tmp_path / "out" / ".build.json").write_text('{"opt')  # a kill mid-write of an older vlp, or an edit
    with pytest.raises(UserError, match=r"\.build\.json is damaged .*--overwrite"):
        build([csv_path], tmp_path / "out")
    assert build([csv_path], tmp_path / "out", overwrite=True).written == 1


def test_a_pickle_as_pretrained_weights_is_one_line(tmp_path):
    import os
    import pickle

    from vlp.core.config import ModelConfig
    from vlp.core.models import create_model

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weights": os.getcwd}))  # a global: what weights_only refuses
    with pytest.raises(UserError, match=r"model.pretrained.*could not be loaded.*tensors only"):
        create_model(ModelConfig(name="vlp-micro", pretrained=str(evil)))


def test_a_task_name_too_long_for_a_file_name_is_refused():
    from vlp.eval.suite import parse_suite

    task = {"name": "x" * 101, "type": "zeroshot_classification",
            "dataset": {"format": "synthetic", "attribute": "shape", "n": 2}}
    with pytest.raises(UserError, match="at most 100 characters"):
        parse_suite({"name": "s", "tasks": [task]}, "s.yaml")
    parse_suite({"name": "s", "tasks": [{**task, "name": "x" * 100}]}, "s.yaml")


@pytest.mark.parametrize("change", ["model.name=vlp-micro", "train.zero_stage=2", "train.precision=bf16"])
def test_resuming_another_model_or_layout_is_one_line(tmp_path, change):
    from vlp.core.config import RunConfig, dump_config, load
    from vlp.train.checkpoint import check_same_run

    (tmp_path / "config.yaml").write_text(dump_config(load(RunConfig, None, [], {})))
    check_same_run(tmp_path, load(RunConfig, None, [], {}).model_dump())  # the same run resumes
    key, value = change.split("=")
    with pytest.raises(UserError, match=rf"was trained with {key}=\S+, this run has {key}={value}"):
        check_same_run(tmp_path, load(RunConfig, None, [change], {}).model_dump())


@pytest.mark.parametrize("config, wrong", [({"embed_dim": 64, "vision_cfg": {}, "text_cfg": 1.5}, "text_cfg"),
                                           ({"embed_dim": "64", "vision_cfg": {}, "text_cfg": {}}, "embed_dim")])
def test_a_model_config_of_the_wrong_shape_is_one_line(tmp_path, config, wrong):
    """Found by bench/fuzz.py (model_config): a tower config that is not a mapping reached open_clip's code."""
    from vlp.core.config import ModelConfig
    from vlp.core.models import check_model

    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"my-model.json: {wrong} must be"):
        check_model(ModelConfig(config_file=str(path)))



POOL_PROBE = r"""
import resource
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from vlp.core import images

images.return_freed_pixels()
assert Image.core.get_blocks_max() == images.PIXEL_BLOCKS_KEPT
assert Image.core.get_block_size() == images.PIXEL_BLOCK_BYTES

def churn(seed):
    for _ in range(10):
        Image.new("RGB", (600, 500), seed)  # 1.2 MB of pixels (stored 4 bytes each), made and freed

faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with ThreadPoolExecutor(8) as pool:
    list(pool.map(churn, range(8)))  # the pool fills
    before = faults()
    list(pool.map(churn, range(8)))
print(faults() - before)
"""


def test_threaded_decoders_reuse_a_bounded_pool_of_pixel_blocks():
    """Every freed pixel block went back to the OS and the next image faulted all its pages in again: a fifth
    of a build worker's CPU. Pillow now keeps a bounded pool of freed blocks, so a second round of images
    barely faults (without the pool: every page of all 80 images, about 23,000 faults)."""
    out = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True, check=True)
    pages = 80 * 600 * 500 * 4 // 4096
    assert int(out.stdout) < pages // 4
