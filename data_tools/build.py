"""Raw pairs -> webdataset shards: planning, parallel processing, writing, resume.

How a build runs:

- Inputs and the output folder are checked before any work (one-line errors).
- Rows are numbered in input order; shard i holds rows [i*S, (i+1)*S) where S
  is --shard-size, and a row's key is its shard plus its offset in the shard.
  Keys and shard contents therefore depend only on the input and options, not
  on timing or the number of workers.
- Worker processes turn chunks of rows into finished samples or failures
  (data_tools.pipeline); a bounded window of chunks is in flight, so memory
  does not grow with the input. Results are consumed in row order by this
  process, the only writer, which also removes exact duplicates (the first
  occurrence in row order wins).
- A shard is complete once its _stats.json exists. A rerun of the same command
  skips complete shards (they are always a prefix, since shards are written in
  order), reloads their image hashes for deduplication and carries on, ending
  with exactly the files an uninterrupted build writes.
- At the end, failures.jsonl and manifest.json are assembled from the shard
  records, and rows == written + failed + duplicates is checked.
- A finished set grows in parts (data_tools.history): `--append` adds new inputs'
  rows and `vlp shards retry` fetches failed rows again, each into new shards.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import re
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm
from vlp.data_tools.captions import CaptionError, normalise_caption
from vlp.data_tools.compositions import compositional_negatives
from vlp.data_tools.counts import count_counterfactuals
from vlp.data_tools.history import (
    BASE_PART,
    check_finished,
    finished_parts,
    latest_records,
    parts_of,
    retry_rows,
)
from vlp.data_tools.output import BuildOutput, localize_inputs
from vlp.data_tools.pipeline import RowOptions, RowResult, init_worker, process_chunk
from vlp.data_tools.politeness import HostLimits
from vlp.data_tools.ray_engine import RayWorkers
from vlp.data_tools.readers import InputFile, Row, iter_rows, open_inputs
from vlp.data_tools.reencode import ImageOptions
from vlp.data_tools.writer import RECORD_FIELDS, ShardWriter, printable, shard_name

from vlp.core import storage
from vlp.core.atomic import TMP_PREFIX, json_bytes
from vlp.core.config import ShardsBuildConfig, ShardsRetryConfig
from vlp.core.errors import UserError
from vlp.core.fetch import FetchOptions, is_url
from vlp.core.processes import die_with_parent

STATE_FILE = ".build.json"
OWN_FILE = re.compile(
    rf"^({re.escape(TMP_PREFIX)})?(\d{{5}}(\.tar|\.parquet|_stats\.json)|manifest\.json|failures\.jsonl|\.build\.json)$"
)
CHUNK_ROWS = 64
# A worker finishes a chunk of URLs only at its slowest answer, its other threads idle meanwhile: a
# chunk of URL rows holds this many rounds of its threads, so that tail is a small share of its time.
URL_CHUNK_ROUNDS = 16
# Record and sample-json fields vlp writes itself: an extra column may not reuse these names.
RESERVED_FIELDS = frozenset(name for name, _ in RECORD_FIELDS)


def fingerprint(cfg: ShardsBuildConfig) -> dict:
    """The options that shape the output (not workers/threads: they only change speed)."""
    return {
        "url_col": cfg.url_col,
        "caption_col": cfg.caption_col,
        "keep_cols": list(cfg.keep_cols),
        "caption_cols": list(cfg.caption_cols),
        **({"count_counterfactuals": True} if cfg.count_counterfactuals else {}),  # off: as before it existed
        **({"compositional_negatives": True} if cfg.compositional_negatives else {}),
        # "no limit" is fingerprinted as it was when it was spelled inf: such builds still resume
        "image": dataclasses.asdict(image_options(cfg)) | {"max_aspect_ratio": str(cfg.max_aspect_ratio or float("inf"))},
        "fetch": dataclasses.asdict(fetch_options(cfg)),
        "caption_max_chars": cfg.caption_max_chars,
        "caption_reject_chars": cfg.caption_reject_chars,
        "dedup": cfg.dedup,
        "shard_size": cfg.shard_size,
    }


def image_options(cfg: ShardsBuildConfig) -> ImageOptions:
    return ImageOptions(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        resize_filter=cfg.resize_filter, encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio, max_pixels=cfg.max_pixels,
    )


def fetch_options(cfg: ShardsBuildConfig) -> FetchOptions:
    return FetchOptions(timeout=cfg.timeout, retries=cfg.retries, max_bytes=cfg.max_bytes,
                        disallowed=tuple(d.lower() for d in cfg.disallowed_header_directives),
                        user_agent_token=cfg.user_agent_token)


def row_options(cfg: ShardsBuildConfig) -> RowOptions:
    share = max(1, cfg.workers)  # each worker process schedules its own rows: the limits are split
    hosts = HostLimits(max(1, cfg.host_concurrency // share), cfg.host_rate / share, cfg.max_retry_after)
    return RowOptions(image_options(cfg), fetch_options(cfg), cfg.caption_max_chars, cfg.caption_reject_chars,
                      cfg.threads, hosts)


@dataclass
class BuildSummary:
    out_dir: Path
    rows: int
    written: int
    failed: int
    duplicates: int
    shards: int
    seconds: float
    resumed_shards: int

    @property
    def consistent(self) -> bool:
        return self.rows == self.written + self.failed + self.duplicates

    def line(self) -> str:
        check = "ok" if self.consistent else "MISMATCH"
        resumed = f", {self.resumed_shards} resumed" if self.resumed_shards else ""
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return (
            f"rows={self.rows} written={self.written} failed={self.failed} duplicates={self.duplicates} "
            f"(rows == written + failed + duplicates: {check}); {self.shards} shards{resumed}; "
            f"{self.seconds:.1f}s ({rate:.0f} rows/s) -> {self.out_dir}"
        )


# ------------------------------------------------------------ output state


def _input_fingerprint(inputs: list[InputFile], origins: dict[str, str]) -> list[dict]:
    out = []
    for inp in inputs:
        if str(inp.path) in origins:  # a copy of an object-storage input: its URL, size and ETag
            out.append(storage.info(origins[str(inp.path)]))
            continue
        st = inp.path.stat()
        out.append({"path": str(inp.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def prepare_output(output: BuildOutput, state: dict, overwrite: bool) -> dict:
    """Refuse to mix two different builds in one (claimed, locked) output folder or URL; the state in force
    (a rerun of a first build that has grown since keeps its parts)."""
    names = output.names()
    if overwrite:
        for name in sorted(n for n in names if OWN_FILE.match(n)):
            output.delete(name)
    elif STATE_FILE in names:
        previous = _read_state(output)
        first = {k: v for k, v in previous.items() if k != "parts"}
        if first != json.loads(json_bytes(state)):  # as stored: tuples are lists there
            raise UserError(
                f"output {output} holds a build of other inputs or options; pass --overwrite to start over"
            )
        if "parts" in previous:
            return previous
    elif any(OWN_FILE.match(n) for n in names):
        raise UserError(f"output {output} holds shards from another build; pass --overwrite to start over")
    _remove_temp_files(output)
    output.write(STATE_FILE, json_bytes(state))
    return state


def _remove_temp_files(output: BuildOutput) -> None:
    """Leftovers of a killed build (only vlp's own temp files)."""
    if not output.remote:
        for p in output.local.glob(TMP_PREFIX + "*"):
            if p.is_file() and OWN_FILE.match(p.name):
                p.unlink()


def _stored_state(output: BuildOutput, command: str) -> dict:
    if STATE_FILE not in output.names():
        raise UserError(f"{command}: {output} holds no vlp shard build to add to (no {STATE_FILE}); "
                        "build it first with `vlp shards build`")
    return _read_state(output)


def _read_state(output: BuildOutput) -> dict:
    """The stored build state, or a one-line error naming it (a torn or edited file)."""
    try:
        state = json.loads(output.read(STATE_FILE))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{output}: {STATE_FILE} is damaged ({type(err).__name__}); pass --overwrite to start "
                        "over") from None
    if not isinstance(state, dict) or not isinstance(state.get("options"), dict):
        raise UserError(f"{output}: {STATE_FILE} is not a vlp build state; pass --overwrite to start over")
    return state


