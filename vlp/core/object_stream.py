"""Read an S3 object front to back with one GET.

fsspec's file objects read an object in ranged GETs of one block each (s3fs: 5-8 MiB), so
a 500 MB shard costs a hundred requests per epoch, each billed and each a chance to be
throttled. A shard is read sequentially, so vlp asks for the whole object once and
streams the response body, the way `aws s3 cp - | tar` would. If the connection drops
mid-way, the stream asks again from where it stopped (a Range GET, pinned to the version
first read: its VersionId, or If-Match on its ETag), a few times, before the error reaches
the reader; an object replaced meanwhile is an error, never bytes of two versions.
"""

from __future__ import annotations

import io

from fsspec.asyn import sync

RETRIES = 3


class ObjectStream(io.RawIOBase):
    """A read-only, forward-only raw stream over one S3 object (wrap it in io.BufferedReader)."""

    def __init__(self, fs, inner: str) -> None:
        super().__init__()
        self.fs = fs  # an s3fs.S3FileSystem: its client, retries and credentials
        self.bucket, self.key, self.version = fs.split_path(inner)
        self.pos = 0
        self.body = None
        self.etag: str | None = None  # of the first response: what a resumed request must still be
        self._request()  # now, so that a missing object or bucket is an error of the open

    def readable(self) -> bool:
        return True

    def _request(self) -> None:
        extra = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self.version:
            extra["VersionId"] = self.version
        elif self.etag:  # the rest of the same object: one replaced meanwhile fails (412), it is never mixed in
            extra["IfMatch"] = self.etag
        response = sync(self.fs.loop, self.fs._call_s3, "get_object", Bucket=self.bucket, Key=self.key, **extra)
        if not self.version and response.get("VersionId") and response["VersionId"] != "null":
            self.version = response["VersionId"]  # a versioned bucket: later requests name this version
        self.etag = self.etag or response.get("ETag")
        self.body = response["Body"]

    def readinto(self, buffer) -> int:
        for attempt in range(RETRIES + 1):
            try:
                if self.body is None:
                    self._request()
                chunk = sync(self.fs.loop, self.body.read, len(buffer))
                break
            except (FileNotFoundError, PermissionError):
                raise  # the object or the right to it is gone: asking again will not help
            except Exception:  # a dropped connection or a timeout mid-body: ask again from self.pos
                self._drop_body()
                if attempt == RETRIES:
                    raise
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)

    def _drop_body(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_object(fs, inner: str, buffer_size: int = 1 << 20) -> io.BufferedReader:
    return io.BufferedReader(ObjectStream(fs, inner), buffer_size)
