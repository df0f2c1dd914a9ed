"""The shard builder: input formats, image handling, captions, dedup, manifest, determinism."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from shard_helpers import build, failures, noise_image, read_back, save, tree_bytes, write_csv
from vlp.data_tools.verify import verify_shards


@pytest.fixture
def pairs(tmp_path):
    """Six images of different sizes with captions, as rows with relative paths."""
    rows = []
    for i in range(6):
        save(noise_image(40 + 10 * i, 30 + 5 * i, seed=i), tmp_path / "img" / f"{i}.jpg", quality=90)
        rows.append({"url": f"img/{i}.jpg", "caption": f"picture number {i}", "label": f"L{i}"})
    return tmp_path, rows


def _captions(out):
    return {s["meta"]["row"]: s["caption"] for s in read_back(out).values()}


EXPECTED = {i: f"picture number {i}" for i in range(6)}


# ------------------------------------------------------------------ input formats


def test_csv_input_round_trips_through_webdataset(pairs):
    root, rows = pairs
    out = root / "out"
    summary = build([write_csv(root / "pairs.csv", rows)], out, keep_cols=("label",))
    assert (summary.rows, summary.written, summary.failed, summary.duplicates) == (6, 6, 0, 0)
    samples = read_back(out)
    assert _captions(out) == EXPECTED
    for key, s in samples.items():
        assert key.isdigit() and s["meta"]["key"] == key
        assert s["meta"]["label"] == f"L{s['meta']['row']}"
        assert s["meta"]["sha256"] and s["meta"]["status"] == "success"
    assert verify_shards(out, progress=False).ok


def test_tsv_and_gzip_inputs(pairs):
    root, rows = pairs
    tsv = write_csv(root / "pairs.tsv", rows, delimiter="\t")
    gz = root / "pairs.tsv.gz"
    gz.write_bytes(gzip.compress(tsv.read_bytes()))
    build([gz], root / "out")
    assert _captions(root / "out") == EXPECTED


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_input(pairs, gz):
    root, rows = pairs
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path = root / ("pairs.jsonl.gz" if gz else "pairs.jsonl")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    build([path], root / "out")
    assert _captions(root / "out") == EXPECTED


@pytest.mark.parametrize("gz", [False, True])
def test_parquet_input(pairs, gz):
    root, rows = pairs
    path = root / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    if gz:
        gzpath = root / "pairs.parquet.gz"
        gzpath.write_bytes(gzip.compress(path.read_bytes()))
        path = gzpath
    build([path], root / "out", keep_cols=("label",))
    samples = read_back(root / "out")
    assert _captions(root / "out") == EXPECTED
    assert {s["meta"]["label"] for s in samples.values()} == {f"L{i}" for i in range(6)}


def test_folder_input_with_txt_captions(tmp_path):
    folder = tmp_path / "folder"
    for i in range(3):
        save(noise_image(40, 40, seed=i), folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"  folder image\n{i}  \n")
    save(noise_image(40, 40, seed=9), folder / "nocaption.png")
    out = tmp_path / "out"
    summary = build([folder], out)
    assert (summary.rows, summary.written, summary.failed) == (4, 3, 1)
    assert sorted(s["caption"] for s in read_back(out).values()) == [f"folder image {i}" for i in range(3)]
    assert [f["reason"] for f in failures(out)] == ["missing_caption"]


def test_several_inputs_are_numbered_in_order(pairs):
    root, rows = pairs
    first = write_csv(root / "a.csv", rows[:4])
    second = root / "b.jsonl"
    second.write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    out = root / "out"
    build([first, second], out, shard_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [3, 3]
    assert _captions(out) == EXPECTED


def test_url_and_caption_columns_are_configurable(pairs):
    root, rows = pairs
    renamed = [{"image": r["url"], "text": r["caption"]} for r in rows]
    build([write_csv(root / "pairs.csv", renamed)], root / "out", url_col="image", caption_col="text")
    assert _captions(root / "out") == EXPECTED


def test_file_urls_and_absolute_paths(pairs):
    root, rows = pairs
    rows = [dict(r) for r in rows]
    rows[0]["url"] = (root / rows[0]["url"]).as_uri()
    rows[1]["url"] = str(root / rows[1]["url"])
    build([write_csv(root / "pairs.csv", rows)], root / "out")
    assert _captions(root / "out") == EXPECTED


# ------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "mode, expected",
    [("no", (300, 200)), ("border", (64, 64)), ("keep_ratio", (96, 64)), ("center_crop", (64, 64))],
)
def test_resize_modes(tmp_path, mode, expected):
    save(noise_image(300, 200), tmp_path / "a.png")
    write_csv(tmp_path / "p.csv", [{"url": "a.png", "caption": "wide"}])
    build([tmp_path / "p.csv"], tmp_path / "out", resize_mode=mode, image_size=64)
    (sample,) = read_back(tmp_path / "out").values()
    assert sample["image"].size == expected
    meta = sample["meta"]
    assert (meta["width"], meta["height"]) == expected
    assert (meta["original_width"], meta["original_height"]) == (300, 200)
    if mode == "border":  # letterboxed: black rows above and below the picture
        arr = np.asarray(sample["image"].convert("RGB"), dtype=int)
        assert arr[:5].max() < 20 and arr[-5:].max() < 20
        assert arr[32].mean() > 60  # the (downscaled noise) picture, mid-grey on average


def test_resize_only_if_bigger_never_upscales(tmp_path):
    save(noise_image(20, 10), tmp_path / "small.png")
    write_csv(tmp_path / "p.csv", [{"url": "small.png", "caption": "small"}])
    build([tmp_path / "p.csv"], tmp_path / "out", resize_mode="keep_ratio", image_size=64,
          resize_only_if_bigger=True)
    (sample,) = read_back(tmp_path / "out").values()
    assert sample["image"].size == (20, 10)


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
def test_encode_formats(tmp_path, fmt):
    save(noise_image(50, 50), tmp_path / "a.png")
    write_csv(tmp_path / "p.csv", [{"url": "a.png", "caption": "x"}])
    build([tmp_path / "p.csv"], tmp_path / "out", encode_format=fmt, encode_quality=80)
    (sample,) = read_back(tmp_path / "out").values()
    assert sample["ext"] == fmt
    assert sample["image"].format == {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt]


def _single_pixel_rgb(tmp_path, img: Image.Image, name: str, **save_kw):
    save(img, tmp_path / name, **save_kw)
    write_csv(tmp_path / "p.csv", [{"url": name, "caption": "x"}])
    out = tmp_path / "out"
    build([tmp_path / "p.csv"], out, resize_mode="no", encode_format="png")
    (sample,) = read_back(out).values()
    assert sample["image"].mode == "RGB"
    return np.asarray(sample["image"])


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    arr = _single_pixel_rgb(tmp_path, rgba, "t.png")
    assert tuple(arr[4, 4]) == (255, 255, 255)
    assert tuple(arr[0, 0]) == (0, 0, 255)


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))
    assert tuple(_single_pixel_rgb(tmp_path, la, "la.png")[2, 2]) == (255, 255, 255)
    shutil.rmtree(tmp_path / "out")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((1, 1), 1)
    arr = _single_pixel_rgb(tmp_path, pal, "p.png", transparency=0)
    assert tuple(arr[5, 5]) == (255, 255, 255) and tuple(arr[1, 1]) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    arr = _single_pixel_rgb(tmp_path, cmyk, "c.jpg", quality=95)
    r, g, b = arr[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr16 = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    img = Image.fromarray(arr16)
    assert img.mode.startswith("I")
    arr = _single_pixel_rgb(tmp_path, img, "g16.png")
    assert abs(int(arr[3, 3, 0]) - 128) <= 1


def test_exif_orientation_is_applied(tmp_path):
    img = noise_image(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save(img, tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    write_csv(tmp_path / "p.csv", [{"url": "r.jpg", "caption": "rotated"}])
    build([tmp_path / "p.csv"], tmp_path / "out", resize_mode="no")
    (sample,) = read_back(tmp_path / "out").values()
    assert sample["image"].size == (30, 60)
    assert (sample["meta"]["original_width"], sample["meta"]["original_height"]) == (30, 60)


def test_size_and_aspect_filters(tmp_path):
    save(noise_image(10, 10), tmp_path / "tiny.png")
    save(noise_image(200, 20), tmp_path / "long.png")
    save(noise_image(50, 40), tmp_path / "ok.png")
    rows = [{"url": n, "caption": n} for n in ("tiny.png", "long.png", "ok.png")]
    write_csv(tmp_path / "p.csv", rows)
    out = tmp_path / "out"
    build([tmp_path / "p.csv"], out, min_image_size=16, max_aspect_ratio=3.0)
    assert {f["url"]: f["reason"] for f in failures(out)} == {
        "tiny.png": "image_too_small", "long.png": "aspect_ratio_too_large"}
    assert [s["caption"] for s in read_back(out).values()] == ["ok.png"]


# ------------------------------------------------------------------ captions and dedup


def test_caption_normalisation(tmp_path):
    save(noise_image(20, 20, seed=1), tmp_path / "a.png")
    save(noise_image(20, 20, seed=2), tmp_path / "b.png")
    rows = [
        {"url": "a.png", "caption": "  caf\u00c3\u00a9   au \t lait \n"},  # mojibake + messy spaces
        {"url": "b.png", "caption": "word " * 200},
    ]
    write_csv(tmp_path / "p.csv", rows)
    build([tmp_path / "p.csv"], tmp_path / "out", caption_max_chars=50)
    caps = _captions(tmp_path / "out")
    assert caps[0] == "café au lait"
    assert len(caps[1]) <= 50 and caps[1].endswith("word") and "  " not in caps[1]


def test_exact_duplicates_are_removed_first_occurrence_wins(tmp_path):
    save(noise_image(30, 30, seed=1), tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "a_copy.png")
    save(noise_image(30, 30, seed=2), tmp_path / "b.png")
    rows = [{"url": u, "caption": u} for u in ("a.png", "b.png", "a_copy.png", "a.png")]
    write_csv(tmp_path / "p.csv", rows)
    out = tmp_path / "out"
    s = build([tmp_path / "p.csv"], out)
    assert (s.written, s.duplicates) == (2, 2)
    dups = [f for f in failures(out) if f["status"] == "duplicate"]
    assert [(d["row"], d["detail"]) for d in dups] == [(2, "same image as row 0"), (3, "same image as row 0")]
    s2 = build([tmp_path / "p.csv"], tmp_path / "out2", dedup=False)
    assert (s2.written, s2.duplicates) == (4, 0)


# ------------------------------------------------------------------ manifest, determinism


def test_manifest_counts_and_stats(pairs):
    root, rows = pairs
    rows = rows + [{"url": "img/none.jpg", "caption": "gone", "label": "x"}, dict(rows[0])]
    out = root / "out"
    build([write_csv(root / "p.csv", rows)], out, shard_size=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("rows", "written", "failed", "duplicates")} == {
        "rows": 8, "written": 6, "failed": 1, "duplicates": 1}
    assert manifest["shards"] == [
        {"name": "00000.tar", "samples": 3, "rows": 3},
        {"name": "00001.tar", "samples": 3, "rows": 3},
        {"name": "00002.tar", "samples": 0, "rows": 2},
    ]
    assert manifest["failure_reasons"] == {"missing_file": 1}
    stats = json.loads((out / "00002_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed"], stats["duplicates"]) == (2, 0, 1, 1)
    table = pq.read_table(out / "00002.parquet").to_pylist()
    assert [r["status"] for r in table] == ["failed", "duplicate"]
    assert verify_shards(out, progress=False).ok


def test_same_input_gives_identical_bytes_whatever_the_worker_count(pairs):
    root, rows = pairs
    csv_path = write_csv(root / "p.csv", rows * 3)  # duplicates included
    build([csv_path], root / "a", shard_size=4, workers=0)
    build([csv_path], root / "b", shard_size=4, workers=2)
    a, b = tree_bytes(root / "a"), tree_bytes(root / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def _worker_cores(workers) -> set[frozenset[int]]:
    """The cores each of a started pool's processes may run on."""
    import os

    return {frozenset(os.sched_getaffinity(pid)) for pid in workers.pool._processes}


