"""`vlp shards verify DIR`: read every sample back with webdataset and check it.

Checks, per shard listed in manifest.json: the tar is readable by the
webdataset library; each sample has exactly one image, a .txt and a .json;
keys are digits and unique; the image decodes; the .txt equals the caption in
the .json and the .json key equals the sample key; the sample count equals
the manifest's. Across the build: rows == written + failed + duplicates, the
sample total equals `written`, and failures.jsonl has one line per row not
written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from vlp.core.errors import UserError
from vlp.core.images import SHARD_IMAGE_EXTS, decode_rgb
from vlp.core.manifest import MANIFEST, Manifest, read_manifest


@dataclass
class VerifyResult:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.ok:
            return f"verify: OK: {self.shards} shards, {self.samples} samples match manifest.json"
        shown = "; ".join(self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        return f"verify: FAILED: {len(self.problems)} problem(s): {shown}{more}"


def load_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST} (not a finished vlp shard build)")
    return read_manifest(path)


def _check_sample(sample: dict, problems: list[str], where: str) -> None:
    key = sample["__key__"]
    images = [e for e in SHARD_IMAGE_EXTS if e in sample]
    if not key.isdigit():
        problems.append(f"{where}: key {key!r} is not all digits")
    if len(images) != 1 or "txt" not in sample or "json" not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        problems.append(f"{where}: sample {key} has members {members}")
        return
    try:
        decode_rgb(sample[images[0]])
    except Exception as err:
        problems.append(f"{where}: sample {key} image does not decode ({err})")
    meta = json.loads(sample["json"])
    caption = sample["txt"].decode("utf-8")
    if meta.get("key") != key:
        problems.append(f"{where}: sample {key} json key is {meta.get('key')!r}")
    if meta.get("caption") != caption:
        problems.append(f"{where}: sample {key} txt differs from json caption")


def _check_shard(path: Path, expected: int, seen_keys: set[str], problems: list[str]) -> int:
    count = 0
    try:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            count += 1
            key = sample["__key__"]
            if key in seen_keys:
                problems.append(f"{path.name}: duplicate key {key}")
            seen_keys.add(key)
            _check_sample(sample, problems, path.name)
    except Exception as err:
        problems.append(f"{path.name}: unreadable after {count} samples ({type(err).__name__}: {err})")
    if count != expected:
        problems.append(f"{path.name}: {count} samples, manifest says {expected}")
    return count


def verify_shards(folder: str | Path, progress: bool = True) -> VerifyResult:
    folder = Path(folder)
    manifest = load_manifest(folder)
    result = VerifyResult(shards=len(manifest.shards))
    problems = result.problems
    if manifest.rows != manifest.written + manifest.failed + manifest.duplicates:
        problems.append("manifest: rows != written + failed + duplicates")
    keys: set[str] = set()
    for shard in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        path = folder / shard.name
        if not path.is_file():
            problems.append(f"{shard.name}: missing")
            continue
        result.samples += _check_shard(path, shard.samples, keys, problems)
    if result.samples != manifest.written:
        problems.append(f"{result.samples} samples in shards, manifest says written={manifest.written}")
    failures = folder / "failures.jsonl"
    not_written = manifest.failed + manifest.duplicates
    lines = len(failures.read_text().splitlines()) if failures.is_file() else 0
    if lines != not_written:
        problems.append(f"failures.jsonl has {lines} lines, expected failed + duplicates = {not_written}")
    return result
