"""A near-copy signal that holds for photos and flat graphics: small colour thumbnails compared pixel by pixel.

Curation must tell a copy of an image (re-encoded, resized, cropped by a few per cent) from
another picture of the same thing. Embeddings cannot (a model trained on few concepts puts
look-alikes as close as copies), and the DCT perceptual hash (phash.py) breaks on flat
drawings: most of its 63 low-frequency coefficients sit near their median, so JPEG noise of
half a grey level flips a dozen bits. A thumbnail compares what a person compares:

- the image (RGB, transparency on white, as every reader here decodes it) is box-filtered to
  16x16 colour pixels; each is the mean of its block, which averages JPEG noise away and moves
  by a fraction of a level when a small crop or resize shifts the block's edges;
- the distance between two images is the mean absolute difference of their 768 values, in
  grey levels (0-255). A copy is within a few levels; another drawing differs by tens of levels
  wherever it differs, and in colour as well as shape (a red and a blue heart are apart).

An eval image is also compared as the builder would have stored it when it was not square
(`center_crop` keeps the middle square, `border` pads with black), and as a copy cropped by a
few per cent would show it: its crops keeping 98.5% and 97% of each side, at the corners, the
edges' middles and the centre (a 3x3 grid each). Its thumbnails of all those views are kept and
the nearest counts: a crop moves the 16 blocks' edges by up to half a block, which a drawing's
flat regions turn into tens of levels, and the nearest crop view takes most of that shift away
(bench/copy_signal.py's "nearest eval view" rows). 21 views, 16 KB per eval image. The default thresholds come from measured distributions
of copy and distinct pairs (bench/copy_signal.py; the docs' results page).

Two training images (SemDeDup) have only their stored thumbnails, not their pixels. A crop of a
few per cent is undone on the thumbnails themselves (`aligned_distance`): both are blurred by a
[1, 2, 1] kernel (a drawing's sharp edges become ramps over three blocks, which interpolate
well), then one is resampled bilinearly at the block positions of each crop tried, both ways
round, and the nearest comparison is the distance. Without the blur the resampling helps little:
a block's mean says nothing of where in the block a black outline lies
(bench/copy_signal.py's "aligned" rows measure both sides of the default).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 16
SIZE = SIDE * SIDE * 3  # bytes per thumbnail


def thumbnail(image: Image.Image) -> bytes:
    """The image's 16x16 RGB thumbnail (box filter), SIZE bytes."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((SIDE, SIDE), Image.Resampling.BOX, reducing_gap=None).tobytes()


CROP_FRACTIONS = (0.985, 0.97)  # a near-duplicate crop keeps 96-99% of each side
CROP_GRID = 3  # offsets per axis: the start, the middle, the end


def crops(image: Image.Image) -> list[bytes]:
    """Thumbnails of the image's small crops (CROP_FRACTIONS of each side, CROP_GRID x CROP_GRID offsets)."""
    w, h = image.size
    out = []
    for fraction in CROP_FRACTIONS:
        cw, ch = round(w * fraction), round(h * fraction)
        for gx in range(CROP_GRID):
            for gy in range(CROP_GRID):
                x, y = round((w - cw) * gx / (CROP_GRID - 1)), round((h - ch) * gy / (CROP_GRID - 1))
                out.append(thumbnail(image.crop((x, y, x + cw, y + ch))))
    return out


VIEWS = 3 + len(CROP_FRACTIONS) * CROP_GRID * CROP_GRID  # what `views` returns at most


def views(image: Image.Image) -> list[bytes]:
    """Thumbnails of an eval image as a builder may have stored it: as it is, its centre square
    (center_crop) and padded to a square with black (border), the last two only for an image that
    is not square; then its small crops (a crop of the eval image stored as a training sample)."""
    w, h = image.size
    out = [thumbnail(image), *crops(image)]
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        out.append(thumbnail(image.crop((left, top, left + side, top + side))))
        big = max(w, h)
        padded = Image.new("RGB", (big, big), (0, 0, 0))
        padded.paste(image.convert("RGB"), ((big - w) // 2, (big - h) // 2))
        out.append(thumbnail(padded))
    return out


def as_array(thumbs: list[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """((n, SIZE) uint8, (n,) bool: present) from stored thumbnails (None where a sample has none)."""
    out = np.zeros((len(thumbs), SIZE), dtype=np.uint8)
    present = np.zeros(len(thumbs), dtype=bool)
    for i, t in enumerate(thumbs):
        if t is not None and len(t) == SIZE:
            out[i], present[i] = np.frombuffer(t, dtype=np.uint8), True
    return out, present


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference, in grey levels, between rows of a and rows of b (same shape)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=-1)


def _resample(thumbs: np.ndarray, fraction: float, left: float, top: float) -> np.ndarray:
    """(..., SIDE, SIDE, 3) float thumbnails -> the thumbnails of their crops keeping `fraction` of each side
    from (left, top) (fractions of the side), by bilinear resampling of the block means."""
    out = thumbs
    for axis, start in ((-3, top), (-2, left)):
        centre = SIDE * start + fraction * (np.arange(SIDE) + 0.5) - 0.5  # the crop's block centres, in blocks
        centre = np.clip(centre, 0, SIDE - 1)
        low = np.floor(centre).astype(int)
        high = np.minimum(low + 1, SIDE - 1)
        weight = (centre - low).reshape((-1, 1, 1) if axis == -3 else (-1, 1))
        out = np.take(out, low, axis=axis) * (1 - weight) + np.take(out, high, axis=axis) * weight
    return out


def _crop_offsets() -> list[tuple[float, float, float]]:
    """(fraction, left, top) of the crops `aligned_distance` tries: CROP_FRACTIONS on the CROP_GRID."""
    return [(f, (1 - f) * gx / (CROP_GRID - 1), (1 - f) * gy / (CROP_GRID - 1))
            for f in CROP_FRACTIONS for gx in range(CROP_GRID) for gy in range(CROP_GRID)]


def _blur(thumbs: np.ndarray) -> np.ndarray:
    """(..., SIZE) uint8 -> (..., SIDE, SIDE, 3) float, each axis smoothed by [1, 2, 1] / 4 (edges repeated)."""
    out = thumbs.reshape(*thumbs.shape[:-1], SIDE, SIDE, 3).astype(np.float32)
    for axis in (-3, -2):
        padded = np.concatenate([np.take(out, [0], axis=axis), out, np.take(out, [SIDE - 1], axis=axis)], axis=axis)
        out = (np.take(padded, range(0, SIDE), axis=axis) + 2 * np.take(padded, range(1, SIDE + 1), axis=axis)
               + np.take(padded, range(2, SIDE + 2), axis=axis)) / 4
    return out


def aligned_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A copy distance that tolerates a small crop, for one thumbnail `a` (SIZE,) against rows of `b`
    (n, SIZE): on blurred thumbnails, the nearest of the plain comparison and each crop of either side
    compared with the other. Grey levels, like distance()."""
    a_img, b_img = _blur(a), _blur(b.reshape(-1, SIZE))
    best = np.abs(b_img - a_img).mean(axis=(1, 2, 3))
    for fraction, left, top in _crop_offsets():
        best = np.minimum(best, np.abs(b_img - _resample(a_img, fraction, left, top)).mean(axis=(1, 2, 3)))
        best = np.minimum(best, np.abs(_resample(b_img, fraction, left, top) - a_img).mean(axis=(1, 2, 3)))
    return best