def test_one_worker_per_core_pins_each_to_its_own_core_and_fewer_are_left_to_the_kernel(tmp_path, monkeypatch):
    """Pinned only when the build has a worker for every core it may use (the default count): each worker then
    on one core, no two on the same; with fewer workers, or pin_workers off, each may use all of them."""
    import os
    import time

    from shard_helpers import options
    from vlp.data_tools.build import _Workers, row_options
    from vlp.data_tools.readers import Row

    allowed = os.sched_getaffinity(0)
    cores = sorted(allowed)[:2]
    if len(cores) < 2:
        pytest.fail("this test needs a machine with 2 cores")
    os.sched_setaffinity(0, cores)  # the build may use these two: the workers it spawns inherit them
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the workers' core locks: this test's own
    rows = [Row(index=i, source="x.csv", line=i + 1, ref=None, base_dir=".", caption=None, error="no_image")
            for i in range(8)]
    try:
        for n, pin, expected in [(2, True, {frozenset([c]) for c in cores}), (1, True, {frozenset(cores)}),
                                 (2, False, {frozenset(cores)})]:
            workers = _Workers(n, row_options(options()), pin=pin)
            results = workers.map(iter([rows[i:i + 1] for i in range(8)]))
            assert [r.index for _, res in results for r in res] == list(range(8))  # ...and they work
            workers._start()  # map shut its pool down: a fresh one, each of its processes busy a while
            list(workers.pool.map(time.sleep, [0.2] * 4 * n))
            assert _worker_cores(workers) == expected, (n, pin)
            workers.pool.shutdown()
    finally:
        os.sched_setaffinity(0, allowed)