def _start_part(output: BuildOutput, state: dict, part: dict, command: str) -> tuple[dict, dict]:
    """(state, part): the unfinished last part if it is this one (a rerun resumes it), else `part` added
    after the finished ones, its first shard and row where the set ends."""
    part = json.loads(json_bytes(part))  # as stored: tuples are lists there
    parts = parts_of(state)
    last = parts[-1]
    if finished_parts(output) == len(parts) - 1 and {**last, "first_shard": 0, "first_row": 0} == {
            **part, "first_shard": 0, "first_row": 0}:
        _remove_temp_files(output)
        return state, last
    check_finished(output, state, command)
    manifest = json.loads(output.read("manifest.json"))
    part = {**part, "first_shard": len(manifest["shards"]),
            "first_row": manifest["rows"] if part["kind"] == "append" else 0}
    state = {**state, "parts": [*state.get("parts", []), part]}
    output.write(STATE_FILE, json_bytes(state))
    return state, part


def completed_shards(names: set[str]) -> int:
    """How many shards, from 0, are complete (tar + records + stats)."""
    n = 0
    while all(f"{shard_name(n)}{suffix}" in names for suffix in (".tar", ".parquet", "_stats.json")):
        n += 1
    return n


def _load_hashes(output: BuildOutput, shards: int) -> dict[str, int]:
    seen: dict[str, int] = {}
    for i in range(shards):
        table = pq.read_table(io.BytesIO(output.read(f"{shard_name(i)}.parquet")), columns=["row", "status", "sha256"])
        for rec in table.to_pylist():
            if rec["status"] == "success":
                seen.setdefault(rec["sha256"], rec["row"])
    return seen


