"""A run folder at an object-storage URL (`train.output_dir=s3://bucket/runs/x`).

DeepSpeed and the checkpoint code write files; an object store takes whole objects. So the run
trains into a local mirror, an ordinary run folder with all its rules (ownership, lock, sealed
checkpoints), and the mirror is copied up at each checkpoint:

- The mirror is `$VLP_CACHE_DIR/runs/<hash of the URL>` (default `~/.cache/vlp/runs/...`).
- At the start, the URL is claimed as a vlp run (a marker object; a prefix vlp did not make is
  refused) and the mirror is filled from it: the run's logs (metrics.jsonl, eval.jsonl, out.log,
  config.yaml) and its checkpoints whose completion mark was uploaded. The mark goes up last, so
  a checkpoint with a mark is whole; the local checks then verify every file against it, as for
  a local run. A fresh run into a URL that holds a run is refused, as into a folder.
- After each checkpoint: its files are uploaded, the mark last; then the logs; then the
  checkpoints the mirror no longer keeps (train.keep_last) are deleted from the URL.

An object store gives no lock: run one training per URL. The mirror is this machine's, so an
object-storage output_dir is for runs on one machine (several nodes need a folder they share).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from vlp.core import storage
from vlp.core.errors import UserError
from vlp.core.ownership import claim, owner
from vlp.core.weights import STATE_FILE, complete_checkpoints

LOGS = ("metrics.jsonl", "eval.jsonl", "out.log", "config.yaml")
HINT = "choose a new train.output_dir"


def cache_root() -> Path:
    return Path(os.environ.get("VLP_CACHE_DIR") or Path.home() / ".cache" / "vlp")


class RunStore:
    """The URL of a run and its local mirror."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.local = cache_root() / "runs" / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def pull(self, resume: str | None) -> None:
        """Claim the URL, and make the mirror what the URL holds (logs, whole checkpoints)."""
        storage.claim_url(self.url, "run", "vlp train", HINT)
        names = set(storage.names(self.url))
        steps = self._remote_checkpoints()
        if resume is None and ("metrics.jsonl" in names or steps):
            raise UserError(f"train.output_dir {self.url} holds a training run; pass train.resume=auto to "
                            f"continue it, or {HINT}")
        if self.local.exists() and (owner(self.local) or {}).get("kind") != "run" and any(self.local.iterdir()):
            raise UserError(f"the local mirror {self.local} of {self.url} holds files vlp did not put there; "
                            "move them, or set VLP_CACHE_DIR elsewhere")
        shutil.rmtree(self.local, ignore_errors=True)  # a mirror vlp made: refilled from the URL
        self.local.mkdir(parents=True)
        claim(self.local, "run", "vlp train", HINT)  # the mirror is a run folder like any other
        for name in LOGS:
            if name in names:
                (self.local / name).write_bytes(storage.read_bytes(storage.join(self.url, name)))
        for step in steps:
            folder = storage.join(self.url, f"checkpoints/{step}")
            for name in storage.names(folder):
                (self.local / "checkpoints" / step).mkdir(parents=True, exist_ok=True)
                (self.local / "checkpoints" / step / name).write_bytes(storage.read_bytes(storage.join(folder, name)))

    def _remote_checkpoints(self) -> list[str]:
        """Checkpoint folders at the URL whose completion mark was uploaded (the mark goes last)."""
        folder = storage.join(self.url, "checkpoints")
        return [step for step in storage.names(folder) if step.startswith("step_")
                and STATE_FILE in storage.names(storage.join(folder, step))]

    def push(self, checkpoint: Path | None) -> None:
        """Upload a new checkpoint (its mark last), the logs, and drop checkpoints the mirror no longer keeps."""
        if checkpoint is not None:
            remote = storage.join(self.url, f"checkpoints/{checkpoint.name}")
            files = sorted(p for p in checkpoint.iterdir() if p.is_file() and p.name != STATE_FILE)
            for path in [*files, checkpoint / STATE_FILE]:
                storage.write_bytes(storage.join(remote, path.name), path.read_bytes())
        for name in LOGS:
            if (self.local / name).is_file():
                storage.write_bytes(storage.join(self.url, name), (self.local / name).read_bytes())
        kept = {p.name for p in complete_checkpoints(self.local / "checkpoints")}
        for step in self._remote_checkpoints():
            if step not in kept:
                folder = storage.join(self.url, f"checkpoints/{step}")
                names = storage.names(folder)
                for name in [STATE_FILE, *(n for n in names if n != STATE_FILE)]:  # the mark first: never half
                    if name in names:
                        storage.delete(storage.join(folder, name))
