"""Read webdataset tar shards as samples whose images stay on disk until encoded.

Two layouts are accepted:

- CLIP_benchmark's (`clip_benchmark.webdataset_builder`): `ROOT/SPLIT/nshards.txt`
  and `ROOT/SPLIT/0.tar .. N-1.tar`, plus `ROOT/classnames.txt`,
  `ROOT/zeroshot_classification_templates.txt` and, for retrieval,
  `ROOT/dataset_type.txt`; samples are `KEY.webp|png|jpg` + `KEY.cls` (class
  index) or `KEY.txt` (captions, one per line);
- img2dataset's and ours (`vlp shards build`): `ROOT/*.tar` with `KEY.jpg`,
  `KEY.txt` (the caption), `KEY.json`.

Members are grouped into samples by webdataset's rule (vlp.core.tarformat). Image members are not read here: each becomes an `ImageRef` to its
bytes inside the tar (offset + size), so a 50k-image benchmark costs no memory
until the encoder asks for a batch.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from vlp.eval.image_refs import ImageRef

from vlp.core.errors import UserError
from vlp.core.images import SHARD_IMAGE_EXTS
from vlp.core.tarformat import split_member

TEXT_EXTS = ("txt", "cls", "json")


@dataclass
class Sample:
    """One sample: its key, where its image is (if it has one), and its small text members by extension."""

    key: str
    shard: str
    image: ImageRef | None = None
    texts: dict[str, str] = field(default_factory=dict)


def find_shards(root: Path, split: str | None = "test") -> list[Path]:
    """The shard files of a CLIP_benchmark split folder, a folder of *.tar, or a single .tar."""
    if root.is_file() and root.suffix == ".tar":
        return [root]
    if not root.is_dir():
        raise UserError(f"webdataset folder not found: {root}")
    if split and (root / split / "nshards.txt").is_file():
        text = (root / split / "nshards.txt").read_text().strip()
        if not text.isdigit():
            raise UserError(f"{root / split / 'nshards.txt'} must hold a number, got {text[:40]!r}")
        shards = [root / split / f"{i}.tar" for i in range(int(text))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise UserError(
                f"{root / split}: nshards.txt says {text} shards but {', '.join(missing[:3])} missing"
            )
        return shards
    for folder in ([root / split] if split else []) + [root]:
        shards = sorted(folder.glob("*.tar")) if folder.is_dir() else []
        if shards:
            return shards
    raise UserError(f"no .tar shards in {root}" + (f" or {root / split}" if split else ""))


def read_shard(path: Path) -> list[Sample]:
    """Samples of one tar, in order; images as ImageRefs into the file."""
    samples: list[Sample] = []
    current: Sample | None = None
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                parts = split_member(member.name) if member.isfile() else None
                if not parts:
                    continue
                key, ext = parts[0], parts[1].lower()
                if current is None or current.key != key:
                    current = Sample(key=key, shard=path.name)
                    samples.append(current)
                if ext in SHARD_IMAGE_EXTS and current.image is None:
                    current.image = ImageRef(str(path.resolve()), offset=member.offset_data, size=member.size)
                elif ext in TEXT_EXTS:
                    fh = tar.extractfile(member)
                    current.texts[ext] = fh.read().decode("utf-8", "replace") if fh else ""
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"cannot read shard {path}: {err}") from None
    return samples


def read_samples(shards: list[Path]) -> list[Sample]:
    """All samples of the shards, in shard order."""
    return [s for shard in shards for s in read_shard(shard)]
