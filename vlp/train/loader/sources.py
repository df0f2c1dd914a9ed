"""Shard sources: from a config's shard specs to a list of shards with sample counts.

A spec may be a folder written by `vlp shards build` (its manifest.json lists
the shards), local or in object storage (`s3://bucket/shards`), a brace
pattern (`/data/{00000..00099}.tar`, `s3://b/{00000..00099}.tar`), a single
path, an http(s) URL or a `pipe:` command, or several of these separated by
`::`. The loader plans exact, equal splits across ranks, so it needs every
shard's sample count, taken from (in order): the source's manifest.json (a
path or URL), per-shard `*_stats.json` files (ours and img2dataset's, local or
in object storage), or a scan of local tar headers. http(s) and `pipe:` shards
without a manifest are a config error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from vlp.core import storage
from vlp.core.config import DataSource
from vlp.core.errors import UserError
from vlp.core.manifest import MANIFEST, read_manifest
from vlp.core.tarformat import count_tar_samples

ALLOW_PIPE = "VLP_ALLOW_PIPE"


@dataclass(frozen=True)
class Shard:
    url: str  # what webdataset's gopen opens: a path, an http URL, or a pipe: command
    samples: int
    source: int  # index into data.sources


def _is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "s3://", "gs://"))


def _manifest_counts(manifest: str, base: str) -> dict[str, int]:
    return {storage.join(base, s.name): s.samples for s in read_manifest(manifest).shards}


def _stats_count(url: str) -> int | None:
    """The sample count in a shard's `_stats.json` (ours and img2dataset's), if it has a usable one."""
    if not url.endswith(".tar") or (storage.protocol(url) and not storage.is_object_url(url)):
        return None
    try:
        count = json.loads(storage.read_bytes(url[: -len(".tar")] + "_stats.json"))["successes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unusable: the tar headers are counted instead
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def _expand(spec: str) -> list[str]:
    urls = []
    for part in spec.split("::"):
        part = part.strip()
        if _is_folder(part):
            manifest = storage.join(part, MANIFEST)
            if storage.exists(manifest):
                urls += list(_manifest_counts(manifest, part))
            elif storage.is_object_url(part):
                urls += [storage.join(part, n) for n in storage.names(part) if n.endswith(".tar")]
            else:
                urls += sorted(str(p) for p in Path(part).glob("*.tar"))
        else:
            urls += list(braceexpand.braceexpand(part))
    return urls


def _is_folder(part: str) -> bool:
    """A local folder, or an object-storage prefix (a URL without braces that names no .tar)."""
    if storage.is_object_url(part):
        return "{" not in part and not part.endswith(".tar")
    return not _is_remote(part) and Path(part).is_dir()


def resolve_source(source: DataSource, index: int) -> list[Shard]:
    urls = _expand(source.shards)
    if not urls:
        raise UserError(f"data.sources.{index}.shards: no shards match {source.shards!r}")
    known: dict[str, int] = {}
    if source.manifest:
        if not storage.exists(source.manifest):
            raise UserError(f"data.sources.{index}.manifest: no such file {source.manifest}")
        by_name = {k.rsplit("/", 1)[-1]: v for k, v in _manifest_counts(source.manifest, ".").items()}
        known = {u: by_name[u.rsplit("/", 1)[-1]] for u in urls if u.rsplit("/", 1)[-1] in by_name}
    for spec_part in source.shards.split("::"):
        part = spec_part.strip()
        if _is_folder(part) and storage.exists(storage.join(part, MANIFEST)):
            known.update(_manifest_counts(storage.join(part, MANIFEST), part))
    shards = []
    for url in urls:
        count = known.get(url)
        if count is None and storage.is_object_url(url):
            count = _stats_count(url)
        elif count is None and not _is_remote(url):
            if not Path(url).is_file():
                raise UserError(f"data.sources.{index}.shards: no such shard {url}")
            count = _stats_count(url)
            if count is None:
                count = count_tar_samples(url)
        if count is None:
            raise UserError(
                f"data.sources.{index}: sample count of {url} unknown; give data.sources.{index}.manifest"
            )
        shards.append(Shard(url, count, index))
    return shards


def check_pipes_allowed(sources: list[DataSource]) -> None:
    """`pipe:` specs run shell commands (webdataset's design): only when the user opted in, outside the config."""
    for i, source in enumerate(sources):
        if "pipe:" in source.shards and os.environ.get(ALLOW_PIPE) != "1":
            raise UserError(f"data.sources.{i}: {source.shards[:60]!r} runs a shell command; a config may come "
                            f"from elsewhere, so vlp runs pipe: sources only with {ALLOW_PIPE}=1 in the environment")


def resolve_sources(sources: list[DataSource]) -> list[list[Shard]]:
    """Every source's shards with counts; fails before training on a missing or empty source."""
    check_pipes_allowed(sources)
    resolved = [resolve_source(s, i) for i, s in enumerate(sources)]
    for i, shards in enumerate(resolved):
        if sum(s.samples for s in shards) == 0:
            raise UserError(f"data.sources.{i}: the shards hold no samples")
    return resolved
