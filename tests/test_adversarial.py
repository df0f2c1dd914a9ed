"""vlp under hostile input and careless use: each test is a repro that once failed.

Real processes, real files and a real HTTP server on loopback; nothing of
vlp's is mocked. (Crafted checkpoints and power loss are in their own tests.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from http_server import serve
from shard_helpers import build, failures, noise_image, read_back, save, write_csv

from vlp.app.cli import main as vlp_main
from vlp.core.atomic import TMP_PREFIX
from vlp.core.errors import UserError
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
