"""The one image-decoding policy: every image vlp reads becomes RGB pixels here.

The shard builder, the training loader and the eval package all decode
through `open_image` + `to_rgb_pixels`, so a picture means the same pixels
in training and in evaluation:

- the pixel count is checked from the header, before any pixel is decoded
  (a decompression bomb is refused, with our own limit: PIL's global one may
  be switched off by other code in the process);
- EXIF orientation is applied;
- transparency (RGBA, LA, PA, P with a transparent colour) is composited on
  white: a transparent logo read as black-on-black would be unreadable, and
  `convert("RGB")` keeps whatever colour the transparent pixels store;
- CMYK, 16-bit and float images are brought to 8-bit RGB.

Decode memory is bounded per process, whatever the images: every decode
holds a share of one pixel budget (`decoding`) while its full-size pixels
exist, so a builder worker with 16 fetch threads or an eval loader with 8
decodes many small images at once but a huge one alone.

Failures raise `ImageError` with a short reason (not_an_image,
unsupported_format, decompression_bomb, truncated_image, decode_error,
corrupt_image) that callers count or report.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlp.core.errors import RowFailure

MAX_PIXELS = 89_478_485  # PIL's default decompression-bomb limit
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
# File suffixes we read as images, and the member extensions an image has in a tar shard.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")

# What one process may hold in decoding at once, in RGB pixels (3 bytes): about 300 MB, whatever the
# images' modes (an image holds its mode's peak bytes per pixel / 3 of it). An image at the pixel limit
# fits, alone.
DECODE_BUDGET_PIXELS = 100_000_000

# We check the pixel count ourselves, against a limit the caller chooses.
Image.MAX_IMAGE_PIXELS = None


class ImageError(RowFailure):
    """An image that cannot be used; `reason` is one of the codes in the module docstring."""


def open_image(data: bytes, suffix: str = "", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Parse the header of `data` (no pixels decoded yet) and refuse what we will not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if suffix and suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageError("unsupported_format", f"not an image format we read ({suffix})") from None
        raise ImageError("not_an_image", "bytes are not a recognised image") from None
    except Exception as err:  # a known format whose header is broken can raise nearly anything
        reason = "truncated_image" if "runcated" in str(err) else "corrupt_image"
        raise ImageError(reason, f"{type(err).__name__}: {err}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageError("unsupported_format", str(img.format))
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} exceeds {max_pixels} pixels")
    return img


class PixelBudget:
    """A counting semaphore over pixels: decodes wait until their image fits in what is left."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = min(max(pixels, 1), self.capacity)  # bigger than the budget: waits to be alone
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + need <= self.capacity)
            self.in_use += need
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= need
                self._changed.notify_all()


_BUDGET = PixelBudget(DECODE_BUDGET_PIXELS)


M_MMAP_THRESHOLD = -3  # glibc malloc.h
# Pillow's own pool of freed pixel blocks, reused by the next image: without it every block is a fresh mmap
# whose pages fault in again, a large share of a build worker's CPU (docs/safety.md). Bounded: at most this
# many blocks of at most this size are kept (64 MiB per process).
PIXEL_BLOCK_BYTES = 4 << 20
PIXEL_BLOCKS_KEPT = 16
_MALLOC_TUNED = False


def return_freed_pixels() -> None:
    """Make freed image memory go back to the OS, past a small pool, in a process that decodes on threads.

    Pillow allocates pixels in blocks. glibc's malloc raises its mmap threshold
    after the first large block is freed, so later blocks come from per-thread
    arenas that keep them after free: threads that each decode one huge image in
    turn hold gigabytes (bench/decode_memory.py). A fixed 1 MiB threshold mmaps
    every large block and unmaps it on free; Pillow keeps a bounded pool of freed
    blocks for the next images. The malloc part is a no-op off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        pass
    Image.core.set_block_size(PIXEL_BLOCK_BYTES)
    Image.core.set_blocks_max(PIXEL_BLOCKS_KEPT)
    _MALLOC_TUNED = True


def decoding(img: Image.Image) -> contextlib.AbstractContextManager[None]:
    """Hold this process's decode budget for an opened image (after `draft`) while its full-size pixels live,
    weighed by what decoding its mode to RGB holds at its peak (the budget counts RGB pixels: 3 bytes)."""
    w, h = img.size
    return _BUDGET.hold(math.ceil(w * h * peak_bytes_per_pixel(img) / 3))


def peak_bytes_per_pixel(img: Image.Image) -> int:
    """Bytes per pixel alive at once while `to_rgb_pixels` turns an image of this mode into RGB."""
    decoded = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
               "I": 4, "F": 4}.get(img.mode, 4)
    if img.mode == "RGB":
        return decoded
    if _transparent(img):  # + the RGBA copy (unless RGBA already), the white RGB canvas, the alpha mask
        return decoded + (0 if img.mode == "RGBA" else 4) + 3 + 1
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # + uint32 working copy, 8-bit grey, RGB
        return decoded + 4 + 1 + 3
    return decoded + 3


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable)."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not worth losing the image over
        return 1


def draft(img: Image.Image, scale: float) -> None:
    """Let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 size when the caller shrinks it by `scale` anyway."""
    if img.format in ("JPEG", "MPO") and scale < 0.5:
        w, h = img.size
        img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))


def _load(img: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no second full-size copy
        return img
    except OSError as err:
        if "truncated" in str(err) or "broken data stream" in str(err):
            raise ImageError("truncated_image", str(err)) from None
        raise ImageError("decode_error", str(err)) from None
    except Exception as err:
        raise ImageError("decode_error", f"{type(err).__name__}: {err}") from None


def _transparent(img: Image.Image) -> bool:
    return img.mode == "P" and "transparency" in img.info or img.mode in _ALPHA_MODES


def _rgb(img: Image.Image) -> Image.Image:
    """Memory-lean conversions (peak_bytes_per_pixel counts what each holds): 16-bit and float grey in
    integer arithmetic, transparency pasted onto a white RGB canvas through its alpha (no RGBA canvas)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode == "F":
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        top = 65535 if arr.max(initial=0) > 255 else 255
        scaled = (np.clip(arr, 0, top).astype(np.uint32) * 255 + top // 2) // top
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    if _transparent(img):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB") if img.mode != "RGB" else img


def to_rgb_pixels(img: Image.Image) -> Image.Image:
    """Decode an opened image fully: EXIF orientation applied, 8-bit RGB, transparency on white."""
    return _rgb(_load(img))


def decode_rgb(data: bytes, suffix: str = "", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB image under the policy above, or ImageError (the caller holds `decoding` if it decodes
    concurrently)."""
    return to_rgb_pixels(open_image(data, suffix, max_pixels))
