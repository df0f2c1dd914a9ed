"""Reading shards for training: tar streams, opened once and read forward, in lanes.

Reading goes through `webdataset.tariterators` over `gopen` streams, so local
paths, http(s) URLs, object-storage URLs and `pipe:` commands all work, and our
shards and img2dataset's are read the same way. A loader worker's samples come
as pieces of lanes (vlp.train.loader.plan): each lane has its own
`SegmentReader`, which opens a shard once and reads it forward across its
shuffle windows (one GET per shard per lane over HTTP). A local shard is opened
at a lane's first sample by seeking to it (vlp.core.tarformat.sample_offsets);
a remote one is read through to it. A sample that is missing or incomplete
reads as None, for the batch maker to replace and count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from webdataset import tariterators

from vlp.core import storage, wds_stores  # noqa: F401 (wds_stores: webdataset reads object-storage shards)
from vlp.core.images import SHARD_IMAGE_EXTS
from vlp.core.tarformat import sample_offsets
from vlp.train.loader.plan import Piece, Segment

IMAGE_KEYS = SHARD_IMAGE_EXTS
TEXT_KEYS = ("txt", "text", "caption")


class _ReadStop:
    """webdataset error handler: remember the error, stop reading this shard."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def __call__(self, exn: Exception) -> bool:
        self.error = exn
        return False


def _valid(sample: dict) -> bool:
    return any(k in sample for k in IMAGE_KEYS) and any(k in sample for k in TEXT_KEYS)