def _hold_core(offered: int, folder: str, conn) -> None:
    """A worker's part: take a core, say which and where this process may now run, hold it until told."""
    import os
    import tempfile

    from vlp.core.processes import take_core

    tempfile.tempdir = folder  # the lock files of this test only
    conn.send((take_core(offered), sorted(os.sched_getaffinity(0))))
    conn.recv()


def test_workers_take_a_core_each_while_there_is_a_free_one(tmp_path):
    """A pool with a process per core (a local build's, or a Ray node offering every core): each locks a core of
    its own and stays on it; a third process (another build's) finds none and stays where the kernel puts it,
    as does a process of a smaller pool; a core is free again once its process ended."""
    import multiprocessing
    import os

    allowed = os.sched_getaffinity(0)
    cores = sorted(allowed)[:2]
    if len(cores) < 2:
        pytest.fail("this test needs a machine with 2 cores")
    os.sched_setaffinity(0, cores)
    context = multiprocessing.get_context("fork")
    held = []

    def start(offered: int):
        mine, theirs = context.Pipe()
        proc = context.Process(target=_hold_core, args=(offered, str(tmp_path), theirs))
        proc.start()
        held.append((proc, mine))
        return mine.recv()

    try:
        first, second = start(2), start(2)
        assert {first[0], second[0]} == set(cores) and first[1] == [first[0]] and second[1] == [second[0]]
        assert start(2) == (None, cores)  # every core taken
        assert start(1) == (None, cores)  # the node offers Ray fewer CPUs than its cores: not pinned
        proc, mine = held[0]
        mine.send("go")
        proc.join()
        assert start(2) == (first[0], [first[0]])  # the ended process's core is free again
    finally:
        for proc, mine in held:
            if proc.is_alive():
                mine.send("go")
                proc.join()
        os.sched_setaffinity(0, allowed)


