"""Where a benchmark image lives, and how to get it as a PIL image or a reason why not.

Benchmarks point at images in several ways: a path relative to a data root
(SugarCrepe, ARO, Winoground), a file:// or http(s) URL (CountBench), a member
of a tar shard (CLIP_benchmark's webdataset layout, our own shards), sometimes
with a crop box (ARO's VG-Relation / VG-Attribution). `ImageRef` names one of
those exactly; its `key` is what the feature cache is keyed by, so an image
shared by several tasks (SugarCrepe's seven subsets all use COCO val2017) is
read and encoded once.

Loading never raises for a bad image: `load_image` returns an `ImageFailure`
with a short reason (missing_file, http_404, timeout, undecodable_image, ...)
that the task reports next to the item's id. Fetching reuses the shard
builder's `data_tools.fetch`, so both tools classify failures the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

from PIL import Image

from vlp.core.fetch import FetchError, FetchOptions, fetch, is_url
from vlp.core.images import ImageError, decoding, open_image, to_rgb_pixels

T = TypeVar("T")
Box = tuple[float, float, float, float]  # x, y, width, height in pixels (ARO's bbox_x/y/w/h)


@dataclass(frozen=True)
class ImageRef:
    """One image: a path or URL, or `size` bytes at `offset` inside the tar at `source`; optionally cropped.

    Local paths are absolute (adapters resolve them against the data root), so
    equal refs mean the same file whatever folder the suite was run from.
    """

    source: str
    offset: int = -1  # >= 0: a tar member's data starts here
    size: int = 0
    crop: Box | None = None

    @property
    def key(self) -> str:
        """The feature-cache key: where the bytes are, plus the crop."""
        where = f"{self.source}@{self.offset}" if self.offset >= 0 else self.source
        return where if self.crop is None else f"{where}#crop={','.join(f'{v:g}' for v in self.crop)}"

    def describe(self) -> str:
        """Human-readable location, for skip reports."""
        return f"{self.source} (tar member at byte {self.offset})" if self.offset >= 0 else self.source


@dataclass(frozen=True)
class ImageFailure:
    """Why an image could not be used: a short reason to count by, and a detail to read."""

    reason: str
    detail: str = ""


def resolve(ref: str, root: str | Path) -> ImageRef:
    """An ImageRef for a path relative to `root`, an absolute path, a file:// URL or an http(s) URL."""
    if is_url(ref) or ("://" in ref and not ref.startswith("file://")) or "\x00" in ref:
        return ImageRef(ref)  # another scheme (or no possible path) is kept as is: loading reports it
    if ref.startswith("file://"):
        return ImageRef(str(Path(unquote(urlparse(ref).path)).resolve()))
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(root) / path
    return ImageRef(str(path.resolve()))


def _read_bytes(ref: ImageRef, fetch_opts: FetchOptions) -> bytes:
    if ref.offset < 0:
        return fetch(ref.source, "", fetch_opts)
    try:
        with open(ref.source, "rb") as fh:
            fh.seek(ref.offset)
            data = fh.read(ref.size)
    except FileNotFoundError:
        raise FetchError("missing_file", ref.source) from None
    except OSError as err:
        raise FetchError("unreadable_file", f"{ref.source}: {err.strerror}") from None
    except ValueError:  # a NUL byte: no file can have this name
        raise FetchError("unreadable_file", f"{ref.source!r}: not a possible file name") from None
    if len(data) != ref.size:
        raise FetchError("truncated_tar", f"{ref.source}: member at {ref.offset} is cut short")
    return data


def load_image(ref: ImageRef, fetch_opts: FetchOptions | None = None,
               prepare: Callable[[Image.Image], T] | None = None) -> Image.Image | T | ImageFailure:
    """The RGB image behind `ref` (cropped if asked), or the reason it cannot be had.

    With `prepare` (the model's preprocessing), the result is `prepare(image)`, made while
    this process's decode budget is held, so full-size pixels never outlive the call.
    """
    opts = fetch_opts or FetchOptions(timeout=10.0, retries=1)
    try:
        data = _read_bytes(ref, opts)
    except FetchError as err:
        return ImageFailure(err.reason, err.detail or ref.describe())
    if ref.crop is not None and (ref.crop[2] <= 0 or ref.crop[3] <= 0):
        return ImageFailure("empty_crop", f"{ref.describe()}: box {ref.crop}")
    try:
        opened = open_image(data)
        with decoding(opened):
            image = to_rgb_pixels(opened)
            if ref.crop is not None:
                x, y, w, h = ref.crop
                # PIL pads a box that reaches past the edge with black, as ARO's own loader does.
                image = image.crop((x, y, x + w, y + h))
            return prepare(image) if prepare else image
    except ImageError as err:
        reason = "image_too_large" if err.reason == "decompression_bomb" else "undecodable_image"
        return ImageFailure(reason, f"{ref.describe()}: {err.reason}: {err.detail}")
    except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        return ImageFailure("undecodable_image", f"{ref.describe()}: {type(err).__name__}: {err}")
