"""`vlp shards verify DIR`: read every sample back with webdataset and check it.

Checks, per shard listed in manifest.json: the tar is readable by the
webdataset library; each sample has exactly one image, a .txt and a .json;
keys are digits and unique; the image decodes; the .txt equals the caption in
the .json and the .json key equals the sample key; the sample count equals
the manifest's. Across the build: rows == written + failed + duplicates, the
sample total equals `written`, and failures.jsonl has one line per row not
written.

A folder indexed by `vlp shards index` (another tool's shards: img2dataset's,
or bare tars) is checked for what is knowable there: readable tars, sample
counts against the manifest and their total against `written`, unique keys,
one image per sample that decodes, a UTF-8 .txt, and, where a sample has a
.json (img2dataset's: key, url, caption, status, width, ...), that it is an
object whose `key` and `caption`, when present, match the sample; and that
every tar in the folder is listed. Keys need not be digits, and the row and
failure accounting is not checked: failures were not recorded by vlp.

A folder written by `vlp shards curate` holds its sources' samples unchanged
(keys prefixed `SET_` when several shard sets were curated together): its
samples are checked as an indexed folder's, its accounting as a build's, with
removed.jsonl in place of failures.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from vlp.core import storage, wds_stores  # noqa: F401 (wds_stores: webdataset reads object-storage shards)
from vlp.core.errors import UserError
from vlp.core.images import SHARD_IMAGE_EXTS, decode_rgb
from vlp.core.manifest import MANIFEST, Manifest, read_manifest


@dataclass
class VerifyResult:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    indexed: bool = False  # the manifest came from `vlp shards index`

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        note = " (indexed folder: failures were not recorded by vlp, so rows and failures are not checked)" \
            if self.indexed else ""
        if self.ok:
            return f"verify: OK: {self.shards} shards, {self.samples} samples match manifest.json{note}"
        shown = "; ".join(self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        return f"verify: FAILED: {len(self.problems)} problem(s): {shown}{more}{note}"


def load_manifest(folder: str | Path) -> Manifest:
    """The folder's (or object-storage prefix's) manifest.json, validated."""
    path = storage.join(str(folder), MANIFEST)
    if not storage.exists(path):
        raise UserError(f"{folder}: no {MANIFEST} (not a finished vlp shard build; for img2dataset's or "
                        f"other webdataset tars, write one with `vlp shards index {folder}`)")
    return read_manifest(path)


def _members_and_image(sample: dict, needed: tuple[str, ...], problems: list[str], where: str, hint: str = "") -> bool:
    """One image plus the `needed` members, and the image decodes; False when the members are wrong."""
    key = sample["__key__"]
    images = [e for e in SHARD_IMAGE_EXTS if e in sample]
    if len(images) != 1 or any(m not in sample for m in needed):
        members = sorted(k for k in sample if not k.startswith("__"))
        problems.append(f"{where}: sample {key} has members {members}{hint}")
        return False
    try:
        decode_rgb(sample[images[0]])
    except Exception as err:
        problems.append(f"{where}: sample {key} image does not decode ({err})")
    return True


def _check_sample(sample: dict, problems: list[str], where: str) -> None:
    key = sample["__key__"]
    if not key.isdigit():
        problems.append(f"{where}: key {key!r} is not all digits")
    if not _members_and_image(sample, ("txt", "json"), problems, where):
        return
    meta = json.loads(sample["json"])
    caption = sample["txt"].decode("utf-8")
    if meta.get("key") != key:
        problems.append(f"{where}: sample {key} json key is {meta.get('key')!r}")
    if meta.get("caption") != caption:
        problems.append(f"{where}: sample {key} txt differs from json caption")


def _check_other_sample(sample: dict, problems: list[str], where: str) -> None:
    """A sample of an indexed folder (img2dataset's or another tool's): what training needs, and its .json agrees."""
    key = sample["__key__"]
    if not _members_and_image(sample, ("txt",), problems, where, " (one image and a .txt needed)"):
        return
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{where}: sample {key} txt is not UTF-8")
        return
    if "json" not in sample:
        return
    try:
        meta = json.loads(sample["json"])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        problems.append(f"{where}: sample {key} json is not a JSON object")
        return
    # curating several shard sets together prefixes each key with its set ("1_000000012"); the json keeps the source's
    if "key" in meta and str(meta["key"]) not in (key, key.partition("_")[2]):
        problems.append(f"{where}: sample {key} json key is {meta['key']!r}")
    if isinstance(meta.get("caption"), str) and meta["caption"] != caption:
        problems.append(f"{where}: sample {key} txt differs from json caption")


def _check_shard(path: str, expected: int, seen_keys: set[str], problems: list[str], indexed: bool = False) -> int:
    count = 0
    check = _check_other_sample if indexed else _check_sample
    name = path.rsplit("/", 1)[-1]
    try:  # a path or an object-storage URL (vlp.core.storage teaches webdataset those)
        for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
            count += 1
            key = sample["__key__"]
            if key in seen_keys:
                problems.append(f"{name}: duplicate key {key}")
            seen_keys.add(key)
            check(sample, problems, name)
    except Exception as err:
        problems.append(f"{name}: unreadable after {count} samples ({type(err).__name__}: {err})")
    if count != expected:
        problems.append(f"{name}: {count} samples, manifest says {expected}")
    return count


def verify_shards(folder: str | Path, progress: bool = True) -> VerifyResult:
    """Check a shard folder, local or at an object-storage URL, against its manifest (module docstring)."""
    folder = str(folder)
    manifest = load_manifest(folder)
    indexed = manifest.source == "index"
    result = VerifyResult(shards=len(manifest.shards), indexed=indexed)
    problems = result.problems
    if not indexed and manifest.rows != manifest.written + manifest.failed + manifest.duplicates:
        problems.append("manifest: rows != written + failed + duplicates")
    keys: set[str] = set()
    for shard in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        path = storage.join(folder, shard.name)
        if not storage.exists(path):
            problems.append(f"{shard.name}: missing")
            continue
        # a curated folder keeps its sources' samples as they were (img2dataset's too), keys prefixed per set
        result.samples += _check_shard(path, shard.samples, keys, problems, indexed or manifest.source == "curate")
    if result.samples != manifest.written:
        problems.append(f"{result.samples} samples in shards, manifest says written={manifest.written}")
    if indexed:  # training reads the manifest's shards only: a tar added since would be left out silently
        listed = {s.name for s in manifest.shards}
        unlisted = sorted(n for n in _names(folder) if n.endswith(".tar") and n not in listed and not n.startswith("."))
        if unlisted:
            problems.append(f"{', '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''}: not in {MANIFEST} "
                            f"(index again with --overwrite)")
        return result
    name = "removed.jsonl" if manifest.source == "curate" else "failures.jsonl"  # one line per row not written
    failures = storage.join(folder, name)
    not_written = manifest.failed + manifest.duplicates
    lines = len(storage.read_bytes(failures).splitlines()) if storage.exists(failures) else 0
    if lines != not_written:
        problems.append(f"{name} has {lines} lines, expected failed + duplicates = {not_written}")
    return result


def _names(folder: str) -> list[str]:
    return storage.names(folder) if storage.is_object_url(folder) else [p.name for p in Path(folder).iterdir()]
