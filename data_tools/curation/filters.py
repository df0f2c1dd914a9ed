"""The per-sample filters of curation: captions (length, language) and images (size, aspect).

Each filter takes the metadata table of every sample and returns a boolean
mask of the samples it removes; curate.py applies them in its stated order
and gives each removed sample the reason of the first filter that removed it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vlp.core.config import CurateConfig
from vlp.core.errors import UserError


def caption_too_short(table: pa.Table, opts: CurateConfig) -> np.ndarray:
    captions = table.column("caption").to_pylist()
    words = np.array([len(c.split()) for c in captions])
    chars = pc.utf8_length(table.column("caption")).to_numpy(zero_copy_only=False)
    return (words < opts.min_words) | (chars < opts.min_chars)


def caption_too_long(table: pa.Table, opts: CurateConfig) -> np.ndarray:
    chars = pc.utf8_length(table.column("caption")).to_numpy(zero_copy_only=False)
    return chars > opts.max_chars if opts.max_chars else np.zeros(len(chars), bool)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of a caption, ("unknown", 0) when there is nothing to detect.
    langdetect is model-free (character n-gram profiles shipped in the package); seeded, so results repeat."""
    try:
        from langdetect import DetectorFactory, LangDetectException, detect_langs
    except ImportError:
        raise UserError("the languages filter needs langdetect: pip install 'vlp[curate]'") from None

    DetectorFactory.seed = 0
    try:
        best = detect_langs(text)[0]
    except LangDetectException:
        return "unknown", 0.0
    return best.lang, best.prob


def other_language(table: pa.Table, opts: CurateConfig) -> tuple[np.ndarray, list[str]]:
    """(removed mask, why) for the `languages` filter.

    Only captions of at least `language_min_words` words are judged, and only a detection at least
    `language_min_confidence` sure removes one: n-gram detectors misjudge short captions (on
    vlp's synthetic English captions, langdetect calls some of them French, Italian or Swedish,
    many with certainty, far fewer from 4 words and 0.9 on), and a caption kept by doubt costs
    less than a good pair lost.
    """
    n = table.num_rows
    if not opts.languages:
        return np.zeros(n, bool), []
    keep = set(opts.languages)
    removed, why = np.zeros(n, bool), [""] * n
    for i, caption in enumerate(table.column("caption").to_pylist()):
        if len(caption.split()) < opts.language_min_words:
            continue
        lang, prob = detect_language(caption)
        if lang not in keep and lang != "unknown" and prob >= opts.language_min_confidence:
            removed[i], why[i] = True, f"{lang} ({prob:.2f})"
    return removed, why


def image_too_small(table: pa.Table, opts: CurateConfig) -> np.ndarray:
    w = table.column("width").to_numpy(zero_copy_only=False).astype(float)
    h = table.column("height").to_numpy(zero_copy_only=False).astype(float)
    return np.fmin(w, h) < opts.min_image_size  # NaN (no image) compares False: removed by its error instead


def aspect_ratio_too_large(table: pa.Table, opts: CurateConfig) -> np.ndarray:
    if not opts.max_aspect_ratio:
        return np.zeros(table.num_rows, bool)
    w = table.column("width").to_numpy(zero_copy_only=False).astype(float)
    h = table.column("height").to_numpy(zero_copy_only=False).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.fmax(w, h) / np.fmin(w, h) > opts.max_aspect_ratio
