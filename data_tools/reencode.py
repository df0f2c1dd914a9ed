"""Resize and re-encode one image for a shard (decoding is vlp.core.images's policy).

Each failure raises `ImageError` with a short reason: the decode reasons of
vlp.core.images, plus image_too_small and aspect_ratio_too_large.

Speed: a JPEG that will be shrunk is decoded at reduced size (libjpeg's DCT
scaling, Pillow's `draft`), which skips most of the decode work.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from vlp.core.images import ImageError, decoding, draft, open_image, orientation, to_rgb_pixels

ENCODERS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
           "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}


@dataclass(frozen=True)
class ImageOptions:
    """What a build does to each image (the `vlp shards build` keys of the same names)."""

    image_size: int
    resize_mode: str  # no | border | keep_ratio | center_crop
    resize_only_if_bigger: bool
    encode_format: str
    encode_quality: int
    min_image_size: int
    max_aspect_ratio: float
    max_pixels: int
    resize_filter: str = "lanczos"  # FILTERS


@dataclass
class EncodedImage:
    data: bytes
    ext: str  # jpg | webp | png: the tar member suffix
    width: int
    height: int
    original_width: int
    original_height: int


def _check_size(img: Image.Image, opts: ImageOptions) -> None:
    w, h = img.size
    if min(w, h) < max(opts.min_image_size, 1):
        raise ImageError("image_too_small", f"{w}x{h} < {opts.min_image_size}")
    if opts.max_aspect_ratio and max(w, h) / min(w, h) > opts.max_aspect_ratio:
        raise ImageError("aspect_ratio_too_large", f"{w}x{h} > {opts.max_aspect_ratio}")


def _scale(w: int, h: int, opts: ImageOptions) -> float:
    """The resize factor the mode asks for (1.0 for 'no')."""
    if opts.resize_mode == "no":
        return 1.0
    side = max(w, h) if opts.resize_mode == "border" else min(w, h)
    scale = opts.image_size / side
    return min(scale, 1.0) if opts.resize_only_if_bigger else scale


def _resize(img: Image.Image, opts: ImageOptions) -> Image.Image:
    w, h = img.size
    scale = _scale(w, h, opts)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        # reducing_gap: box-reduce first, then a short Lanczos (or bicubic...); near-identical and much faster.
        img = img.resize(size, FILTERS[opts.resize_filter], reducing_gap=3.0)
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
    img = open_image(data, suffix, opts.max_pixels)
    _check_size(img, opts)
    original = img.size
    draft(img, _scale(*img.size, opts))
    # Full-size pixels exist only inside: the worker's threads share one decode budget.
    # (Reading a PNG's EXIF decodes it, so the orientation is read inside too.)
    with decoding(img):
        if orientation(img) in (5, 6, 7, 8):
            original = original[::-1]  # a quarter turn: the displayed image has its sides swapped
        img = _resize(to_rgb_pixels(img), opts)
    return EncodedImage(_encode(img, opts), opts.encode_format, img.width, img.height, *original)
