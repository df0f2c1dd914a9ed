"""Small helpers for shard-builder tests: make image files, run builds, read shards back."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from vlp.data_tools.build import build_shards, completed_shards

from vlp.core.config import ShardsBuildConfig


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header that claims a huge image: the decompression-bomb case."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def options(**kw) -> ShardsBuildConfig:
    """Small, fast defaults for tests."""
    return ShardsBuildConfig(**{"image_size": 32, "workers": 0, "threads": 4, **kw})


def build(inputs, out: Path, **kw):
    return build_shards(options(inputs=[str(p) for p in inputs], output=str(out), **kw), progress=False)


def tiny_shards(root: Path, n: int = 48) -> Path:
    """n noise images of 32 px with numbered captions, built into shards under root/shards (for training tests)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        save(noise_image(32, 32, seed=i), root / "img" / f"{i}.png")
        rows.append({"url": f"img/{i}.png", "caption": f"picture number {i}"})
    build([write_csv(root / "p.csv", rows)], root / "shards")
    return root / "shards"


def read_back(out: Path) -> dict[str, dict]:
    """Every sample in the build, read with the webdataset library: key -> sample dict."""
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(s["json"])
        img_ext = next(e for e in ("jpg", "png", "webp") if e in s)
        samples[s["__key__"]] = {
            "caption": s["txt"].decode(),
            "meta": meta,
            "image": Image.open(io.BytesIO(s[img_ext])),
            "ext": img_ext,
        }
    return samples


def failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


def reasons_by_url(out: Path) -> dict[str, str]:
    return {f["url"]: f["reason"] for f in failures(out)}


def tree_bytes(out: Path) -> dict[str, bytes]:
    """All files of a build (not the resume state), for byte-for-byte comparisons."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".build.json"}


def finished_shards(out: Path) -> int:
    """Shards the builder itself counts as complete (a killed build can leave a `.vlp-tmp-` stats file,
    which a glob for `*_stats.json` would count)."""
    return completed_shards({p.name for p in out.iterdir()}) if out.is_dir() else 0
