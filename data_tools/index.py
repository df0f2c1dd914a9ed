"""`vlp shards index DIR|URL`: a manifest.json for a webdataset folder vlp did not build.

For img2dataset's output (`00000.tar`, `00000.parquet`, `00000_stats.json`
per shard, no manifest) or a folder of bare tars, so `vlp shards inspect`,
`vlp shards verify` and the training loader's exact split work on it as on a
vlp build. Nothing but manifest.json is written.

- Every tar's samples are counted from its headers (no image is read; the
  shared rule of vlp.core.tarformat), and a tar that cannot be read, or ends
  before its last member or without tar's end-of-archive blocks (a cut-off
  download or copy), is refused.
- A shard's `_stats.json` (img2dataset's `count`, `successes`,
  `failed_to_download`, `failed_to_resize`, `status_dict`, or vlp's own),
  where present and usable, adds what the tar cannot tell: rows attempted
  and failure reasons. Its `successes` must equal the tar's count: a folder
  whose stats and tars disagree was changed after it was written, and is
  refused, naming the shard and both numbers (delete that `_stats.json` to
  index the tar as it is). An unusable `_stats.json` (not JSON, counts
  missing or impossible) is ignored for its shard, and said so.
- The manifest is written through vlp's one schema (vlp.core.manifest),
  atomically, with `"source": "index"`: its counts come from tar headers and
  `_stats.json`, and no failures.jsonl exists (readers check what is
  knowable). A shard's `stats` field says whether a `_stats.json` was used.
- A folder on object storage (`s3://bucket/prefix`) is indexed the same way:
  each tar is streamed once (one GET) to count its samples and find its
  end-of-archive blocks, and the manifest is written with one PUT.
- Refused: a folder that already has a manifest.json (unless overwrite), an
  unfinished vlp build (`.build.json`: rerun its build), a folder without tars.
"""

from __future__ import annotations

import json
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from vlp.core import storage
from vlp.core.atomic import json_bytes
from vlp.core.errors import UserError
from vlp.core.manifest import MANIFEST, Manifest
from vlp.core.tarformat import count_samples, count_tar_samples

STATS_SUFFIX = "_stats.json"
BUILD_STATE = ".build.json"  # an unfinished `vlp shards build` (data_tools.build.STATE_FILE)
END_OF_ARCHIVE = 1024  # two zero blocks close every tar
READERS = 8  # tars counted at once (header reads: I/O-bound on network file systems)


@dataclass(frozen=True)
class ShardStats:
    """What a usable `_stats.json` says about its shard."""

    samples: int
    rows: int
    duplicates: int
    reasons: dict[str, int]


@dataclass
class IndexSummary:
    folder: str
    shards: int = 0
    samples: int = 0
    with_stats: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f"{self.with_stats} with _stats.json, {self.shards - self.with_stats} from tar headers only"
        text = f"index: wrote {storage.join(self.folder, MANIFEST)}: {self.shards} shards, {self.samples} samples ({where})"
        return "\n".join([text, *(f"index: note: {n}" for n in self.notes)])


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def read_stats(tar: str) -> tuple[ShardStats | None, str | None]:
    """The shard's usable stats, or (None, why not) for an unusable file, or (None, None) for none."""
    path = tar[: -len(".tar")] + STATS_SUFFIX
    name = path.rsplit("/", 1)[-1]
    try:
        data = json.loads(storage.read_bytes(path))
    except (FileNotFoundError, IsADirectoryError):
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{name}: not readable JSON ({type(err).__name__}); counted from the tar"
    except UserError as err:  # not a regular file (a FIFO, a link to a device) or too large
        return None, f"{name}: {str(err).rsplit(': ', 1)[-1]}; counted from the tar"
    if not isinstance(data, dict):
        return None, f"{name}: not a JSON object; counted from the tar"
    samples, rows, duplicates = _count(data.get("successes")), _count(data.get("count")), _count(
        data.get("duplicates", 0))
    if samples is None or rows is None or duplicates is None or rows < samples + duplicates:
        return None, f"{name}: no usable successes/count; counted from the tar"
    status = data.get("status_dict")
    reasons = {str(k): v for k, v in status.items() if k != "success" and _count(v)} if isinstance(
        status, dict) else {}
    return ShardStats(samples, rows, duplicates, reasons), None


