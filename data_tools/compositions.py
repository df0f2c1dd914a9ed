"""Compositional negatives from real captions, by rules (DeGLA's local alignment, without a language model).

A caption that binds attributes to objects or relates two objects gets false captions that keep
its words and change what they say, the kinds the synthetic generator writes and SugarCrepe,
ARO and Winoground test:

- attribute_swap: two attributes of one kind (two colours, two sizes, two materials) trade
  places everywhere they occur: "a red cube left of a blue ball" -> "a blue cube left of a red ball";
- relation_swap: the relation replaced by its opposite ("left of" -> "right of", "above" ->
  "below", "in front of" -> "behind", ...), and the two objects around it traded: "a red cube
  left of a blue ball" -> "a blue ball left of a red cube".

The shard builder (`--compositional-negatives`) stores them in the sample json as
`hard_negatives: {"attribute_swap": [...], "relation_swap": [...]}`, beside `count` from
`--count-counterfactuals`: the loader's hard-negative term (DeGLA's image-grounded contrast with
`loss.hard_negative_mode: pairwise`) trains on them with nothing else changed. A caption no rule
applies to gets none. Capitals of a swapped word are kept.
"""

from __future__ import annotations

import itertools
import re

ATTRIBUTES = {
    "colour": ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
               "gray", "gold", "silver"],
    "size": ["small", "large", "big", "tiny", "huge", "tall", "short", "little", "long"],
    "material": ["wooden", "metal", "metallic", "glass", "plastic", "stone", "paper", "leather"],
    "state": ["open", "closed", "empty", "full", "wet", "dry", "hot", "cold", "old", "new", "young"],
}
KIND_OF = {word: kind for kind, words in ATTRIBUTES.items() for word in words}
ATTRIBUTE = re.compile(r"\b(" + "|".join(sorted(KIND_OF, key=len, reverse=True)) + r")\b", re.IGNORECASE)

OPPOSITES = [("to the left of", "to the right of"), ("left of", "right of"), ("on top of", "underneath"),
             ("in front of", "behind"), ("above", "below"), ("over", "under"), ("inside", "outside"),
             ("on the left of", "on the right of")]
OPPOSITE = {a: b for pair in OPPOSITES for a, b in (pair, pair[::-1])}
RELATION = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(OPPOSITE, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)
# the object before a relation: from its last article or number to the verb (if any) before the relation
LEFT = re.compile(r"\b((?:a|an|the|\d+|two|three|four|five|six|seven|eight|nine|ten)\b[^,;.]*?)"
                  r"(\s+(?:is|are|sits|sit|stands|stand|lies|lie|hangs|hang|was|were)?\s*)$", re.IGNORECASE)
# the object after it: an article or number, up to punctuation, a conjunction or the end
RIGHT = re.compile(r"^(\s+)((?:a|an|the|\d+|two|three|four|five|six|seven|eight|nine|ten)\b[^,;.]*?)"
                   r"(?=$|[,;.]|\s+(?:and|with|while|but)\b)", re.IGNORECASE)


def _cased(word: str, like: str) -> str:
    """`word` with `like`'s first capital."""
    return word[:1].upper() + word[1:] if like[:1].isupper() else word[:1].lower() + word[1:]


def _traded(caption: str, a: str, b: str) -> str:
    """Every whole-word a as b and b as a (each keeping the capital of the word it replaces)."""
    def one(m: re.Match) -> str:
        word = m.group(1)
        other = {a: b, b: a}.get(word.lower())
        return _cased(other, word) if other else word
    return ATTRIBUTE.sub(one, caption)


def attribute_swaps(caption: str) -> list[str]:
    """For each pair of different attributes of one kind in the caption, the caption with the two traded."""
    seen: dict[str, list[str]] = {}
    for m in ATTRIBUTE.finditer(caption):
        word = m.group(1).lower()
        if word not in seen.setdefault(KIND_OF[word], []):
            seen[KIND_OF[word]].append(word)
    return [_traded(caption, a, b) for words in seen.values() for a, b in itertools.combinations(words, 2)]


def relation_swaps(caption: str) -> list[str]:
    """The first relation replaced by its opposite, and the objects around it traded (each when it applies)."""
    m = RELATION.search(caption)
    if m is None:
        return []
    phrase = m.group(1)
    out = [caption[:m.start()] + _cased(OPPOSITE[phrase.lower()], phrase) + caption[m.end():]]
    head, tail = caption[:m.start()], caption[m.end():]
    left, right = LEFT.search(head), RIGHT.search(tail)
    if left and right:
        first, second = left.group(1), right.group(2)
        if left.start() == 0:  # the first object opened the caption: the second takes its capital
            first, second = _cased(first, "a"), _cased(second, first)
        out.append(head[:left.start()] + second + left.group(2) + phrase + right.group(1) + first
                   + tail[right.end():])
    return [c for c in dict.fromkeys(out) if c != caption]


def compositional_negatives(caption: str) -> dict[str, list[str]] | None:
    """The caption's false variants by kind, or None when no rule applies."""
    found = {"attribute_swap": attribute_swaps(caption), "relation_swap": relation_swaps(caption)}
    found = {kind: captions for kind, captions in found.items() if captions}
    return found or None
