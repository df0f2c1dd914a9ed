"""What a scene says: captions with known truth values, and their counterfactuals (hard negatives)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass

from vlp.core.synth.world import (
    INVERSE_RELATION,
    MAX_TRAIN_COUNT,
    PLURALS,
    RELATION_TEXT,
    Obj,
    Scene,
    number_word,
    spatial_relation,
    with_article,
)

# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------

# Several phrasings per kind; {0}, {1} are noun phrases, {be} agrees with {0}.
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "count": ("{0}", "a photo of {0}", "an image of {0}", "there {be} {0}", "a picture of {0}"),
    "mixed": ("{0} and {1}", "a photo of {0} and {1}", "there {be} {0} and {1}", "{0} together with {1}"),
    "attributes": ("{0} and {1}", "a photo of {0} and {1}", "{0} with {1}", "an image of {0} and {1}"),
    "relation": ("{0} {rel} {1}", "a photo of {0} {rel} {1}", "{0} is {rel} {1}", "there is {0} {rel} {1}"),
}
# How numbers are written: "word" (one, three), "article" (a/an for one, else words), "digit" (3).
_STYLES: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "count": (("word", "article", "digit"), (0.45, 0.3, 0.25)),
    "mixed": (("word", "article", "digit"), (0.4, 0.4, 0.2)),
    "attributes": (("article", "word"), (0.8, 0.2)),
    "relation": (("article",), (1.0,)),
}
# Chance that a caption names the colour (it always does where it identifies objects).
_SAY_COLOUR = {"count": 0.8, "mixed": 0.7, "attributes": 1.0, "relation": 1.0}


@dataclass(frozen=True)
class Phrase:
    """A noun phrase: `count` objects of `shape`, of `colour` unless None ("three red circles")."""

    count: int
    shape: str
    colour: str | None = None

    def matches(self, obj: Obj) -> bool:
        return obj.shape == self.shape and (self.colour is None or obj.colour == self.colour)

    def text(self, style: str) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        head = f"{self.colour} {noun}" if self.colour else noun
        if style == "digit":
            return f"{self.count} {head}"
        if style == "article" and self.count == 1:
            return f"{with_article(head)} {head}"
        return f"{number_word(self.count)} {head}"


@dataclass(frozen=True)
class Statement:
    """What a caption claims, apart from its wording, so it can be checked and perturbed.

    Counterfactuals change the claim (a count, a colour, the relation) and keep
    the template and number style, so true and false captions differ only in
    the fact under test, not in phrasing a model could key on.
    """

    kind: str
    phrases: tuple[Phrase, ...]
    template: int
    style: str = "article"
    relation: str | None = None  # phrases[0] is `relation` phrases[1]

    def text(self) -> str:
        """The caption in words."""
        parts = [p.text(self.style) for p in self.phrases]
        be = "is" if self.phrases[0].count == 1 else "are"
        rel = RELATION_TEXT[self.relation] if self.relation else ""
        return _TEMPLATES[self.kind][self.template].format(*parts, be=be, rel=rel)

    def holds(self, scene: Scene) -> bool:
        """True if the claim is true of the scene.

        Each phrase must match exactly its count of objects ("three red
        circles": exactly three), and a relation must be clear between the
        objects the two phrases name (see `spatial_relation`).
        """
        if any(sum(p.matches(o) for o in scene.objects) != p.count for p in self.phrases):
            return False
        if self.relation is None:
            return True
        a, b = (next(o for o in scene.objects if p.matches(o)) for p in self.phrases)
        return spatial_relation(a, b) == self.relation


def _groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(shape, colour, count) for each distinct kind of object, in order of first appearance."""
    tally = Counter((o.shape, o.colour) for o in scene.objects)
    return [(s, c, k) for (s, c), k in tally.items()]


def describe(scene: Scene, rng: random.Random) -> Statement:
    """A random true statement about the scene, in one of its kind's phrasings.

    Raises ValueError for a scene that its kind cannot describe truthfully
    (e.g. a hand-built "relation" scene whose objects are not clearly apart).
    """
    if scene.kind not in _TEMPLATES:
        raise ValueError(f"unknown scene kind {scene.kind!r}")
    template = rng.randrange(len(_TEMPLATES[scene.kind]))
    styles, weights = _STYLES[scene.kind]
    style = rng.choices(styles, weights=weights)[0]
    say_colour = rng.random() < _SAY_COLOUR[scene.kind]
    relation = None
    phrases = [Phrase(k, s, c if say_colour else None) for s, c, k in _groups(scene)]
    if scene.kind == "relation" and len(scene.objects) == 2:
        relation = spatial_relation(*scene.objects)
        if relation is not None and rng.random() < 0.5:  # say it from the other object's side
            phrases.reverse()
            relation = INVERSE_RELATION[relation]
    elif scene.kind in ("mixed", "attributes"):
        rng.shuffle(phrases)  # which group is named first carries no information
    statement = Statement(scene.kind, tuple(phrases), template, style, relation)
    if not _well_formed(statement) or not statement.holds(scene):
        raise ValueError(f"a {scene.kind!r} scene with these objects has no true caption: {scene.to_json()}")
    return statement


def _well_formed(statement: Statement) -> bool:
    expected = {"count": 1, "mixed": 2, "attributes": 2, "relation": 2}[statement.kind]
    return len(statement.phrases) == expected and (statement.kind != "relation" or bool(statement.relation))


def caption(scene: Scene, rng: random.Random) -> str:
    """A random true caption for the scene."""
    return describe(scene, rng).text()


def counterfactuals(
    scene: Scene, rng: random.Random, statement: Statement | None = None
) -> dict[str, list[str]]:
    """False captions in the phrasing of the true one, by the fact they get wrong.

    Keys are always "count" (a wrong count word; count and mixed scenes),
    "attribute_swap" (the colours of the two named objects swapped) and
    "relation_swap" (relation inverted, or subjects swapped); a list is empty
    where the change does not apply or would not be false (e.g. swapping two
    equal colours). Pass the `statement` behind the true caption (from
    `describe`) to get negatives in exactly its template; without one, a
    statement is drawn from `rng`, so an rng in the same state as the one
    given to `caption` yields negatives for that very caption.
    """
    true = statement or describe(scene, rng)
    candidates = {
        "count": _count_variants(true, rng),
        "attribute_swap": _attribute_swaps(true),
        "relation_swap": _relation_swaps(true),
    }
    out: dict[str, list[str]] = {}
    for name, variants in candidates.items():
        texts = [v.text() for v in variants if not v.holds(scene) and v.text() != true.text()]
        out[name] = list(dict.fromkeys(texts))  # unique, in order
    return out


def _wrong_counts(k: int, rng: random.Random, how_many: int) -> list[int]:
    """Wrong counts, the hardest first: k-1 and k+1, then a random other."""
    top = max(MAX_TRAIN_COUNT, k + 1)
    near = [c for c in (k - 1, k + 1) if 1 <= c <= top]
    far = [c for c in range(1, top + 1) if c != k and c not in near]
    rng.shuffle(near)
    return (near + ([rng.choice(far)] if far else []))[:how_many]


def _count_variants(s: Statement, rng: random.Random) -> list[Statement]:
    if s.kind not in ("count", "mixed"):
        return []
    how_many = 3 if s.kind == "count" else 1  # mixed: one per group
    out = []
    for i, p in enumerate(s.phrases):
        for wrong in _wrong_counts(p.count, rng, how_many):
            phrases = list(s.phrases)
            phrases[i] = dataclasses.replace(p, count=wrong)
            out.append(dataclasses.replace(s, phrases=tuple(phrases)))
    return out


def _attribute_swaps(s: Statement) -> list[Statement]:
    if len(s.phrases) != 2:
        return []
    a, b = s.phrases
    if a.colour is None or b.colour is None or a.colour == b.colour:
        return []  # nothing to swap: the "swap" would say the same thing
    swapped = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
    return [dataclasses.replace(s, phrases=swapped)]


def _relation_swaps(s: Statement) -> list[Statement]:
    if s.relation is None:
        return []
    return [
        dataclasses.replace(s, phrases=s.phrases[::-1]),
        dataclasses.replace(s, relation=INVERSE_RELATION[s.relation]),
    ]