def _data_end(members: list[tarfile.TarInfo]) -> int:
    """Where the last member's data (padded to tar's 512-byte blocks) ends."""
    return max((m.offset_data + -(-m.size // 512) * 512 for m in members), default=0)


def check_complete(path: Path) -> None:
    """Refuse a tar cut short: the last member's data past the end, or no end-of-archive blocks after it."""
    try:
        size = path.stat().st_size
        with tarfile.open(path) as tar:
            end = _data_end(tar.getmembers())
        with open(path, "rb") as fh:
            fh.seek(end)
            tail = fh.read(END_OF_ARCHIVE)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})"[:300]) from None
    if end > size or tail != bytes(END_OF_ARCHIVE):
        raise UserError(f"{path}: cut short ({size} bytes; no end-of-archive blocks after its last whole member, "
                        f"which ends at byte {end}); download or copy it again")


class _Tail:
    """A reader that remembers how many bytes passed through it and the last few of them."""

    def __init__(self, fh, keep: int = 4 * tarfile.RECORDSIZE):
        self.fh, self.size, self.last = fh, 0, deque(maxlen=keep)

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.size += len(data)
        self.last.extend(data)
        return data


def scan_streamed(url: str) -> int:
    """count_tar_samples + check_complete for a tar in object storage, read front to back once."""
    try:
        with storage.open_read(url) as fh:
            tail = _Tail(fh)
            with tarfile.open(fileobj=tail, mode="r|") as tar:
                members = list(tar)  # headers only: the data is read past, not kept
            end = _data_end(members)
            while tail.read(1 << 20):  # the rest: end-of-archive blocks and the record's padding
                pass
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{url}: not a readable tar shard ({type(err).__name__}: {err})"[:300]) from None
    trailing = tail.size - end  # bytes after the last member: end-of-archive blocks, then padding
    last = bytes(tail.last)
    after = last[-trailing:] if 0 < trailing <= len(last) else b""
    if after[:END_OF_ARCHIVE] != bytes(END_OF_ARCHIVE):
        raise UserError(f"{url}: cut short ({tail.size} bytes; no end-of-archive blocks after its last whole "
                        f"member, which ends at byte {end}); upload or copy it again")
    return count_samples(members)


def _shard(tar: str) -> tuple[dict, ShardStats | None, str | None]:
    if storage.is_object_url(tar):
        samples = scan_streamed(tar)
    else:
        samples = count_tar_samples(tar)
        check_complete(Path(tar))
    stats, note = read_stats(tar)
    name = tar.rsplit("/", 1)[-1]
    if stats is not None and stats.samples != samples:
        raise UserError(f"{tar}: {name[:-len('.tar')]}{STATS_SUFFIX} says {stats.samples} samples (successes), the tar holds "
                        f"{samples}; the folder changed after it was written (delete that {STATS_SUFFIX} to "
                        f"index the tar as it is)")
    entry = {"name": name, "samples": samples, "rows": stats.rows if stats else None, "stats": stats is not None}
    return entry, stats, note


def _file_names(folder: str) -> list[str]:
    if storage.is_object_url(folder):
        return storage.names(folder)
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: no such folder")
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file())


def index_shards(folder: str | Path, overwrite: bool = False) -> IndexSummary:
    """Write manifest.json for the webdataset tars in a folder or URL prefix. See the module docstring."""
    folder = str(folder).rstrip("/") if storage.is_object_url(folder) else str(folder)
    files = set(_file_names(folder))
    if MANIFEST in files and not overwrite:
        raise UserError(f"{folder}: has a {MANIFEST} already (a vlp build or an earlier index); "
                        f"--overwrite replaces it")
    if BUILD_STATE in files:
        raise UserError(f"{folder}: an unfinished `vlp shards build` ({BUILD_STATE}); run the same build again "
                        f"to finish it, which writes the manifest")
    tars = [storage.join(folder, n) for n in sorted(files) if n.endswith(".tar") and not n.startswith(".")]
    if not tars:
        raise UserError(f"{folder}: no .tar shards to index")
    with ThreadPoolExecutor(min(READERS, len(tars))) as pool:
        shards = list(pool.map(_shard, tars))  # the first error, in shard order, is raised
    stats = [s for _, s, _ in shards if s is not None]
    written = sum(entry["samples"] for entry, _, _ in shards)
    rows = sum(s.rows if s else entry["samples"] for entry, s, _ in shards)
    duplicates = sum(s.duplicates for s in stats)
    reasons: dict[str, int] = {}
    for s in stats:
        for reason, n in s.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
    try:
        manifest = Manifest.model_validate({
            "rows": rows, "written": written, "failed": rows - written - duplicates, "duplicates": duplicates,
            "failure_reasons": dict(sorted(reasons.items())), "shards": [entry for entry, _, _ in shards],
            "source": "index",
        })
    except ValidationError as err:  # a tar name the schema refuses (a backslash, ...)
        first = err.errors()[0]
        raise UserError(f"{folder}: {'.'.join(map(str, first['loc']))}: {first['msg']}"[:300]) from None
    storage.write_bytes(storage.join(folder, MANIFEST), json_bytes(manifest.model_dump(mode="json")))
    notes = [note for _, _, note in shards if note]
    return IndexSummary(folder, len(shards), written, len(stats), notes)
