"""Metadata balancing (MetaCLIP, "Demystifying CLIP Data", Xu et al., 2023).

A list of metadata entries (MetaCLIP used 500k: WordNet synsets, Wikipedia titles and frequent
n-grams) defines the concepts a set should cover. Each pair is matched by the entries its
caption contains; the entry counts over the set are heavy-tailed ("photo", "image" match
millions of pairs, most entries a handful). Balancing keeps every pair of an entry matched at
most `cap` times (MetaCLIP's t: 20k at 400M pairs) and, for an entry matched more often, each
of its pairs with probability cap / count; a pair is kept if any of its entries keeps it.
Pairs matched by no entry are removed, as MetaCLIP curates only matched pairs.

Matching is on whole words: MetaCLIP pads each entry with spaces and looks for it in the caption
with its punctuation spaced out, so "cat" matches "a cat." and not "education"; here a caption's
words are runs of letters and digits (so "cat" also matches "cat-free", which MetaCLIP's spacing
leaves joined). Case is folded unless `case_sensitive` (MetaCLIP's matching is case-sensitive; a
user's own list rarely spells each entry in every case).
The draws are deterministic: a hash of (seed, sample key, entry), so a rerun keeps the same
pairs and no state is needed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from vlp.core.errors import UserError
from vlp.core.smallfiles import read_small

WORD = re.compile(r"\w+", re.UNICODE)


def read_entries(path: str | Path, case_sensitive: bool = False) -> list[str]:
    """The metadata file's entries: one per line (case-folded unless case_sensitive), blank lines and
    duplicates dropped."""
    try:
        text = read_small(path, "metadata file").decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"--metadata {path}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"--metadata {path}: not UTF-8 text") from None
    fold = (lambda line: line) if case_sensitive else str.casefold
    entries = list(dict.fromkeys(" ".join(WORD.findall(fold(line))) for line in text.splitlines()))
    entries = [e for e in entries if e]
    if not entries:
        raise UserError(f"--metadata {path}: holds no entry (one per line)")
    return entries


class Matcher:
    """Which entries a caption contains, by word n-grams up to the longest entry."""

    def __init__(self, entries: list[str], case_sensitive: bool = False):
        self.entries = set(entries)
        self.longest = max(len(e.split()) for e in entries)
        self.fold = (lambda text: text) if case_sensitive else str.casefold

    def __call__(self, caption: str) -> set[str]:
        words = WORD.findall(self.fold(caption))
        found = set()
        for n in range(1, self.longest + 1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i:i + n])
                if gram in self.entries:
                    found.add(gram)
        return found


def _draw(seed: int, key: str, entry: str) -> float:
    """A uniform number in [0, 1) from (seed, key, entry): the same on every run."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{entry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def balance(captions: list[str], keys: list[str], entries: list[str], cap: int, seed: int,
            case_sensitive: bool = False) -> tuple[list[set[str]], list[bool], Counter, Counter]:
    """(entries each pair matched, kept, entry counts before, entry counts after) for the given pairs."""
    match = Matcher(entries, case_sensitive)
    found = [match(c) for c in captions]
    before = Counter(e for f in found for e in f)
    keep_prob = {e: min(1.0, cap / n) for e, n in before.items()}
    kept = [any(_draw(seed, key, e) < keep_prob[e] for e in f) for f, key in zip(found, keys, strict=True)]
    after = Counter(e for f, k in zip(found, kept, strict=True) if k for e in f)
    return found, kept, before, after