def test_verify_detects_a_damaged_shard(pairs):
    root, rows = pairs
    out = root / "out"
    build([write_csv(root / "p.csv", rows)], out, shard_size=3)
    tar = out / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:2000])
    result = verify_shards(out, progress=False)
    assert not result.ok
    assert any("00001.tar" in p for p in result.problems)


def test_url_rows_go_to_workers_in_longer_chunks_that_never_straddle_a_shard():
    """A chunk of URLs holds 16 rounds of a worker's threads (the wait is the fetch), a chunk of files 64 rows
    (the chunk's first row decides); no chunk straddles a shard boundary."""
    from vlp.data_tools.build import CHUNK_ROWS, _chunks
    from vlp.data_tools.readers import Row

    def row(i: int, ref: str) -> Row:
        return Row(index=i, source="x.csv", line=i + 1, ref=ref, base_dir=".", caption="c")

    urls = [row(i, f" http://h{i}/a.jpg") for i in range(700)]
    files = [row(700 + i, f"img/{i}.jpg") for i in range(200)]
    part = {"first_row": 0, "first_shard": 0}
    sizes = [len(c) for c in _chunks(urls + files, 500, part, url_rows=16 * 8)]
    # 128 per chunk starting with a URL, cut at the shard boundary (row 500); 64 per chunk starting with a file
    assert sizes == [128, 128, 128, 116, 128, 128, CHUNK_ROWS, CHUNK_ROWS, 16]
    assert sum(sizes) == 900


def test_a_build_imports_neither_torch_nor_webdataset():
    """`vlp shards build` and its worker processes train nothing: torch (which webdataset imports) would cost the
    build's process and each worker seconds of start-up, and every fresh process a crashed chunk is retried in."""
    import subprocess
    import sys

    code = ("import sys, vlp.app.cli, vlp.data_tools.build, vlp.data_tools.pipeline, vlp.data_tools.ray_engine; "
            "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))")
    printed = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert printed.strip() == "[]"


def test_shard_tars_are_webdataset_tar_writers_bytes(tmp_path):
    """The builder writes its tars with tarfile (no webdataset, hence no torch, in a build's process): the bytes
    are those webdataset's TarWriter writes for the same samples, and webdataset reads them back."""
    import io

    import webdataset as wds
    from vlp.data_tools.writer import ShardWriter

    samples = [("000000000", {"jpg": b"\xff\xd8 one", "txt": b"a cat", "json": b'{"k": 1}'}),
               ("000000001", {"png": b"\x89PNG two", "txt": "ünïcode".encode(), "json": b"{}"})]
    writer = ShardWriter(tmp_path, 0, ())
    for key, members in samples:
        writer.add_members(key, members)
    writer.close()
    expected = io.BytesIO()
    with wds.TarWriter(expected, mtime=0, user="vlp", group="vlp", encoder=False) as tar:
        for key, members in samples:
            tar.write({"__key__": key, **members})
    assert (tmp_path / "00000.tar").read_bytes() == expected.getvalue()
    read = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
            for s in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)]
    assert read == [("000000000", ["jpg", "json", "txt"]), ("000000001", ["json", "png", "txt"])]
