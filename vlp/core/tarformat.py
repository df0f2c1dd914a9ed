"""How tar members group into webdataset samples: the rule every reader of shards shares.

A member's sample key is its name up to the first dot of its basename, and its
extension everything after (webdataset's own `base_plus_ext`, used here so
vlp's readers and the webdataset library can never disagree); the members of
one sample are contiguous. A dot in a key therefore splits a sample, which is
why the shard builder writes digit-only keys.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable

from webdataset.tariterators import base_plus_ext

from vlp.core.errors import UserError

_META = re.compile(r"__[^/]*__($|/)")  # names webdataset's tar reader skips


def split_member(name: str) -> tuple[str, str] | None:
    """'dir/000012.jpg' -> ('dir/000012', 'jpg'); None for a name without an extension."""
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext)


def count_samples(members: Iterable[tarfile.TarInfo]) -> int:
    """Samples among a tar's members: its distinct keys."""
    return len({parts[0] for m in members if m.isfile() and (parts := split_member(m.name))})


def count_tar_samples(path: str) -> int:
    """Samples in a local tar."""
    try:
        with tarfile.open(path) as tar:
            return count_samples(tar)
    except (tarfile.TarError, OSError, EOFError) as err:  # not a tar, truncated, unreadable
        raise UserError(f"{path}: not a readable tar shard ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def sample_offsets(path: str) -> list[int] | None:
    """The byte offset of each sample's first member header in a local, uncompressed tar, samples
    counted as webdataset's reader groups them (regular files, `__meta__` names skipped, a new
    sample where the key changes); None if the file cannot be read as such (then read it through).

    Reading the headers seeks past the members' data, so this costs a small part of a read;
    opening a shard at a sample's offset gives a valid tar stream from that sample on.
    """
    offsets: list[int] = []
    current = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = member.name
                if not member.isreg() or _META.match(name) or ("/" not in name and name.startswith("__")
                                                                and name.endswith("__")):
                    continue
                parts = split_member(name)
                if parts is None:
                    continue
                if parts[0] != current:
                    offsets.append(member.offset)
                    current = parts[0]
    except (tarfile.TarError, OSError, EOFError):
        return None
    return offsets
