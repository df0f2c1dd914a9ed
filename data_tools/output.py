"""Where a build's files go: a local folder, or an object-storage URL staged through a local folder.

The builder always writes a shard into a local folder (`local`): tar, records,
stats, each atomically. For a local output that folder is the output. For an
object-storage output (`s3://bucket/shards`) it is a private staging folder:
each finished shard is uploaded file by file, one PUT each, the `_stats.json`
completion mark last, and then deleted locally, so the staging folder never
holds more than the shard being written. Every other file (the build state,
failures.jsonl, manifest.json last) is written through `write`. Reading back
(resume, the final manifest) goes through `names` and `read`, which see the
output itself.

Ownership is the same rule for both (`claim`): a folder or prefix vlp did not
make is never written into or emptied. What an object store cannot give: an
exclusive lock. Two builds writing one URL at once are not detected; run one
build per output URL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from vlp.core import storage
from vlp.core.errors import UserError
from vlp.core.ownership import FolderLock, claim


def private_dir(kind: str) -> Path:
    """A fresh temporary folder named after this process; ones left by processes that died (a killed
    build) are removed first, so they do not pile up."""
    remove_stale(kind)
    return Path(tempfile.mkdtemp(prefix=f"vlp-{kind}-{os.getpid()}-"))


def remove_stale(kind: str, on_stale: Callable[[Path], None] | None = None) -> None:
    """Remove the private folders of this kind whose process died (`on_stale` first cleans up what such a
    folder records)."""
    for stale in Path(tempfile.gettempdir()).glob(f"vlp-{kind}-*-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            if on_stale is not None:
                on_stale(stale)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to clean
        return True
    return True


class BuildOutput:
    def __init__(self, target: str):
        self.target = target
        self.remote = storage.is_object_url(target)
        self.local = private_dir("staging") if self.remote else Path(target)
        self._inputs: Path | None = None

    def inputs_dir(self) -> Path:
        """A private folder for local copies of object-storage inputs, removed by close(): never the output
        folder itself, which is not claimed yet when inputs are read."""
        if self._inputs is None:
            self._inputs = private_dir("inputs")
        return self._inputs

    def __str__(self) -> str:
        return self.target

    def names(self) -> set[str]:
        if self.remote:
            return set(storage.names(self.target))
        return {p.name for p in self.local.iterdir()} if self.local.is_dir() else set()

    def read(self, name: str) -> bytes:
        return storage.read_bytes(storage.join(self.target, name))

    def write(self, name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(self.target, name), data)

    def delete(self, name: str) -> None:
        if self.remote:
            storage.delete(storage.join(self.target, name))
        else:
            (self.local / name).unlink(missing_ok=True)

    def publish(self, names: list[str]) -> None:
        """Upload staged files in this order (the completion mark last); a local output has them already."""
        if not self.remote:
            return
        for name in names:
            staged = self.local / name
            storage.write_bytes(storage.join(self.target, name), staged.read_bytes())
            staged.unlink()

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
        if self._inputs is not None:
            shutil.rmtree(self._inputs, ignore_errors=True)

    def claim(self, kind: str, command: str, hint: str) -> AbstractContextManager:
        """Make the output ours (vlp.core.ownership) before anything in it is read or deleted;
        the returned context holds the folder's lock (a store has none)."""
        if self.remote:
            self.check_writable()
            storage.claim_url(self.target, kind, command, hint)
            return nullcontext()
        claim(self.local, kind, command, hint)
        return FolderLock(self.local)

    def check_writable(self) -> None:
        """Before any work: the bucket exists and a write is allowed (one small object, then removed)."""
        if not self.remote:
            return
        probe = ".vlp-write-probe"
        self.write(probe, b"")
        self.delete(probe)


def localize_inputs(inputs: list[str], staging: Path) -> tuple[list[str], dict[str, str]]:
    """Inputs at object-storage URLs copied into `staging` (streamed), and local copy -> URL.

    Readers need random access (parquet) and gzip streams; a local copy gives both and
    keeps one reader per format. Relative image paths in such an input resolve against
    the input's URL folder.
    """
    local, origins = [], {}
    for i, text in enumerate(inputs):
        if not storage.protocol(text):
            local.append(text)
            continue
        if not storage.is_object_url(text):
            raise UserError(f"input {text}: inputs are local paths or object-storage URLs (s3://...), "
                            "not http(s); image references inside them may be http(s) URLs")
        if not storage.exists(text):
            raise UserError(f"input {text}: no such object")
        copy = staging / f"{i}-{text.rstrip('/').rsplit('/', 1)[-1]}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        with storage.errors_in_one_line(text), storage.open_read(text) as src, open(copy, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        local.append(str(copy))
        origins[str(copy)] = text
    return local, origins
