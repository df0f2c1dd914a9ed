"""`vlp shards index`: img2dataset's output (and bare tars) adopted as they are, then inspected, verified, trained on.

The img2dataset folder is written here the way img2dataset writes it (its
webdataset writer: webdataset's TarWriter, 9-digit keys of shard and offset,
.jpg/.txt/.json members with its metadata fields, a .parquet of every row and
a _stats.json of counts per shard, no manifest.json).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from shard_helpers import noise_image
from vlp.data_tools.verify import verify_shards

from vlp.app.cli import main
from vlp.core.tarformat import count_tar_samples

REPO = Path(__file__).resolve().parents[1]
# (rows, failed to download, failed to resize) per shard: 8 + 9 + 7 = 24 samples
SHARDS = [(10, 2, 0), (10, 0, 1), (7, 0, 0)]
SAMPLES = 24
DOWNLOAD_ERROR = "<urlopen error [Errno -2] Name or service not known>"
RESIZE_ERROR = "cannot identify image file <_io.BytesIO object at 0x7f>"


def _jpeg(i: int) -> tuple[bytes, int, int]:
    w, h = 32 + i % 5, 24 + i % 3
    buf = io.BytesIO()
    noise_image(w, h, seed=i).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), w, h


def write_img2dataset_folder(out: Path) -> dict[str, str]:
    """img2dataset's webdataset output for 27 rows, 24 downloaded; returns key -> caption of the samples."""
    out.mkdir(parents=True)
    captions = {}
    for shard, (rows, no_download, no_resize) in enumerate(SHARDS):
        records, status = [], {"success": rows - no_download - no_resize}
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as tar:
            for i in range(rows):
                key, url = f"{shard:05d}{i:04d}", f"https://images.example.com/{shard}/{i}.jpg"
                caption = f"a photo of thing {shard}-{i}"
                meta = {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
                        "width": None, "height": None, "original_width": None, "original_height": None,
                        "exif": None, "sha256": None}
                if i < no_download + no_resize:
                    meta.update(status="failed_to_download" if i < no_download else "failed_to_resize",
                                error_message=DOWNLOAD_ERROR if i < no_download else RESIZE_ERROR)
                    status[meta["error_message"]] = status.get(meta["error_message"], 0) + 1
                    records.append(meta)
                    continue
                image, w, h = _jpeg(shard * 100 + i)
                meta.update(width=w, height=h, original_width=w * 4, original_height=h * 4,
                            exif=json.dumps({"Image Make": "Canon"}), sha256=hashlib.sha256(image).hexdigest())
                records.append(meta)
                if shard == 2:  # an older img2dataset run without the caption column saved in the metadata
                    meta = {k: v for k, v in meta.items() if k != "caption"}
                tar.write({"__key__": key, "jpg": image, "txt": caption, "json": json.dumps(meta, indent=4)})
                captions[key] = caption
        pq.write_table(pa.Table.from_pylist(records), out / f"{shard:05d}.parquet")
        stats = {"count": rows, "successes": rows - no_download - no_resize, "failed_to_download": no_download,
                 "failed_to_resize": no_resize, "duration": 1.5, "start_time": 1700000000.0,
                 "end_time": 1700000001.5, "status_dict": status}
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return captions


