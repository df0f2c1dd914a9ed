"""Bad input never crashes a build and never vanishes: each kind has its own reason.

URL cases go through a real HTTP server on loopback.
"""

from __future__ import annotations

import io
import json

import pytest
from http_server import closed_port, serve
from PIL import Image
from shard_helpers import bomb_png, build, failures, noise_image, read_back, save, write_csv
from vlp.data_tools.verify import verify_shards

from vlp.app.cli import main as vlp_main


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise_image(64, 48, seed=seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def bad_local(tmp_path):
    """One file per local bad-input kind, plus a good image; returns (folder, {url: expected reason})."""
    d = tmp_path / "files"
    d.mkdir()
    save(noise_image(40, 40), d / "good.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(_jpeg_bytes()[:1500])
    (d / "text.jpg").write_bytes(b"this is not an image, just text under a .jpg name\n" * 5)
    (d / "bomb.png").write_bytes(bomb_png())
    (d / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    Image.new("RGB", (16, 16), "red").save(d / "icon.ico")
    expected = {
        "files/missing.jpg": "missing_file",
        "files/empty.jpg": "empty_file",
        "files/truncated.jpg": "truncated_image",
        "files/text.jpg": "not_an_image",
        "files/bomb.png": "decompression_bomb",
        "files/vector.svg": "unsupported_format",
        "files/icon.ico": "unsupported_format",
    }
    return tmp_path, expected


def test_every_local_bad_input_kind_lands_in_failures_with_its_reason(bad_local):
    root, expected = bad_local
    rows = [{"url": "files/good.png", "caption": "good"}] + [{"url": u, "caption": "c"} for u in expected]
    out = root / "out"
    summary = build([write_csv(root / "p.csv", rows)], out, max_pixels=50_000_000)
    assert (summary.rows, summary.written, summary.failed) == (len(rows), 1, len(expected))
    assert {f["url"]: f["reason"] for f in failures(out)} == expected
    assert [s["caption"] for s in read_back(out).values()] == ["good"]


def test_bad_captions_and_malformed_rows(tmp_path):
    save(noise_image(20, 20, seed=1), tmp_path / "a.png")
    for i in range(2, 6):
        save(noise_image(20, 20, seed=i), tmp_path / f"{i}.png")
    lines = [
        b"url,caption",
        b"a.png,fine caption",
        b"2.png,",  # empty
        b"3.png,caf\xe9 latin-1 bytes",  # not UTF-8
        b"4.png," + b"x" * 20_000,  # absurdly long
        b"5.png,too,many,fields",  # malformed row
        b'5.png,"an unterminated quote',
    ]
    (tmp_path / "p.csv").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    summary = build([tmp_path / "p.csv"], out)
    assert (summary.rows, summary.written, summary.failed) == (6, 1, 5)
    reasons = [f["reason"] for f in failures(out)]
    assert reasons == ["empty_caption", "caption_not_utf8", "caption_too_long", "malformed_row", "malformed_row"]
    lines_reported = [f["line"] for f in failures(out)]
    assert lines_reported[:4] == [3, 4, 5, 6]
    # the failure record is printable JSON even for bytes that were not UTF-8
    assert verify_shards(out, progress=False).ok


def test_malformed_jsonl_lines(tmp_path):
    save(noise_image(20, 20), tmp_path / "a.png")
    text = "\n".join([
        json.dumps({"url": "a.png", "caption": "ok"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"caption": "no url"}),
    ])
    (tmp_path / "p.jsonl").write_text(text + "\n")
    out = tmp_path / "out"
    s = build([tmp_path / "p.jsonl"], out)
    assert (s.rows, s.written, s.failed) == (4, 1, 3)
    assert [f["reason"] for f in failures(out)] == ["malformed_row"] * 3


def test_http_inputs_success_errors_timeout_refused_and_retry(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "a.jpg").write_bytes(_jpeg_bytes(1))
    (www / "b.jpg").write_bytes(_jpeg_bytes(2))
    (www / "c.jpg").write_bytes(_jpeg_bytes(3))
    with serve(www) as (base, hits):
        refused = f"http://127.0.0.1:{closed_port()}/a.jpg"
        urls = {
            f"{base}/a.jpg": None,
            f"{base}/flaky/1/b.jpg": None,  # one 500, then served: retried
            f"{base}/status/404": "http_404",
            f"{base}/status/500": "http_500",
            f"{base}/slow/3/c.jpg": "timeout",
            refused: "connection_refused",
        }
        rows = [{"url": u, "caption": f"caption {i}"} for i, u in enumerate(urls)]
        out = tmp_path / "out"
        summary = build([write_csv(tmp_path / "p.csv", rows)], out, timeout=1.0, retries=1, threads=8)
        assert hits["/status/404"] == 1  # a 4xx is final: not retried
        assert hits["/status/500"] == 2  # a 5xx is retried (once here)
        assert hits["/flaky/1/b.jpg"] == 2
    assert (summary.written, summary.failed) == (2, 4)
    assert {f["url"]: f["reason"] for f in failures(out)} == {u: r for u, r in urls.items() if r}
    assert sorted(s["caption"] for s in read_back(out).values()) == ["caption 0", "caption 1"]


def test_bad_rows_from_workers_in_parallel_are_all_accounted(bad_local):
    """The same bad inputs through worker processes: nothing lost, nothing crashes."""
    root, expected = bad_local
    rows = [{"url": "files/good.png", "caption": "good"}] + [{"url": u, "caption": "c"} for u in expected] * 5
    out = root / "out"
    summary = build([write_csv(root / "p.csv", rows)], out, workers=2, shard_size=7)
    assert summary.rows == len(rows) == summary.written + summary.failed + summary.duplicates
    assert len(failures(out)) == summary.failed + summary.duplicates
    assert verify_shards(out, progress=False).ok


# ------------------------------------------------------------------ errors before any work


def _cli(capsys, *argv) -> tuple[int, str]:
    code = vlp_main(["shards", "build", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_one_line_errors_before_work(tmp_path, capsys):
    good = write_csv(tmp_path / "p.csv", [{"url": "a.png", "caption": "x"}])
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "nope.csv"), "--output", out], "no such file"),
        ([str(good), "--output", out, "--caption-col", "text"], "no column 'text' (--caption-col)"),
        ([str(good), "--output", out, "--keep-cols", "label"], "no column 'label' (--keep-cols)"),
        ([str(tmp_path / "p.csv"), "--output", str(good / "sub")], "not writable"),
        ([str(good), "--output", out, "--encode-quality", "0"], "--encode-quality"),
    ]
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    cases.append(([str(tmp_path / "data.xlsx"), "--output", out], "unknown format"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    cases.append(([str(tmp_path / "broken.parquet"), "--output", out], "cannot be read as parquet"))
    for argv, needle in cases:
        code, err = _cli(capsys, *argv)
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_refuses_to_mix_builds_without_overwrite(tmp_path, capsys):
    save(noise_image(20, 20), tmp_path / "a.png")
    p = write_csv(tmp_path / "p.csv", [{"url": "a.png", "caption": "x"}])
    out = str(tmp_path / "out")
    assert vlp_main(["shards", "build", str(p), "--output", out, "--workers", "0", "--quiet"]) == 0
    code, err = _cli(capsys, str(p), "--output", out, "--image-size", "64", "--workers", "0")
    assert code == 2 and "--overwrite" in err
    assert vlp_main(["shards", "build", str(p), "--output", out, "--image-size", "64",
                     "--workers", "0", "--overwrite", "--quiet"]) == 0
    (sample,) = read_back(tmp_path / "out").values()
    assert sample["image"].size == (64, 64)
