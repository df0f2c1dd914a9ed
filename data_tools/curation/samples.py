"""The samples of a shard set, read front to back with the webdataset library (local, http or s3).

A shard set is what `data.sources.N.shards` names (a folder, a URL prefix or a
brace spec); several sets are curated together, in the order given. Every
sample is identified by its set, its shard and its position in the shard, so
a sample whose members are broken is still counted (and accounted for).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from vlp.data_tools.curation.copies import thumbnail
from vlp.data_tools.curation.phash import phash
from webdataset import tariterators

from vlp.core import storage, wds_stores  # noqa: F401 (wds_stores: webdataset reads object-storage shards)
from vlp.core.config import DataSource
from vlp.core.images import SHARD_IMAGE_EXTS, ImageError, decode_rgb
from vlp.train.loader.sources import resolve_source

TEXT_EXTS = ("txt", "text", "caption")


@dataclass(frozen=True)
class ShardRef:
    index: int  # position in the list of every shard of every set
    set: int  # which shard set (the order given on the command line)
    url: str
    samples: int  # from the set's manifest, stats or tar headers


def _absolute(url: str) -> str:
    """A local shard by its absolute path: embed and curate may run from different folders."""
    return url if storage.protocol(url) or url.startswith("pipe:") else str(Path(url).resolve())


def list_shards(specs: list[str]) -> list[ShardRef]:
    """Every shard of every set, in order, with its sample count (a one-line error for a bad spec)."""
    out: list[ShardRef] = []
    for set_index, spec in enumerate(specs):
        for shard in resolve_source(DataSource(shards=spec), set_index):
            out.append(ShardRef(len(out), set_index, _absolute(shard.url), shard.samples))
    return out


@dataclass
class Sample:
    key: str
    members: dict[str, bytes]  # extension -> bytes, as in the tar

    @property
    def image(self) -> tuple[str, bytes] | None:
        ext = next((e for e in SHARD_IMAGE_EXTS if e in self.members), None)
        return None if ext is None else (ext, self.members[ext])

    @property
    def caption(self) -> str | None:
        ext = next((e for e in TEXT_EXTS if e in self.members), None)
        return None if ext is None else self.members[ext].decode("utf-8", "replace").strip()


    @property
    def url(self) -> str | None:
        """The source URL or path the builder recorded in the sample's json (img2dataset's `url` field)."""
        try:
            meta = json.loads(self.members.get("json", b"{}"))
        except ValueError:
            return None
        url = meta.get("url") if isinstance(meta, dict) else None
        return url if isinstance(url, str) else None


def read_samples(url: str) -> Iterator[Sample]:
    """A shard's samples in order (one open: one GET for a URL). A read error ends the shard early;
    the caller compares the count with the shard's expected samples."""
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False

    for raw in tariterators.tarfile_samples([{"url": url}], handler=stop):
        yield Sample(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter): bounded work in flight."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def describe(sample: Sample, position: int) -> tuple[dict, Image.Image | None]:
    """A sample's metadata row (embeddings.METADATA_SCHEMA, no CLIP score yet) and its decoded image
    (None, with `error` set, when there is no usable image: it cannot be embedded or judged)."""
    row = {"key": sample.key, "position": position, "caption": sample.caption or "", "clip_score": math.nan,
           "sha256": None, "width": None, "height": None, "phash": None, "thumb": None,
           "url": sample.url, "error": None}
    image = sample.image
    if image is None:
        row["error"] = "no_image"
        return row, None
    ext, data = image
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        pixels = decode_rgb(data, "." + ext)
    except ImageError as err:
        row["error"] = err.reason
        return row, None
    row["width"], row["height"] = pixels.size
    row["phash"] = phash(pixels)
    row["thumb"] = thumbnail(pixels)
    return row, pixels
