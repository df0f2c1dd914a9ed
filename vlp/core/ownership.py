"""Output folders vlp owns: a marker says vlp made the folder, a lock says who is writing it now.

vlp never deletes or overwrites what it did not write. Before a command writes
into a folder it `claim`s it: a missing or empty folder is created and marked
(`.vlp-owner.json`: which command made it and what it holds); a folder marked
for the same kind of output is reused; anything else - a non-empty folder
without the marker, or one marked for another kind - is refused with a
one-line error. `FolderLock` then holds an exclusive lock (`.vlp-lock`,
holding the writer's pid) for as long as the command writes, so a second
build or training run into the same folder stops at once, naming the pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from vlp import __version__
from vlp.core.atomic import TMP_PREFIX, write_json
from vlp.core.errors import UserError
from vlp.core.smallfiles import read_small

MARKER = ".vlp-owner.json"
LOCK = ".vlp-lock"


def owner(folder: Path) -> dict | None:
    """The folder's marker, or None if vlp did not make it (or the marker is unreadable)."""
    try:
        data = json.loads(read_small(folder / MARKER, "marker", 1 << 20))
    except (OSError, ValueError, UserError):
        return None
    return data if isinstance(data, dict) else None


def claim(folder: str | Path, kind: str, command: str, hint: str) -> Path:
    """Make `folder` ours for output of `kind`, or raise a one-line UserError ending with `hint`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; {hint}")
    mark = owner(folder) if folder.is_dir() else None
    if mark is not None:
        if mark.get("kind") != kind:
            raise UserError(f"{folder} holds vlp {mark.get('kind')!r} output, not {kind}; {hint}")
        return folder
    # vlp's own lock and temporary files do not count: ranks of one command claim the same folder at once
    if folder.is_dir() and any(p.name != LOCK and not p.name.startswith(TMP_PREFIX) for p in folder.iterdir()):
        raise UserError(f"{folder} is not empty and was not made by vlp; {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / MARKER, marker(kind, command))
    except OSError as err:
        raise UserError(f"output {folder}: not writable ({err.strerror or err})") from None
    return folder


def marker(kind: str, command: str) -> dict:
    return {"made_by": "vlp", "kind": kind, "command": command, "version": __version__}


class FolderLock:
    """An exclusive advisory lock on `folder` (flock: released by the kernel if the holder dies)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self._fh: IO[str] | None = None

    def __enter__(self) -> FolderLock:
        fh = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise UserError(f"{self.path.parent} is being written by another vlp process ({holder})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.truncate(0)  # no holder now (the file stays: removing a lock file races with waiters)
            self._fh.flush()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