def vlp(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path) -> Path:
    write_img2dataset_folder(tmp_path / "laion")
    return tmp_path / "laion"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rewrite_member(tar_path: Path, name: str, data: bytes | None) -> None:
    """Replace (or, with None, drop) one member of a tar."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for m, old in members:
            if m.name == name and data is None:
                continue
            new = data if m.name == name else old
            m.size = len(new)
            tar.addfile(m, io.BytesIO(new))


def test_an_img2dataset_folder_is_indexed_verified_and_inspected(folder, capsys):
    code, out, _ = vlp(capsys, "shards", "index", str(folder))
    assert code == 0
    assert out.strip() == f"index: wrote {folder}/manifest.json: 3 shards, 24 samples (3 with _stats.json, 0 from " \
                          f"tar headers only)"
    manifest = _manifest(folder)
    real = [count_tar_samples(str(folder / f"{i:05d}.tar")) for i in range(3)]
    assert real == [8, 9, 7]
    assert [(s["name"], s["samples"], s["rows"], s["stats"]) for s in manifest["shards"]] == [
        ("00000.tar", 8, 10, True), ("00001.tar", 9, 10, True), ("00002.tar", 7, 7, True)]
    assert manifest["source"] == "index" and manifest["format"] == "vlp-shards/1"
    assert (manifest["rows"], manifest["written"], manifest["failed"], manifest["duplicates"]) == (27, 24, 3, 0)
    assert manifest["failure_reasons"] == {DOWNLOAD_ERROR: 2, RESIZE_ERROR: 1}
    assert not (folder / "failures.jsonl").exists()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary left

    code, out, _ = vlp(capsys, "shards", "verify", str(folder), "--quiet")
    assert code == 0, out
    assert out.strip() == ("verify: OK: 3 shards, 24 samples match manifest.json (indexed folder: failures were "
                           "not recorded by vlp, so rows and failures are not checked)")

    code, out, _ = vlp(capsys, "shards", "inspect", str(folder), "--samples", "3")
    assert code == 0
    assert "3 shards" in out and "rows=27 written=24 failed=3 duplicates=0" in out
    assert "_stats.json for 3 of 3 shards" in out and "failures were not recorded by vlp" in out
    assert f"{DOWNLOAD_ERROR[:24]}" in out  # the failure reasons img2dataset counted
    assert "samples per shard: min 7, max 9" in out and "unreadable" not in out
    assert out.count("a photo of thing") == 3


def test_verify_of_an_indexed_folder_finds_damage(folder, capsys):
    assert vlp(capsys, "shards", "index", str(folder))[0] == 0
    good = (folder / "00001.tar").read_bytes()

    _rewrite_member(folder / "00001.tar", "000010005.jpg", b"not a jpeg at all")
    code, out, _ = vlp(capsys, "shards", "verify", str(folder), "--quiet")
    assert code == 1 and "verify: FAILED" in out and "00001.tar: sample 000010005 image does not decode" in out
    assert "failures were not recorded by vlp" in out

    _rewrite_member(folder / "00001.tar", "000010005.txt", None)
    code, out, _ = vlp(capsys, "shards", "verify", str(folder), "--quiet")
    assert code == 1 and "sample 000010005 has members ['jpg', 'json'] (one image and a .txt needed)" in out

    (folder / "00001.tar").write_bytes(good[: len(good) // 2])
    code, out, _ = vlp(capsys, "shards", "verify", str(folder), "--quiet")
    assert code == 1 and "00001.tar: " in out and "manifest says 9" in out

    (folder / "00001.tar").write_bytes(good)
    _rewrite_member(folder / "00002.tar", "000020003.json", json.dumps({"key": "000020004"}).encode())
    code, out, _ = vlp(capsys, "shards", "verify", str(folder), "--quiet")
    assert code == 1 and "sample 000020003 json key is '000020004'" in out

    (folder / "00002.tar").unlink()
    shutil.copy(folder / "00000.tar", folder / "00007.tar")
    code, out, _ = vlp(capsys, "shards", "verify", str(folder), "--quiet")
    assert code == 1 and "00002.tar: missing" in out and "00007.tar: not in manifest.json" in out


def test_verify_keeps_vlp_builds_to_vlps_own_rules(folder, capsys):
    """The same samples under a manifest that claims a vlp build fail vlp's checks: no failures.jsonl, and
    samples without their caption in the .json."""
    assert vlp(capsys, "shards", "index", str(folder))[0] == 0
    manifest = _manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "source": "build"}))
    result = verify_shards(folder, progress=False)
    assert not result.ok and not result.indexed and "not recorded by vlp" not in result.line()
    assert sum("txt differs from json caption" in p for p in result.problems) == 7  # shard 2's samples
    assert "failures.jsonl has 0 lines, expected failed + duplicates = 3" in result.problems


def test_bare_tars_are_counted_from_their_headers(folder, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for i in range(3):
        shutil.copy(folder / f"{i:05d}.tar", bare / f"part-{i}.tar")
    (bare / "readme.txt").write_text("not a shard")
    code, out, _ = vlp(capsys, "shards", "index", str(bare))
    assert code == 0 and "3 shards, 24 samples (0 with _stats.json, 3 from tar headers only)" in out
    manifest = _manifest(bare)
    assert [(s["name"], s["samples"], s["rows"], s["stats"]) for s in manifest["shards"]] == [
        ("part-0.tar", 8, None, False), ("part-1.tar", 9, None, False), ("part-2.tar", 7, None, False)]
    assert (manifest["rows"], manifest["written"], manifest["failed"], manifest["failure_reasons"]) == (24, 24, 0, {})
    code, out, _ = vlp(capsys, "shards", "verify", str(bare), "--quiet")
    assert code == 0 and "verify: OK: 3 shards, 24 samples" in out
    code, out, _ = vlp(capsys, "shards", "inspect", str(bare))
    assert code == 0 and "written=24" in out and "no .parquet records for 3 of 3 shards" in out


def test_unusable_stats_fall_back_to_the_tar_and_are_named(folder, capsys):
    (folder / "00001_stats.json").write_text("{not json")
    (folder / "00002_stats.json").write_text(json.dumps({"count": 7, "successes": "7"}))
    code, out, _ = vlp(capsys, "shards", "index", str(folder))
    assert code == 0 and "1 with _stats.json, 2 from tar headers only" in out
    assert "note: 00001_stats.json: not readable JSON" in out and "note: 00002_stats.json: no usable" in out
    assert [s["samples"] for s in _manifest(folder)["shards"]] == [8, 9, 7]
    assert _manifest(folder)["rows"] == 10 + 9 + 7


def _one_line_error(capsys, *argv: str) -> str:
    code, out, err = vlp(capsys, *argv)
    assert code == 2 and not out and err.count("\n") == 1 and err.startswith("vlp: error: "), err
    return err


def test_index_refuses_what_it_cannot_adopt(folder, tmp_path, capsys):
    assert vlp(capsys, "shards", "index", str(folder))[0] == 0
    before = (folder / "manifest.json").read_bytes()
    assert "has a manifest.json already" in _one_line_error(capsys, "shards", "index", str(folder))
    assert (folder / "manifest.json").read_bytes() == before
    assert vlp(capsys, "shards", "index", str(folder), "--overwrite")[0] == 0
    (folder / "manifest.json").unlink()

    stats = json.loads((folder / "00001_stats.json").read_text())
    (folder / "00001_stats.json").write_text(json.dumps({**stats, "successes": 10}))
    err = _one_line_error(capsys, "shards", "index", str(folder))
    assert "00001.tar: 00001_stats.json says 10 samples (successes), the tar holds 9" in err
    (folder / "00001_stats.json").write_text(json.dumps(stats))

    tar = (folder / "00002.tar").read_bytes()
    (folder / "00002.tar").write_bytes(tar[: len(tar) // 2])  # tarfile itself finds the end missing
    assert "00002.tar: not a readable tar shard" in _one_line_error(capsys, "shards", "index", str(folder))
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        last = t.getmembers()[-1]
    (folder / "00002.tar").write_bytes(tar[: last.offset_data + 512])  # cut after a whole member: only we notice
    assert count_tar_samples(str(folder / "00002.tar")) == 7
    assert "00002.tar: cut short" in _one_line_error(capsys, "shards", "index", str(folder))
    (folder / "00002.tar").write_bytes(b"<html>503 Service Unavailable</html>")
    assert "00002.tar: not a readable tar shard" in _one_line_error(capsys, "shards", "index", str(folder))
    assert not (folder / "manifest.json").exists()

    (tmp_path / "empty").mkdir()
    assert "no .tar shards to index" in _one_line_error(capsys, "shards", "index", str(tmp_path / "empty"))
    assert "no such folder" in _one_line_error(capsys, "shards", "index", str(tmp_path / "nope"))
    (folder / "00002.tar").write_bytes(tar)
    (folder / ".build.json").write_text("{}")
    assert "unfinished `vlp shards build`" in _one_line_error(capsys, "shards", "index", str(folder))


@pytest.mark.slow
def test_training_on_an_indexed_folder_sees_every_sample_once_per_epoch(tmp_path):
    folder = tmp_path / "laion"
    captions = write_img2dataset_folder(folder)
    env_run = [sys.executable, "-m", "vlp"]
    subprocess.run([*env_run, "shards", "index", str(folder)], check=True, capture_output=True, cwd=REPO)
    out = tmp_path / "run"
    proc = subprocess.run([*env_run, "train", "model.name=vlp-micro", f"data.sources=[{{shards: '{folder}'}}]",
                           "data.workers=0", "data.shuffle_buffer=8", "train.batch_size=8", "train.steps=6",
                           "train.checkpoint_every=100", "train.log_keys=true", f"train.output_dir={out}"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for epoch in (steps[:3], steps[3:]):  # 24 samples, batch 8: an epoch is 3 steps, every sample once
        keys = [k for m in epoch for k in m["keys"]]
        assert sorted(keys) == sorted(captions) and len(keys) == SAMPLES
