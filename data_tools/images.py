"""Decode, normalise, resize and re-encode one image with Pillow.

The decoder is defensive because web images are: transparency is composited
on white (a transparent logo on black would be unreadable), CMYK and 16-bit
images are brought to 8-bit RGB, EXIF orientation is applied, and oversized
headers are refused before any pixel is decoded. Each failure raises
`ImageError` with a short reason: not_an_image, unsupported_format,
decompression_bomb, truncated_image, decode_error, image_too_small,
aspect_ratio_too_large, corrupt_image.

Speed: a JPEG that will be shrunk is decoded at reduced size (libjpeg's DCT
scaling, Pillow's `draft`), which skips most of the decode work.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_tools.failure import RowFailure

# We check the pixel count ourselves (reason "decompression_bomb"), with our own limit.
Image.MAX_IMAGE_PIXELS = None

ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
ENCODERS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
EXIF_ORIENTATION = 0x0112


class ImageError(RowFailure):
    """A failure of this stage; `reason` is one of the codes in the module docstring."""


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 256
    resize_mode: str = "border"  # no | border | keep_ratio | center_crop
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    max_pixels: int = 89_478_485


@dataclass
class EncodedImage:
    data: bytes
    ext: str  # jpg | webp | png: the tar member suffix
    width: int
    height: int
    original_width: int
    original_height: int


def _open(data: bytes, suffix: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if suffix and suffix not in IMAGE_SUFFIXES:
            raise ImageError("unsupported_format", f"not an image format we read ({suffix})") from None
        raise ImageError("not_an_image", "bytes are not a recognised image") from None
    except Exception as err:  # a known format whose header is broken; can raise nearly anything
        reason = "truncated_image" if "runcated" in str(err) else "corrupt_image"
        raise ImageError(reason, f"{type(err).__name__}: {err}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageError("unsupported_format", str(img.format))
    return img


def _check_size(img: Image.Image, opts: ImageOptions) -> None:
    w, h = img.size
    if w * h > opts.max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} exceeds {opts.max_pixels} pixels")
    if min(w, h) < max(opts.min_image_size, 1):
        raise ImageError("image_too_small", f"{w}x{h} < {opts.min_image_size}")
    if max(w, h) / min(w, h) > opts.max_aspect_ratio:
        raise ImageError("aspect_ratio_too_large", f"{w}x{h} > {opts.max_aspect_ratio}")


def _scale(w: int, h: int, opts: ImageOptions) -> float:
    """The resize factor the mode asks for (1.0 for 'no')."""
    if opts.resize_mode == "no":
        return 1.0
    side = max(w, h) if opts.resize_mode == "border" else min(w, h)
    scale = opts.image_size / side
    return min(scale, 1.0) if opts.resize_only_if_bigger else scale


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block is not worth losing the image over
        return 1


def _draft(img: Image.Image, opts: ImageOptions) -> None:
    """Let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 size when we shrink it anyway."""
    if img.format not in ("JPEG", "MPO"):
        return
    w, h = img.size
    scale = _scale(w, h, opts)
    if scale < 0.5:
        img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))


def _decode(img: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        return ImageOps.exif_transpose(img)
    except OSError as err:
        if "truncated" in str(err) or "broken data stream" in str(err):
            raise ImageError("truncated_image", str(err)) from None
        raise ImageError("decode_error", str(err)) from None
    except Exception as err:
        raise ImageError("decode_error", f"{type(err).__name__}: {err}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB; transparency composited on white."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _resize(img: Image.Image, opts: ImageOptions) -> Image.Image:
    w, h = img.size
    scale = _scale(w, h, opts)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        # reducing_gap: box-reduce first, then a short Lanczos; near-identical and much faster.
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if opts.resize_mode == "center_crop":
        w, h = img.size
        side = min(opts.image_size, w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif opts.resize_mode == "border":
        # Pad to a square with black borders, as img2dataset does.
        side = opts.image_size
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    return img


def _encode(img: Image.Image, opts: ImageOptions) -> bytes:
    out = io.BytesIO()
    fmt = ENCODERS[opts.encode_format]
    if fmt == "PNG":
        img.save(out, fmt, compress_level=6)
    else:
        img.save(out, fmt, quality=opts.encode_quality)
    return out.getvalue()


def process_image(data: bytes, suffix: str, opts: ImageOptions) -> EncodedImage:
    """Raw file bytes -> an encoded, resized RGB image, or ImageError(reason)."""
    img = _open(data, suffix)
    _check_size(img, opts)
    original = img.size
    if _orientation(img) in (5, 6, 7, 8):
        original = original[::-1]  # a quarter turn: the displayed image has its sides swapped
    _draft(img, opts)
    img = _to_rgb(_decode(img))
    img = _resize(img, opts)
    return EncodedImage(_encode(img, opts), opts.encode_format, img.width, img.height, *original)
