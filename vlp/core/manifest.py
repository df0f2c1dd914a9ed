"""manifest.json, the completion mark of a shard build: its one schema and its one reader.

The builder writes it last; the loader takes sample counts from it, and
`vlp shards verify / inspect` check a build against it. Everything read from
it is validated before use: counts are non-negative integers and a shard
name is a plain `*.tar` file name in the build folder (a name from a file is
never a path: no `/`, no `..`).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlp.core.errors import UserError
from vlp.core.storage import read_bytes

MANIFEST = "manifest.json"
Count = Field(ge=0)


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str
    samples: int = Count
    rows: int | None = Count

    @field_validator("name")
    @classmethod
    def _plain_tar_name(cls, name: str) -> str:
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".tar") or "\x00" in name:
            raise ValueError(f"{name[:80]!r} is not a plain .tar file name")
        return name


class Manifest(BaseModel):
    """What a finished build reports (extra keys are kept: newer writers may add some)."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: str = "vlp-shards/1"
    rows: int = Count
    written: int = Count
    failed: int = Count
    duplicates: int = Count
    failure_reasons: dict[str, int] = {}
    shards: list[ShardEntry]
    inputs: list[str] = []
    # "build": written by `vlp shards build` (with failures.jsonl); "index": by `vlp shards index` for a
    # folder another tool wrote (counts from tar headers and _stats.json; failures were not recorded by vlp)
    source: str = "build"


def read_manifest(path: str | Path) -> Manifest:
    """A validated manifest (a local path or an object-storage URL), or a one-line UserError naming it."""
    try:
        data = json.loads(read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not a readable JSON manifest ({type(err).__name__}: {err})"[:300]) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a manifest is a JSON object with a 'shards' list")
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise UserError(f"{path}: {where}: {first['msg']}"[:300]) from None
