"""All-or-nothing writes: a temporary file, fsync, rename, then fsync of the folder.

Every file a reader trusts (shards, their stats, manifests, checkpoint marks,
reports, exported weights) is written here, so a crash or a power loss
leaves the old file or the new one, never a torn one. Temporary files carry
the prefix `TMP_PREFIX`, so cleaning up after a crash touches vlp's own
leftovers only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".vlp-tmp-"


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before the rename."""
    return path.with_name(TMP_PREFIX + path.name)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file handle whose contents appear at `path` only if the block completes."""
    path = Path(path)
    tmp = temp_path(path)
    fh = open(tmp, "wb")  # noqa: SIM115 - closed below on every path
    try:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path`, all or nothing."""
    with atomic_file(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def json_bytes(value: Any, indent: int | None = 2) -> bytes:
    """The one JSON format vlp writes (manifests, stats, state), for files written elsewhere too: strict
    JSON, so a NaN or infinity is an error here rather than a file other readers refuse."""
    return json.dumps(value, indent=indent, allow_nan=False).encode("utf-8")


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """`value` as JSON at `path`, all or nothing."""
    write_atomic(path, json_bytes(value, indent))
