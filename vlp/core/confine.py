"""Names that come from outside (object keys, archive members, metadata) kept inside their root.

A listing, an archive or a file's metadata may name a path: `a/../../etc/x`, `/abs`, or a
link that points out of the folder. vlp never lets such a name choose where it writes or
reads: every outside name is normalised and must stay under the folder it belongs to, or
the work stops with a one-line error naming it.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from vlp.core.errors import UserError


def relative_name(name: str, what: str) -> str:
    """`name` normalised to a relative path with no `..` step out of its root, or a UserError.

    Both separators count ('\\' as well as '/'): a name written on one system is read on another.
    """
    text = name.replace("\\", "/")
    if not text or text.startswith("/") or "\x00" in text or ".." in text.split("/"):
        raise UserError(f"{what} {name!r}: not a plain relative name (absolute, empty, or with '..' steps); refused")
    norm = posixpath.normpath(text)
    if norm == ".":
        raise UserError(f"{what} {name!r}: names no file; refused")
    return norm


def inside(root: Path, name: str, what: str) -> Path:
    """`root / name` for an outside `name`, checked to stay under `root` even through existing links."""
    path = root / relative_name(name, what)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise UserError(f"{what} {name!r}: leads out of {root} (through a link); refused")
    return path
