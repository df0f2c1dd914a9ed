"""Writing one shard: the tar, its per-row record and its stats, each atomically.

Layout, the same as img2dataset's webdataset output so either tool's shards
feed our loader:

    00000.tar          {key}.jpg|webp|png, {key}.txt, {key}.json per sample,
                       members of a sample contiguous, keys digits only
    00000.parquet      one record per input row of the shard, failures too
    00000_stats.json   counts for the shard; written last, so its presence
                       means the shard is complete (resume relies on this)

Files are written under a temporary name, fsynced and renamed (vlp.core.atomic), so a kill -9 never
leaves a file that looks complete but is not. Tar headers carry a fixed
mtime/owner so the same input gives byte-identical shards.

The tar members are those webdataset's TarWriter writes (tested byte for byte), written with the
standard library's tarfile: importing webdataset imports torch, seconds of start-up that a build,
which trains nothing, need not pay.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlp.core.atomic import fsync_dir, temp_path, write_atomic, write_json

RECORD_FIELDS = [
    ("row", pa.int64()),
    ("input", pa.string()),
    ("line", pa.int64()),
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),  # success | failed | duplicate
    ("error_message", pa.string()),  # the reason, for failed and duplicate rows
    ("detail", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("original_width", pa.int64()),
    ("original_height", pa.int64()),
]
RECORD_TEXT_LIMIT = 2000  # an absurd caption is kept in records only as its head


def shard_name(shard: int) -> str:
    return f"{shard:05d}"


# Failure reasons of getting the bytes (vlp.core.fetch, object storage, opt-out); every other reason is of the
# image or caption (img2dataset's failed_to_resize).
DOWNLOAD_REASONS = frozenset({"missing_file", "empty_file", "unreadable_file", "too_large", "timeout",
                              "connection_refused", "connection_error", "bad_redirect", "unsupported_scheme",
                              "storage_error", "opt_out"})


def _download_failure(reason: str) -> bool:
    return reason in DOWNLOAD_REASONS or reason.startswith("http_")


# The three files a finished shard leaves (shard_name + suffix): what an --overwrite may delete.
SHARD_FILE = re.compile(r"^\d{5}(\.tar|\.parquet|_stats\.json)$")


def printable(text: str | None, limit: int = RECORD_TEXT_LIMIT) -> str | None:
    """Text safe for JSON/Parquet: undecodable bytes shown as escapes, length capped."""
    if text is None:
        return None
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text)} chars]"


def _record_schema(keep_cols: tuple[str, ...]) -> pa.Schema:
    extra = [(c, pa.string()) for c in keep_cols if c not in dict(RECORD_FIELDS)]
    return pa.schema(RECORD_FIELDS + extra)


def _as_column_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return printable(value)
    return json.dumps(value, default=str, ensure_ascii=False)


class ShardWriter:
    """Accumulates one shard's samples and records; `close()` makes it complete."""

    def __init__(self, out_dir: Path, shard: int, keep_cols: tuple[str, ...], config: dict | None = None):
        self.out_dir = out_dir
        self.shard = shard
        self.name = shard_name(shard)
        self.keep_cols = keep_cols
        self.tar_path = out_dir / f"{self.name}.tar"
        self._tmp_tar = temp_path(self.tar_path)
        self._stream = open(self._tmp_tar, "wb")  # noqa: SIM115 - closed in close()
        self._tar = tarfile.open(fileobj=self._stream, mode="w|")  # noqa: SIM115 - closed in close()
        self.records: list[dict] = []
        self.samples = 0
        self.counts: Counter = Counter()  # e.g. captions with and without a count (--count-counterfactuals)
        self.config = config  # the build's options, in the stats as img2dataset writes its config

    def add_sample(self, key: str, image: bytes, ext: str, caption: str, meta: dict) -> None:
        meta_bytes = json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")
        self.add_members(key, {ext: image, "txt": caption.encode("utf-8"), "json": meta_bytes})

    def add_members(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: its members contiguous, in sorted-suffix order, with fixed owner, mode and mtime (as
        webdataset's TarWriter writes them). Also a sample copied from another shard, bytes unchanged (curation)."""
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "vlp", "vlp"
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def add_record(self, record: dict) -> None:
        record = {k: (_as_column_text(v) if k in self.keep_cols else v) for k, v in record.items()}
        self.records.append(record)

    def stats(self) -> dict:
        statuses = Counter(r["status"] for r in self.records)
        reasons = Counter(r["error_message"] for r in self.records if r["status"] == "failed")
        rows = [r["row"] for r in self.records]
        return {
            "shard": self.name,
            "count": len(self.records),
            "successes": statuses["success"],
            "failed": statuses["failed"],
            "duplicates": statuses["duplicate"],
            "status_dict": dict(sorted(reasons.items())),
            # img2dataset's own split of the failures (its readers expect both fields)
            "failed_to_download": sum(n for r, n in reasons.items() if _download_failure(r)),
            "failed_to_resize": sum(n for r, n in reasons.items() if not _download_failure(r)),
            "first_row": min(rows) if rows else None,
            "last_row": max(rows) if rows else None,
            **({"counts": dict(sorted(self.counts.items()))} if self.counts else {}),
            **({"config": self.config} if self.config is not None else {}),
        }

    def close(self) -> dict:
        """Finish the shard: tar, then records, then stats (the completion mark)."""
        self._tar.close()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self._tmp_tar, self.tar_path)
        fsync_dir(self.out_dir)
        table = pa.Table.from_pylist(self.records, schema=_record_schema(self.keep_cols))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_atomic(self.out_dir / f"{self.name}.parquet", sink.getvalue().to_pybytes())
        stats = self.stats()
        write_json(self.out_dir / f"{self.name}_stats.json", stats)
        return stats

    def abort(self) -> None:
        self._tar.close()
        self._stream.close()
        self._tmp_tar.unlink(missing_ok=True)
