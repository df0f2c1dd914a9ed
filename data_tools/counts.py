"""Counterfactual captions for counting, from real captions ("Teaching CLIP to Count to Ten").

A caption that states how many objects there are ("two dogs on a sofa", "3 red apples") gets the
same caption with the number swapped for every other number from two to ten ("three dogs on a
sofa", ...): false captions that differ only in the count. The shard builder stores them in the
sample json as `hard_negatives: {"count": [...]}`, the form the synthetic generator writes, so the
loader's hard-negative term (the counting loss of the paper with `loss.hard_negative_mode:
pairwise`) trains on real data with nothing else changed.

Numbers are the words two..ten and the digits 2..10, as whole words (a digit inside "3D" or
"1920s" is not a count). A caption with no number gets none; one with two different numbers
("two dogs and three cats") gets none either: which one to swap is ambiguous, and swapping one
would keep the other's count true. The same number said twice ("two dogs ... the two dogs") is
swapped everywhere at once. Spelling and capitals are kept: a word stays a word, a digit a digit.
"""

from __future__ import annotations

import re

WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
NAMES = {n: w for w, n in WORDS.items()}
NUMBER = re.compile(r"(?<![\w.,'-])(two|three|four|five|six|seven|eight|nine|ten|[2-9]|10)(?![\w'-]|[.,]\d)",
                    re.IGNORECASE)


def _value(token: str) -> int:
    return int(token) if token.isdigit() else WORDS[token.lower()]


def _spelled(token: str, value: int) -> str:
    """`value` written as `token` is: digits as digits, a word as a word with the same capitals."""
    if token.isdigit():
        return str(value)
    word = NAMES[value]
    if token.isupper() and len(token) > 1:
        return word.upper()
    return word.capitalize() if token[0].isupper() else word


def count_counterfactuals(caption: str) -> list[str] | None:
    """The caption with its count swapped for each other number 2..10, or None when it states no single count."""
    found = list(NUMBER.finditer(caption))
    values = {_value(m.group(0)) for m in found}
    if len(values) != 1:
        return None
    (value,) = values
    return [_swapped(caption, other) for other in range(2, 11) if other != value]


def _swapped(caption: str, value: int) -> str:
    return NUMBER.sub(lambda m: _spelled(m.group(0), value), caption)
