"""The foundation issue's acceptance run: 10k rows, 10% bad of every kind, through the CLI.

9,000 synthetic pairs plus 1,000 bad rows (local files, captions, malformed
CSV records, and http errors from a loopback server) interleaved, built with
worker processes; every row must be accounted for with the right reason and
`vlp shards verify` must pass.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter

import pytest
from http_server import closed_port, serve
from shard_helpers import bomb_png, failures, noise_image
from vlp.data_tools.synth import generate

from vlp.app.cli import main as vlp_main

pytestmark = pytest.mark.slow

BAD_KINDS = [
    "missing_file", "empty_file", "truncated_image", "not_an_image", "decompression_bomb",
    "unsupported_format", "empty_caption", "caption_not_utf8", "caption_too_long", "malformed_row",
    "http_404", "http_500", "timeout", "connection_refused",
]


def _bad_files(folder) -> None:
    folder.mkdir()
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, "JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[:800])
    (folder / "text.png").write_bytes(b"<html>not an image</html>")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")


def _bad_row(kind: str, i: int, base: str, refused: str) -> bytes:
    """One CSV line (bytes: some kinds are not valid UTF-8) with the synth columns."""
    img = "bad/truncated.jpg"
    url, cap = {
        "missing_file": (f"bad/missing_{i}.jpg", "a red circle"),
        "empty_file": ("bad/empty.jpg", "a red circle"),
        "truncated_image": ("bad/truncated.jpg", "a red circle"),
        "not_an_image": ("bad/text.png", "a red circle"),
        "decompression_bomb": ("bad/bomb.png", "a red circle"),
        "unsupported_format": ("bad/drawing.svg", "a red circle"),
        "empty_caption": (img, ""),
        "caption_too_long": (img, "very " * 3000 + "long"),
        "http_404": (f"{base}/status/404", "a red circle"),
        "http_500": (f"{base}/status/500", "a red circle"),
        "timeout": (f"{base}/slow/8/x.png", "a red circle"),
        "connection_refused": (refused, "a red circle"),
    }.get(kind, (img, ""))
    if kind == "caption_not_utf8":
        return b"bad/truncated.jpg,caf\xe9 cr\xe8me,count,{},{},1,{}"
    if kind == "malformed_row":
        return b"bad/truncated.jpg,one,two,three"
    return f"{url},{cap},count,{{}},{{}},1,{{}}".encode()


def test_10k_rows_with_10_percent_bad_rows(tmp_path, capsys):
    data = tmp_path / "synth"
    csv_path = generate(data, n=9000, seed=3, image_size=64, workers=2, progress=False)
    _bad_files(data / "bad")
    good_lines = csv_path.read_bytes().splitlines()
    header, good = good_lines[0], good_lines[1:]
    assert header.decode().split(",")[:2] == ["url", "caption"]

    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(data / "images" / "000000.png", www / "x.png")
    with serve(www) as (base, _):
        refused = f"http://127.0.0.1:{closed_port()}/x.png"
        injected = Counter()
        lines = [header]
        bad_iter = iter(range(1000))
        for i, line in enumerate(good):
            lines.append(line)
            if i % 9 == 8:  # after every 9 good rows, one bad row: 10% of the total
                j = next(bad_iter)
                kind = BAD_KINDS[j % len(BAD_KINDS)]
                injected[kind] += 1
                lines.append(_bad_row(kind, j, base, refused))
        mixed = data / "mixed.csv"
        mixed.write_bytes(b"\n".join(lines) + b"\n")
        out = tmp_path / "shards"
        code = vlp_main(["shards", "build", str(mixed), "--output", str(out), "--image-size", "64",
                         "--shard-size", "2500", "--workers", "2", "--timeout", "2", "--retries", "0",
                         "--keep-cols", "kind,scene,counts,n_objects,hard_negatives", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 10_000
    assert manifest["rows"] == manifest["written"] + manifest["failed"] + manifest["duplicates"]
    assert "(rows == written + failed + duplicates: ok)" in printed
    # each injected kind is reported under its own reason, exactly as many times
    assert manifest["failure_reasons"] == dict(injected)
    assert set(injected) == set(BAD_KINDS)
    records = failures(out)
    assert all(r["reason"] for r in records)
    assert len(records) == manifest["failed"] + manifest["duplicates"]
    # the synthetic images are distinct, so no duplicates, and all 9000 are written
    assert (manifest["written"], manifest["duplicates"]) == (9000, 0)
    with open(csv_path, newline="") as fh:
        scenes = {r["caption"] for r in csv.DictReader(fh)}
    assert len(scenes) > 5000  # several phrasings, many distinct captions

    assert vlp_main(["shards", "verify", str(out), "--quiet"]) == 0
    assert "verify: OK: 4 shards, 9000 samples" in capsys.readouterr().out