class ShardStream:
    """One shard, opened once and read forward: samples from the current position on.

    `pos` is the index in the shard of the next sample the stream yields. The
    stream ends at the shard's end or at the first error (`failed`); either
    way it holds no connection or file after that.
    """

    def __init__(self, url: str, start: int = 0):
        self.url, self.pos, self.ended = url, 0, False
        self.stop = _ReadStop()
        # webdataset's url_opener stores the opened stream in this dict, which lets close() close it now
        # (a socket, a curl or pipe: process) instead of whenever the garbage collector gets to it.
        self._source: dict = {"url": url}
        offset = _seek_offset(url, start) if start else None
        if offset is None:  # read from the start (and through to `start`, in take)
            self._samples = tariterators.tarfile_samples([self._source], handler=self.stop)
            return
        fh = open(url, "rb")  # noqa: SIM115 - closed by close()
        fh.seek(offset)
        self._source["stream"] = fh
        self.pos = start
        files = tariterators.tar_file_expander([self._source], handler=self.stop)
        self._samples = tariterators.group_by_keys(files, handler=self.stop)

    @property
    def failed(self) -> bool:
        return self.stop.error is not None

    def take(self, start: int, count: int) -> list[dict | None]:
        """Samples [start, start + count), reading through any before start; None where missing or incomplete."""
        if start < self.pos:
            raise ValueError(f"{self.url}: at sample {self.pos}, cannot go back to {start}")
        out: list[dict | None] = []
        while self.pos < start + count and not self.ended:
            sample = next(self._samples, None)
            if sample is None:
                self.close()
                break
            if self.pos >= start:
                out.append(sample if _valid(sample) else None)
            self.pos += 1
        return out + [None] * (count - len(out))

    def close(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._samples.close()
        stream = self._source.pop("stream", None)
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a pipe's process stopped early by us (SIGPIPE) reports a failure status
                pass


_OFFSETS: dict[str, list[int] | None] = {}  # this process's sample offsets of local shards it has seeked in


def _seek_offset(url: str, start: int) -> int | None:
    """Where sample `start` begins in a local tar shard (None: not a local plain tar, or too short)."""
    if storage.protocol(url) or url.startswith("pipe:") or not os.path.isfile(url):
        return None
    if url not in _OFFSETS:
        if len(_OFFSETS) >= 256:  # a bound on memory: forget the oldest
            _OFFSETS.pop(next(iter(_OFFSETS)))
        _OFFSETS[url] = sample_offsets(url)
    offsets = _OFFSETS[url]
    return offsets[start] if offsets is not None and start < len(offsets) else None


def read_shard(url: str, start: int, count: int) -> list[dict | None]:
    """Samples [start, start + count) of a shard, in one open; None where a sample is missing or incomplete."""
    stream = ShardStream(url, start)
    try:
        return stream.take(start, count)
    finally:
        stream.close()


class SegmentReader:
    """Reads a worker's segments as one stream of sample slots, from any position.

    A shard is opened once per pass: the open stream is kept between reads and
    continues where the last read ended (reads of consecutive windows are
    contiguous), so over HTTP each shard costs one GET per epoch for each
    worker that reads it. The stream is reopened only when the position goes
    back or moves to another shard; a jump forward (resume: `skip`, then
    `read`) reads through to the position in the same, single open. The
    stream is closed when its segment ends, unless the next segment continues
    the same shard where it stopped. A shard that ends early (cut short)
    reads as None slots from there, without another request. A stream that
    stopped on an error (a failed request, a dropped connection, a member
    that breaks webdataset's grouping) is reopened once, at the next read of
    that shard, in case the error was passing; after a second error the rest
    of the shard reads as None slots for the rest of the pass.
    """

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.seg = 0  # current segment
        self.offset = 0  # samples already consumed from it
        self._stream: ShardStream | None = None
        self._retried: set[str] = set()  # shards reopened once after an error, this pass

    def skip(self, n: int) -> None:
        """Move forward n slots without reading (arithmetic over segment sizes)."""
        while n > 0 and self.seg < len(self.segments):
            left = self.segments[self.seg].size - self.offset
            if n < left:
                self.offset += n
                return
            n -= left
            self.seg, self.offset = self.seg + 1, 0

    def read(self, n: int) -> list[dict | None]:
        out: list[dict | None] = []
        while len(out) < n and self.seg < len(self.segments):
            segment = self.segments[self.seg]
            take = min(n - len(out), segment.size - self.offset)
            start = segment.start + self.offset
            out += self._stream_at(segment.shard.url, start).take(start, take)
            self.skip(take)
            if self.offset == 0:  # the segment ended
                self._segment_ended(segment)
        return out

    def _stream_at(self, url: str, start: int) -> ShardStream:
        """The open stream of `url` if it can continue to `start`, else a new one."""
        stream = self._stream
        if stream is not None and stream.failed and url not in self._retried and stream.url == url:
            self._retried.add(url)  # one more try: the error may have been passing
            stream = None
        elif stream is not None and (stream.url != url or stream.pos > start):
            stream = None
        if stream is None:
            self.close()
            stream = self._stream = ShardStream(url, start)
        return stream

    def _segment_ended(self, segment: Segment) -> None:
        nxt = self.segments[self.seg] if self.seg < len(self.segments) else None
        if nxt is None or nxt.shard.url != segment.shard.url or nxt.start != segment.end:
            self.close()

    def close(self) -> None:
        """Close the open shard, if any (also done as segments end)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class PieceReader:
    """A worker's pieces (vlp.train.loader.plan.worker_pieces) read in order as one stream of slots.

    Each lane has its own SegmentReader over its pieces, so each lane reads its shards front
    to back (one open per shard per lane) while the pieces alternate between lanes; `skip`
    is arithmetic, as a SegmentReader's.
    """

    def __init__(self, pieces: list[Piece]):
        self.pieces = pieces
        by_lane: dict[int, list[Segment]] = {}
        for piece in pieces:
            by_lane.setdefault(piece.lane, []).append(piece.segment)
        self.readers = {lane: SegmentReader(segments) for lane, segments in by_lane.items()}
        self.segments = [p.segment for p in pieces]
        self.i, self.offset = 0, 0  # the current piece, and slots already taken from it

    def _runs(self, n: int) -> Iterator[tuple[SegmentReader, int]]:
        """(lane reader, count) for the next n slots, advancing the position."""
        while n > 0 and self.i < len(self.pieces):
            piece = self.pieces[self.i]
            k = min(n, piece.segment.size - self.offset)
            yield self.readers[piece.lane], k
            n, self.offset = n - k, self.offset + k
            if self.offset == piece.segment.size:
                self.i, self.offset = self.i + 1, 0

    def skip(self, n: int) -> None:
        for reader, k in self._runs(n):
            reader.skip(k)

    def read(self, n: int) -> list[dict | None]:
        out: list[dict | None] = []
        for reader, k in self._runs(n):
            out += reader.read(k)
        return out

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
