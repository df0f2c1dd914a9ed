"""Files vlp reads whole from folders it is given (manifests, stats, markers, configs, benchmark JSON):
regular files only, and never more than a limit.

A name in a folder may be a FIFO (reading it would wait forever for a writer), a link to
/dev/zero (it never ends) or a file far larger than what it claims to be. Every whole-file
read goes through `read_small`, which opens without blocking, checks the open file is a
regular file, and reads at most `limit` bytes: anything else is a one-line UserError naming
the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vlp.core.errors import UserError

DEFAULT_LIMIT = 256 << 20  # a manifest of a million shards fits; /dev/zero does not


def read_small(path: str | Path, what: str = "file", limit: int = DEFAULT_LIMIT) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; FileNotFoundError passes through (callers
    phrase a missing file themselves), every other problem is a UserError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except FileNotFoundError:
        raise
    except OSError as err:
        raise UserError(f"{what} {path}: cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
            raise UserError(f"{what} {path}: {kind}; refused")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{what} {path}: larger than {limit >> 20} MiB; refused")
    return data