# ------------------------------------------------------------ processing


def position(row: Row, part: dict) -> int:
    """The row's place in its part: it goes to shard part["first_shard"] + position // shard_size."""
    return row.slot if row.slot is not None else row.index - part["first_row"]


def _chunks(rows: Iterable[Row], shard_size: int, part: dict, url_rows: int = CHUNK_ROWS) -> Iterator[list[Row]]:
    """Rows in chunks that never straddle a shard boundary: CHUNK_ROWS, or `url_rows` when the chunk starts
    with a URL (fetching, not decoding, is then the wait)."""
    chunk: list[Row] = []
    limit = CHUNK_ROWS
    for row in rows:
        if chunk and (len(chunk) == limit or
                      position(row, part) // shard_size != position(chunk[0], part) // shard_size):
            yield chunk
            chunk = []
        if not chunk:
            limit = url_rows if is_url((row.ref or "").strip()) else CHUNK_ROWS
        chunk.append(row)
    if chunk:
        yield chunk


def _crash_results(rows: list[Row], opts: RowOptions) -> list[RowResult]:
    """A chunk that killed its worker twice: find the culprits by halving it, each part in a fresh process, down to
    the rows that kill theirs alone (a few processes per culprit, not one per row of a long chunk of URLs)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=die_with_parent) as solo:
        try:
            return solo.submit(process_chunk, rows, opts).result()
        except BrokenProcessPool:
            if len(rows) == 1:
                return [RowResult(rows[0].index, "worker_crashed", "the decoder process died on this row")]
    half = len(rows) // 2
    return _crash_results(rows[:half], opts) + _crash_results(rows[half:], opts)


class _Workers:
    """Ordered, bounded-window parallel map of process_chunk that survives dead workers.

    If a worker dies (OOM killer, a decoder crash), every chunk in flight is
    lost with the pool: the pool is restarted and those chunks resubmitted. A
    chunk that is in flight at a second crash is halved until its parts, each in
    a fresh process, finish, so only a row that really kills its process fails
    (reason worker_crashed). A chunk whose submit finds the pool already broken
    counts as in flight at that crash.
    """

    def __init__(self, n: int, opts: RowOptions, pin: bool = False):
        self.n, self.opts, self.pin = n, opts, pin
        self.pool: ProcessPoolExecutor | None = None

    def _start(self) -> None:
        # pinned (vlp.core.processes.take_core) when the pool has one worker per core this process may use
        self.pool = ProcessPoolExecutor(self.n, mp_context=get_context("spawn"), initializer=init_worker,
                                        initargs=(self.opts, self.n if self.pin else None))

    def _submit(self, chunk: list[Row], crashes: int) -> tuple[list[Row], Future | list[RowResult], int]:
        if crashes >= 2:
            return chunk, _crash_results(chunk, self.opts), crashes
        try:
            return chunk, self.pool.submit(process_chunk, chunk), crashes
        except BrokenProcessPool as broken:  # a worker died since the last result was read
            lost: Future = Future()  # fails like the chunks in flight, so `map` restarts the pool and resubmits
            lost.set_exception(broken)
            return chunk, lost, crashes

    def map(self, chunks: Iterator[list[Row]]) -> Iterator[tuple[list[Row], list[RowResult]]]:
        if self.n == 0:  # in-process: for debugging and tiny inputs
            for chunk in chunks:
                yield chunk, process_chunk(chunk, self.opts)
            return
        self._start()
        window: deque = deque()
        try:
            while True:
                while len(window) < 4 * self.n and (chunk := next(chunks, None)) is not None:
                    window.append(self._submit(chunk, 0))
                if not window:
                    return
                chunk, pending, crashes = window[0]
                try:
                    results = pending if isinstance(pending, list) else pending.result()
                except BrokenProcessPool:
                    lost = [(c, n + 1) for c, _, n in window]
                    self.pool.shutdown(cancel_futures=True)
                    self._start()
                    window = deque(self._submit(c, n) for c, n in lost)
                    continue
                window.popleft()
                yield chunk, results
        finally:
            self.pool.shutdown(cancel_futures=True)


def _record(row: Row, key: str, result: RowResult) -> dict:
    img = result.image
    return {
        "row": row.index,
        "input": row.source,
        "line": row.line,
        "key": key,
        "url": printable(row.ref),
        "caption": result.caption if result.caption is not None else printable(row.caption),
        "status": "success" if result.reason is None else "failed",
        "error_message": result.reason,
        "detail": printable(result.detail),
        "sha256": result.sha256,
        "width": img.width if img else None,
        "height": img.height if img else None,
        "original_width": img.original_width if img else None,
        "original_height": img.original_height if img else None,
        **row.extra,
    }


def _sample_meta(record: dict, opts: ShardsBuildConfig, extra: dict, counts: Counter) -> dict:
    meta = {k: record[k] for k in ("key", "url", "caption", "status", "error_message", "width", "height",
                                   "original_width", "original_height", "sha256", "row")}
    meta.update({c: extra.get(c) for c in opts.keep_cols})
    if opts.caption_cols:
        meta["captions"] = [record["caption"], *more_captions(extra, opts)]
    if opts.count_counterfactuals:
        swapped = count_counterfactuals(record["caption"])
        counts["captions_with_count" if swapped else "captions_without_count"] += 1
        if swapped:
            meta["hard_negatives"] = {"count": swapped}
    if opts.compositional_negatives:
        found = compositional_negatives(record["caption"])
        counts["captions_with_compositional_negatives" if found else "captions_without_compositional_negatives"] += 1
        if found:
            meta["hard_negatives"] = meta.get("hard_negatives", {}) | found
    return meta


def more_captions(extra: dict, opts: ShardsBuildConfig) -> list[str]:
    """The row's further captions (--caption-cols), each a caption or a JSON list of them, cleaned like the
    main caption; empty or unusable ones are left out (the main caption alone still makes the sample)."""
    found = []
    for col in opts.caption_cols:
        value = extra.get(col)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # a caption that starts with a bracket
        for raw in value if isinstance(value, list) else [value]:
            try:
                found.append(normalise_caption(None if raw is None else str(raw), opts.caption_max_chars,
                                               opts.caption_reject_chars))
            except CaptionError:
                continue
    return found


class _Writer:
    """Consumes results in row order: dedup, keys, shard rollover."""

    def __init__(self, output: BuildOutput, opts: ShardsBuildConfig, seen: dict[str, int], part: dict):
        self.output, self.out, self.opts, self.seen, self.part = output, output.local, opts, seen, part
        self.digits = len(str(opts.shard_size - 1))
        self.current: ShardWriter | None = None

    def add(self, row: Row, result: RowResult) -> None:
        place = position(row, self.part)
        shard = self.part["first_shard"] + place // self.opts.shard_size
        if self.current is None or self.current.shard != shard:
            self.close()
            self.current = ShardWriter(self.out, shard, columns_read(self.opts), fingerprint(self.opts))
        key = f"{shard_name(shard)}{place % self.opts.shard_size:0{self.digits}d}"
        record = _record(row, key, result)
        if result.reason is None:
            first = self.seen.get(result.sha256) if self.opts.dedup else None
            if first is not None:
                record.update(status="duplicate", error_message="duplicate", detail=f"same image as row {first}")
            else:
                self.seen[result.sha256] = row.index
                meta = _sample_meta(record, self.opts, row.extra, self.current.counts)
                self.current.add_sample(key, result.image.data, result.image.ext, result.caption, meta)
        self.current.add_record(record)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            name = self.current.name
            self.output.publish([f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"])  # stats: the mark, last
            self.current = None

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None


# ------------------------------------------------------------ finishing


def _finish(output: BuildOutput, opts: ShardsBuildConfig, inputs: list[str], state: dict) -> dict:
    """Assemble failures.jsonl and manifest.json (written last: the build's completion mark), each row
    counted by its latest record (data_tools.history)."""
    n = completed_shards(output.names())
    parts = parts_of(state)
    shards, totals, reasons, counts = [], Counter(), Counter(), Counter()
    for i in range(n):
        stats = json.loads(output.read(f"{shard_name(i)}_stats.json"))
        shards.append({"name": f"{shard_name(i)}.tar", "samples": stats["successes"], "rows": stats["count"]})
        counts.update(stats.get("counts", {}))
    lines = []
    for _, rec in latest_records(output, parts, n):
        totals.update(rows=1, **{{"success": "written", "failed": "failed"}.get(rec["status"], "duplicates"): 1})
        if rec["status"] == "failed":
            reasons[rec["error_message"]] += 1
        if rec["status"] != "success":
            lines.append(json.dumps({
                "row": rec["row"], "input": rec["input"], "line": rec["line"], "key": rec["key"],
                "url": rec["url"], "status": rec["status"], "reason": rec["error_message"],
                "detail": rec["detail"],
            }, ensure_ascii=False))
    output.write("failures.jsonl", "".join(line + "\n" for line in lines).encode())
    manifest = {
        "format": "vlp-shards/1",
        "rows": totals["rows"],
        "written": totals["written"],
        "failed": totals["failed"],
        "duplicates": totals["duplicates"],
        "failure_reasons": dict(sorted(reasons.items())),
        "shards": shards,
        "inputs": inputs,
        "options": fingerprint(opts),
        **({"counts": dict(sorted(counts.items()))} if counts else {}),
        # a set grown by appends and retries lists its parts (each part's count marks it finished)
        **({"parts": [{k: p[k] for k in ("kind", "first_shard", "first_row")} for p in parts]}
           if len(parts) > 1 else {}),
    }
    output.write("manifest.json", json_bytes(manifest))
    return manifest


def build_shards(opts: ShardsBuildConfig, progress: bool = True) -> BuildSummary:
    """Build (or resume building) shards in `opts.output` from `opts.inputs`. See the module docstring."""
    start = time.perf_counter()
    if not opts.inputs:
        raise UserError("vlp shards build: give at least one input file or folder")
    if not opts.output:
        raise UserError("vlp shards build: --output DIR is required")
    keep = columns_read(opts)
    clash = sorted(set(keep) & (RESERVED_FIELDS | {"captions"} | ({"hard_negatives"} if opts.count_counterfactuals
                                                                 or opts.compositional_negatives else set())))
    if clash:
        flag = "--keep-cols" if clash[0] in opts.keep_cols else "--caption-cols"  # the flag the column came from
        raise UserError(f"{flag} {','.join(clash)}: the sample json already has a field of that name "
                        f"(vlp writes {', '.join(sorted(RESERVED_FIELDS))}); rename the column in the input")
    output = BuildOutput(opts.output)
    try:
        paths, origins = localize_inputs(list(opts.inputs), output.inputs_dir())
        files = open_inputs(paths, opts.url_col, opts.caption_col, keep, origins,
                            dict.fromkeys(opts.caption_cols, "--caption-cols"))
        state = {"options": fingerprint(opts), "inputs": _input_fingerprint(files, origins)}
        names = [inp.origin or str(inp.path) for inp in files]
        rows = iter_rows(files, opts.url_col, opts.caption_col, keep)
        if opts.append:
            return _append(opts, output, state, names, rows, start, progress)
        with output.claim("shards", "vlp shards build", "choose a new --output folder"):
            state = prepare_output(output, state, opts.overwrite)  # inside the lock: another build may be writing
            if len(parts_of(state)) > 1:  # the first build of a set that has grown since: nothing of it to redo
                check_finished(output, state, "this build's rerun")
                return _summary(output, json.loads(output.read("manifest.json")), start, 0)
            return _build(opts, rows, output, BASE_PART, names, state, start, progress)
    finally:
        output.close()


def _append(opts: ShardsBuildConfig, output: BuildOutput, state: dict, names: list[str], rows: Iterator[Row],
            start: float, progress: bool) -> BuildSummary:
    """--append: these inputs' rows after the set's last row, into new shards (data_tools.history)."""
    if opts.overwrite:
        raise UserError("--append adds to the build in --output; --overwrite would delete it: give one of them")
    with output.claim("shards", "vlp shards build --append", "give the folder of a finished `vlp shards build`"):
        stored = _stored_state(output, "vlp shards build --append")
        options = json.loads(json_bytes(state["options"]))  # as stored: tuples are lists there
        if stored["options"] != options:
            differ = sorted(k for k in {*options, *stored["options"]} if options.get(k) != stored["options"].get(k))
            raise UserError(f"--append: {output} was built with other options ({', '.join(differ)}); an appended "
                            "part takes the build's options")
        previous = json.loads(output.read("manifest.json"))["inputs"] if "manifest.json" in output.names() else []
        stored, part = _start_part(output, stored, {"kind": "append", "inputs": state["inputs"], "names": names},
                                   "--append")
        rows = (dataclasses.replace(row, index=part["first_row"] + row.index) for row in rows)
        return _build(opts, rows, output, part, previous + names, stored, start, progress)


def retry_shards(cfg: ShardsRetryConfig, progress: bool = True) -> tuple[int, BuildSummary]:
    """`vlp shards retry`: (rows fetched again, the set's summary after). See data_tools.history."""
    start = time.perf_counter()
    output = BuildOutput(cfg.output)
    try:
        stored = _stored_state(output, "vlp shards retry")
        with output.claim("shards", "vlp shards retry", "give the folder of a finished `vlp shards build`"):
            opts = retry_options(stored["options"], cfg)
            parts = parts_of(stored)
            unfinished = parts[-1] if parts[-1]["kind"] == "retry" and finished_parts(output) == len(parts) - 1 \
                else None
            if unfinished is None:
                check_finished(output, stored, "a retry")
            reasons = unfinished["reasons"] if unfinished else list(cfg.reasons)
            first = unfinished["first_shard"] if unfinished else completed_shards(output.names())
            rows = retry_rows(output, parts, first, reasons, columns_read(opts))
            manifest = json.loads(output.read("manifest.json"))
            if not rows:
                return 0, _summary(output, manifest, start, first)
            stored, part = _start_part(output, stored, {"kind": "retry", "reasons": reasons}, "a retry")
            return len(rows), _build(opts, iter(rows), output, part, manifest["inputs"], stored, start, progress)
    finally:
        output.close()


def retry_options(stored: dict, cfg: ShardsRetryConfig) -> ShardsBuildConfig:
    """The build's options, from its state, with the retry's fetch and parallelism settings."""
    image, fetch = stored["image"], stored["fetch"]
    aspect = float(image.get("max_aspect_ratio", "inf"))
    return ShardsBuildConfig(
        output=cfg.output, url_col=stored["url_col"], caption_col=stored["caption_col"],
        keep_cols=stored["keep_cols"], caption_cols=stored.get("caption_cols", []),
        count_counterfactuals=stored.get("count_counterfactuals", False),
        compositional_negatives=stored.get("compositional_negatives", False),
        **{k: v for k, v in image.items() if k != "max_aspect_ratio"}, max_aspect_ratio=0.0 if aspect == float("inf")
        else aspect, caption_max_chars=stored["caption_max_chars"], caption_reject_chars=stored["caption_reject_chars"],
        dedup=stored["dedup"], shard_size=stored["shard_size"],
        timeout=cfg.timeout or fetch["timeout"], retries=fetch["retries"] if cfg.retries is None else cfg.retries,
        max_bytes=fetch["max_bytes"], disallowed_header_directives=list(fetch.get("disallowed", [])),
        user_agent_token=fetch.get("user_agent_token"), workers=cfg.workers, threads=cfg.threads,
        host_concurrency=cfg.host_concurrency, host_rate=cfg.host_rate, max_retry_after=cfg.max_retry_after,
        engine=cfg.engine, ray_address=cfg.ray_address,
    )


def _summary(output: BuildOutput, manifest: dict, start: float, resumed: int) -> BuildSummary:
    return BuildSummary(output.target, manifest["rows"], manifest["written"], manifest["failed"],
                        manifest["duplicates"], len(manifest["shards"]), time.perf_counter() - start, resumed)


def columns_read(opts: ShardsBuildConfig) -> tuple[str, ...]:
    """The input columns read besides url and caption: --keep-cols, then --caption-cols."""
    return tuple(dict.fromkeys([*opts.keep_cols, *opts.caption_cols]))


def _build(opts: ShardsBuildConfig, rows: Iterator[Row], output: BuildOutput, part: dict, inputs: list[str],
           state: dict, start: float, progress: bool) -> BuildSummary:
    """Write one part's rows (the first build's, an append's or a retry's) after its finished shards."""
    done = completed_shards(output.names())
    seen = _load_hashes(output, done) if opts.dedup else {}
    rows = itertools.islice(rows, (done - part["first_shard"]) * opts.shard_size, None)
    writer = _Writer(output, opts, seen, part)
    bar = tqdm(unit=" rows", desc="build", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    failed = 0
    try:
        workers = (RayWorkers(row_options(opts), opts.ray_address, opts.workers, opts.pin_workers) if opts.engine == "ray"
                   else _Workers(opts.workers, row_options(opts), opts.pin_workers))
        url_rows = max(CHUNK_ROWS, URL_CHUNK_ROUNDS * opts.threads)
        for chunk, results in workers.map(_chunks(rows, opts.shard_size, part, url_rows)):
            for row, result in zip(chunk, results, strict=True):
                writer.add(row, result)
                failed += result.reason is not None
            bar.update(len(chunk))
            bar.set_postfix(failed=failed, refresh=False)
        writer.close()
    except BaseException:
        writer.abort()  # the partial shard is redone on resume
        raise
    finally:
        bar.close()

    manifest = _finish(output, opts, inputs, state)
    summary = _summary(output, manifest, start, done - part["first_shard"])
    if not summary.consistent:
        raise RuntimeError(f"accounting mismatch, please report: {summary.line()}")
    return summary
