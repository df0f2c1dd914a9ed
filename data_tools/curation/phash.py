"""A perceptual hash of an image (DCT pHash, 63 bits): equal for re-encodings and resizes of one image.

The image is reduced to 32x32 grey, transformed with a 2-D DCT, and the 8x8
lowest frequencies (without the DC term) are compared with their median: one
bit each. Re-encoding and resizing move few bits; another picture differs in
about half. Curation uses it to confirm that an eval image and a training
image that embed alike are the same picture (decontaminate.py): a model
trained on few concepts embeds different pictures of the same content as
closely as copies.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE, LOW = 32, 8
_N = np.arange(SIDE)
DCT = np.cos(np.pi * (2 * _N[None, :] + 1) * _N[:, None] / (2 * SIDE))  # DCT-II basis, rows = frequencies


def phash(image: Image.Image) -> int:
    grey = np.asarray(image.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float64)
    low = (DCT @ grey @ DCT.T)[:LOW, :LOW].flatten()[1:]
    bits = low > np.median(low)
    return int(np.packbits(np.concatenate([[False], bits])).view(">u8")[0])  # 63 bits: fits an int64


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between two arrays of hashes (int64), elementwise."""
    x = np.bitwise_xor(a.astype(np.uint64), b.astype(np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
