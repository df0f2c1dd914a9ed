"""The recipe's caption-side augmentations, applied in the loader and seeded per sample (resume stays exact).

- Which image augmentations a caption allows: a horizontal flip turns "a dog left of a cat"
  into a false caption, grayscale turns "a red car" into one ("Improved Baselines for
  Vision-Language Pre-training", Fini et al. 2023, flip and colour augmentations only where
  they keep the pair true). Captions naming a side, written text, or a colour keep their image.
- Text augmentation, EDA-style (Wei & Zou 2019): each word dropped with probability
  `word_dropout`, replaced by a mask word with probability `word_mask`, and each caption
  with probability `word_swap` gets two of its words swapped. At least one word is left.
- Several captions per image (LaCLIP, Fan et al. 2023): the sample json's `captions` list
  (written by `vlp shards build --caption-cols`); one is picked per sample per epoch, from
  the seed, the epoch and the sample key, so a resumed run picks the same ones.
"""

from __future__ import annotations

import json
import random
import re

from vlp.core.config import TextAugmentConfig

WORD = re.compile(r"[a-z]+")
SIDE_WORDS = frozenset({"left", "right", "leftmost", "rightmost", "lefthand", "righthand", "clockwise",
                        "counterclockwise", "anticlockwise"})
TEXT_WORDS = frozenset({"text", "word", "words", "letter", "letters", "written", "writing", "reads", "says",
                        "sign", "logo", "title", "caption", "label", "digit", "digits", "number", "numbers"})
COLOUR_WORDS = frozenset({
    "red", "green", "blue", "yellow", "orange", "purple", "violet", "pink", "brown", "black", "white", "grey",
    "gray", "cyan", "magenta", "gold", "golden", "silver", "beige", "teal", "turquoise", "maroon", "navy",
    "colour", "color", "colours", "colors", "colourful", "colorful", "blond", "blonde", "tan", "olive", "lime",
})


def _words(caption: str) -> set[str]:
    return set(WORD.findall(caption.lower()))


def allows_flip(caption: str) -> bool:
    """A mirror image still fits the caption: it names no side and no written text."""
    words = _words(caption)
    return not (words & SIDE_WORDS or words & TEXT_WORDS)


def allows_grayscale(caption: str) -> bool:
    """A grayscale image still fits the caption: it names no colour."""
    return not _words(caption) & COLOUR_WORDS


def augment_text(caption: str, cfg: TextAugmentConfig, rng: random.Random) -> str:
    """EDA word dropout, masking and one swap, drawn from the sample's RNG."""
    if not (cfg.word_dropout or cfg.word_mask or cfg.word_swap):
        return caption
    words = caption.split()
    kept = [w for w in words if rng.random() >= cfg.word_dropout] or words[:1]
    kept = [cfg.mask_word if rng.random() < cfg.word_mask else w for w in kept]
    if len(kept) > 1 and rng.random() < cfg.word_swap:
        i, j = rng.sample(range(len(kept)), 2)
        kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)


def json_field(meta: dict, name: str):
    """A sample json's field that a CSV column may have stored as JSON text: decoded; None if unreadable."""
    value = meta.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def captions_of(meta: dict) -> list[str]:
    """The sample json's `captions` (a list, or a JSON string of one); [] if absent or unusable."""
    found = json_field(meta, "captions")
    return [str(c) for c in found if str(c).strip()] if isinstance(found, list) else []


def pick_caption(main: str, meta: dict, seed: int, epoch: int, key: str) -> str:
    """One of the sample's captions for this epoch (the main caption if it has no list)."""
    choices = captions_of(meta)
    if not choices:
        return main
    return random.Random(f"{seed}:{epoch}:{key}:caption").choice(choices)
