"""A shard set built in parts: the first build, then appends of new inputs and retries of failed rows.

- `vlp shards build ... --append` numbers the new inputs' rows after the set's last row and
  writes them into new shards after its last shard.
- `vlp shards retry OUT` fetches again the rows whose latest record failed for a passing reason
  (timeouts, connection errors, 429, 5xx: `ShardsRetryConfig.reasons`) into new shards. A
  retried row keeps its row number; its new record supersedes the old one, which stays in its
  shard's Parquet file as it was.

No finished shard is ever rewritten. The build state (.build.json) lists the parts after the
first; a part is finished when manifest.json, replaced atomically at the end of each part, lists
as many. An unfinished part resumes as the first build does: rerun the same command. The
manifest counts each row once, by its latest record, so rows == written + failed + duplicates
holds over the whole history, and failures.jsonl has one line per row still not written.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from vlp.data_tools.readers import Row
from vlp.data_tools.writer import shard_name

from vlp.core import storage
from vlp.core.errors import UserError

BASE_PART = {"kind": "build", "first_shard": 0, "first_row": 0}


def parts_of(state: dict) -> list[dict]:
    """Every part of the build in `state`, the first build's included."""
    return [BASE_PART, *state.get("parts", [])]


def finished_parts(output) -> int:
    """How many parts manifest.json accounts for (0: no manifest yet)."""
    if "manifest.json" not in output.names():
        return 0
    return len(json.loads(output.read("manifest.json")).get("parts", [BASE_PART]))


def retriable(reason: str | None, reasons: list[str]) -> bool:
    return reason is not None and (reason in reasons or (reason.startswith("http_5") and "http_5xx" in reasons))


def _records(output, shard: int, columns: list[str] | None = None) -> list[dict]:
    return pq.read_table(io.BytesIO(output.read(f"{shard_name(shard)}.parquet")), columns=columns).to_pylist()


def superseding(output, parts: list[dict], shards: int) -> dict[int, int]:
    """Row number -> the last shard (of the first `shards`) holding a retry of it."""
    first_retry = min((p["first_shard"] for p in parts if p["kind"] == "retry"), default=shards)
    latest: dict[int, int] = {}
    for i in range(first_retry, shards):
        for rec in _records(output, i, ["row"]):
            latest[rec["row"]] = i
    return latest


def latest_records(output, parts: list[dict], shards: int) -> Iterator[tuple[int, dict]]:
    """(shard, record) for each row's latest record in the first `shards` shards, shard by shard."""
    latest = superseding(output, parts, shards)
    for i in range(shards):
        for rec in _records(output, i):
            if latest.get(rec["row"], i) == i:
                yield i, rec


def retry_rows(output, parts: list[dict], shards: int, reasons: list[str], columns: tuple[str, ...]) -> list[Row]:
    """The rows to fetch again: latest records in the first `shards` shards that failed for one of `reasons`,
    in row order, rebuilt from their records (url, raw caption, kept columns, where relative paths resolve)."""
    rows = []
    for _, rec in latest_records(output, parts, shards):
        if rec["status"] == "failed" and retriable(rec["error_message"], reasons):
            rows.append(Row(rec["row"], rec["input"], rec["line"], rec["url"], base_of(rec["input"]),
                            rec["caption"], {c: rec.get(c) for c in columns}))
    rows.sort(key=lambda r: r.index)
    return [Row(r.index, r.source, r.line, r.ref, r.base_dir, r.caption, r.extra, slot=n) for n, r in enumerate(rows)]


def base_of(source: str) -> str:
    """Where the relative image paths of input `source` (a record's `input`) resolve, as the first build did."""
    if storage.is_object_url(source):
        return source.rsplit("/", 1)[0]
    path = Path(source)
    return str(path if path.is_dir() else path.parent)


def check_finished(output, state: dict, command: str) -> None:
    """A new part starts only on a finished set: one-line error otherwise."""
    parts = parts_of(state)
    if finished_parts(output) != len(parts):
        kind = parts[-1]["kind"]
        rerun = "the build" if kind == "build" else f"the unfinished `vlp shards {kind}`"
        raise UserError(f"{output}: {rerun} is not finished; rerun it before {command}")
