"""What happens to one input row: caption check, fetch, decode, resize, encode.

This runs in the worker processes. It never raises: every outcome is a
`RowResult`, either a finished sample or a failure with a reason, so one bad
row can never take a build down.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vlp.data_tools.captions import normalise_caption
from vlp.data_tools.politeness import HostLimits, Scheduler, host_of
from vlp.data_tools.readers import Row
from vlp.data_tools.reencode import EncodedImage, ImageOptions, process_image

from vlp.core.errors import RowFailure
from vlp.core.fetch import FetchOptions, RetryLater, fetch, suffix_of
from vlp.core.images import return_freed_pixels
from vlp.core.processes import die_with_parent, take_core


@dataclass(frozen=True)
class RowOptions:
    image: ImageOptions
    fetch: FetchOptions
    caption_max_chars: int = 512
    caption_reject_chars: int = 10_000
    threads: int = 16
    hosts: HostLimits = HostLimits()


@dataclass
class RowResult:
    index: int
    reason: str | None = None  # None: success
    detail: str = ""
    caption: str | None = None
    image: EncodedImage | None = None
    sha256: str | None = None


def process_row(row: Row, opts: RowOptions, attempt: int = 0, defer: bool = False) -> RowResult:
    """One row -> a sample or a failure reason. Cheap checks first: a bad caption is not fetched. With
    `defer`, a host's Retry-After raises RetryLater (the scheduler runs the row again later)."""
    if row.error:
        return RowResult(row.index, row.error, row.detail)
    try:
        caption = normalise_caption(row.caption, opts.caption_max_chars, opts.caption_reject_chars)
        if not row.ref or not row.ref.strip():
            return RowResult(row.index, "missing_reference", "empty image path/URL")
        data = fetch(row.ref.strip(), row.base_dir, opts.fetch, attempt, defer)
        sha = hashlib.sha256(data).hexdigest()
        image = process_image(data, suffix_of(row.ref.strip()), opts.image)
    except RowFailure as err:
        return RowResult(row.index, err.reason, err.detail)
    except RetryLater:
        raise
    except MemoryError:
        return RowResult(row.index, "decode_error", "out of memory while decoding")
    except Exception as err:  # a bug or an exotic file: recorded, never fatal
        return RowResult(row.index, "internal_error", f"{type(err).__name__}: {err}")
    return RowResult(row.index, None, "", caption, image, sha)


# One thread pool per worker process, made on first use: fetches overlap
# network waits, and Pillow releases the GIL while decoding and resizing.
_THREADS: ThreadPoolExecutor | None = None
_OPTS: RowOptions | None = None


def init_worker(opts: RowOptions, pool_size: int | None = None) -> None:
    """`pool_size`: the pool's processes, to keep to a core each when there are as many as cores (None: not)."""
    global _OPTS
    _OPTS = opts
    die_with_parent()
    take_core(pool_size)


def process_chunk(rows: list[Row], opts: RowOptions | None = None) -> list[RowResult]:
    """Process rows concurrently; results come back in input order."""
    global _THREADS
    opts = opts or _OPTS
    assert opts is not None, "init_worker was not called"
    if len(rows) == 1 or opts.threads <= 1:
        return [process_row(r, opts) for r in rows]
    if _THREADS is None:
        return_freed_pixels()  # the threads decode concurrently
        _THREADS = ThreadPoolExecutor(opts.threads, thread_name_prefix="fetch")
    scheduler = Scheduler(opts.hosts, _THREADS, opts.threads)  # per-host limits; results in row order
    return scheduler.run([host_of(r.ref or "") for r in rows],
                         lambda i, attempt: process_row(rows[i], opts, attempt, defer=True))
