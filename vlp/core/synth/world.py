"""The synthetic world: what is in a picture (objects, counts, relations), sampled with known truth."""


from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "cross": "crosses",
}
# Saturated, well separated hues: a 64 px image leaves no room for subtle ones.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 200, 0),
    "purple": (135, 50, 175),
    "orange": (245, 125, 10),
}
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
WORD_TO_NUMBER: dict[str, int] = {w: i for i, w in enumerate(NUMBER_WORDS)}

KINDS: tuple[str, ...] = ("count", "mixed", "attributes", "relation")
# Counting gets the largest share: it is the skill CLIP is known to lack.
KIND_WEIGHTS: tuple[float, ...] = (0.3, 0.2, 0.25, 0.25)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
RELATION_TEXT: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

MAX_TRAIN_COUNT = 6  # counts a random scene uses
MAX_COUNT = 10  # counts a caller may ask for, e.g. to test generalisation past training

MARGIN = 0.05  # empty border, so a mild random crop in training does not cut objects
GAP = 0.02  # minimum space between the bounding boxes of two objects
# A relation is "clear" when the centres are far apart along one axis and
# the offset along the other axis is small in comparison. Generation asks for
# more than the truth test accepts, so generated scenes are true with room to spare.
REL_MIN_DIST, REL_MAX_SLOPE = 0.15, 0.5
_GEN_MIN_DIST, _GEN_MAX_SLOPE = 0.3, 0.35


def number_word(n: int) -> str:
    """The English word for 0..10 ("three"): captions and eval prompts spell counts."""
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"no number word for {n}")
    return NUMBER_WORDS[n]


def with_article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One shape: centre (x, y) and size (side of its bounding box) as fractions of the image."""

    shape: str
    colour: str
    x: float
    y: float
    size: float

    def overlaps(self, other: Obj, gap: float = GAP) -> bool:
        """True if the bounding boxes, grown by `gap`, intersect: shapes are drawn inside them."""
        reach = (self.size + other.size) / 2 + gap
        return abs(self.x - other.x) < reach and abs(self.y - other.y) < reach

    def inside(self, margin: float = MARGIN) -> bool:
        """True if the bounding box keeps `margin` from every image edge."""
        half = self.size / 2
        lo, hi = margin - 1e-9, 1 - margin + 1e-9
        return lo <= self.x - half and self.x + half <= hi and lo <= self.y - half and self.y + half <= hi


@dataclass(frozen=True)
class Scene:
    """What is in one picture: the ground truth every caption is checked against."""

    objects: tuple[Obj, ...]
    kind: str
    background: tuple[int, int, int] = (240, 240, 240)

    def to_json(self) -> str:
        """Compact JSON (kind, background, objects); `Scene.from_json` inverts it exactly."""
        return json.dumps(
            {
                "kind": self.kind,
                "background": list(self.background),
                "objects": [dataclasses.asdict(o) for o in self.objects],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """Rebuild a scene from `to_json` output (e.g. the CSV's `scene` column)."""
        data = json.loads(text)
        objects = tuple(Obj(**o) for o in data["objects"])
        return cls(objects=objects, kind=data["kind"], background=tuple(data["background"]))

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        """Objects matching a shape and/or colour (None matches any)."""
        return sum(
            1
            for o in self.objects
            if (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
        )

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts by "shape", by "colour" and by "colour_shape" ("red circle"), keys sorted."""

        def tally(keys: Iterable[str]) -> dict[str, int]:
            return dict(sorted(Counter(keys).items()))

        return {
            "shape": tally(o.shape for o in self.objects),
            "colour": tally(o.colour for o in self.objects),
            "colour_shape": tally(f"{o.colour} {o.shape}" for o in self.objects),
        }


def spatial_relation(a: Obj, b: Obj) -> str | None:
    """Where `a` is relative to `b` ("left of", ...) if that is clear, else None.

    Clear means: centres at least REL_MIN_DIST apart along one axis, and the
    offset along the other axis at most REL_MAX_SLOPE of that. A relation
    caption is true only if this returns its relation, so a relation that is
    not clear is never claimed and its inverse is always false.
    """
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= REL_MIN_DIST and abs(dy) <= REL_MAX_SLOPE * abs(dx):
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= REL_MIN_DIST and abs(dx) <= REL_MAX_SLOPE * abs(dy):
        return "above" if dy > 0 else "below"
    return None


# ---------------------------------------------------------------------------
# Sampling scenes
# ---------------------------------------------------------------------------

_ALLOWED: dict[str, frozenset[str]] = {
    "count": frozenset({"n", "shape", "colour"}),
    "mixed": frozenset({"counts", "shapes", "colours"}),
    "attributes": frozenset({"shapes", "colours"}),
    "relation": frozenset({"relation", "shapes", "colours"}),
}
Pair = tuple[str | None, str | None]


def sample_scene(
    rng: random.Random,
    kind: str | None = None,
    *,
    n: int | None = None,
    shape: str | None = None,
    colour: str | None = None,
    counts: tuple[int, int] | None = None,
    shapes: Pair | None = None,
    colours: Pair | None = None,
    relation: str | None = None,
) -> Scene:
    """Draw a random scene of `kind` (random by KIND_WEIGHTS if None), honouring constraints.

    Constraints let eval sets and hard-negative builders ask for exactly what
    they need; each applies to some kinds only (a mismatch is a ValueError):

    - count: `n` objects (1..MAX_COUNT), all of one `shape` and `colour`;
    - mixed: two groups of different shapes, `counts=(k1, k2)` (k1 + k2 <= MAX_COUNT),
      `shapes=(s1, s2)`, `colours=(c1, c2)` (colours may coincide);
    - attributes: two objects of different `shapes` and different `colours`;
    - relation: objects[0] is `relation` ("left of", ...) of objects[1]; the two
      differ in shape or colour so a caption can tell them apart.

    In `shapes`/`colours` either entry may be None to leave it random.
    """
    given = {
        k
        for k, v in dict(
            n=n, shape=shape, colour=colour, counts=counts, shapes=shapes, colours=colours, relation=relation
        ).items()
        if v is not None
    }
    if kind is None:
        if given:
            raise ValueError(f"constraints {sorted(given)} need an explicit kind")
        kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    if kind not in _ALLOWED:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
    if given - _ALLOWED[kind]:
        raise ValueError(f"kind {kind!r} takes constraints {sorted(_ALLOWED[kind])}, got {sorted(given)}")
    _check_names(shape, colour, shapes, colours, relation)

    if kind == "count":
        specs = _count_specs(rng, n, shape, colour)
    elif kind == "mixed":
        specs = _mixed_specs(rng, counts, shapes, colours)
    elif kind == "attributes":
        specs = list(
            zip(
                _pick_two(rng, SHAPES, shapes, distinct=True),
                _pick_two(rng, tuple(COLOURS), colours, distinct=True),
                strict=True,
            )
        )
    else:
        specs = _relation_specs(rng, shapes, colours)
    background = _background(rng)
    if kind == "relation":
        objects = _place_relation(rng, specs, relation or rng.choice(RELATIONS))
    else:
        objects = _place(rng, specs)
    return Scene(objects=objects, kind=kind, background=background)


def _check_names(
    shape: str | None, colour: str | None, shapes: Pair | None, colours: Pair | None, relation: str | None
) -> None:
    for name in [shape, *(shapes or ())]:
        if name is not None and name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; expected one of {SHAPES}")
    for name in [colour, *(colours or ())]:
        if name is not None and name not in COLOURS:
            raise ValueError(f"unknown colour {name!r}; expected one of {tuple(COLOURS)}")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    for pair in (shapes, colours):
        if pair is not None and len(pair) != 2:
            raise ValueError(f"expected a pair, got {pair!r}")


def _pick_two(rng: random.Random, pool: Sequence[str], fixed: Pair | None, distinct: bool) -> tuple[str, str]:
    """Two values from `pool`, keeping the fixed ones, different from each other if `distinct`."""
    first, second = fixed or (None, None)
    if distinct and first is not None and first == second:
        raise ValueError(f"the two values must differ, got {first!r} twice")
    first = first if first is not None else rng.choice([p for p in pool if not distinct or p != second])
    second = second if second is not None else rng.choice([p for p in pool if not distinct or p != first])
    return first, second


def _count_specs(
    rng: random.Random, n: int | None, shape: str | None, colour: str | None
) -> list[tuple[str, str]]:
    if n is not None and not 1 <= n <= MAX_COUNT:
        raise ValueError(f"n must be in 1..{MAX_COUNT}, got {n}")
    n = n if n is not None else rng.randint(1, MAX_TRAIN_COUNT)
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(tuple(COLOURS))
    return [(shape, colour)] * n


def _mixed_specs(
    rng: random.Random, counts: tuple[int, int] | None, shapes: Pair | None, colours: Pair | None
) -> list[tuple[str, str]]:
    if counts is None:
        # uniform over the pairs with k1, k2 >= 1 and k1 + k2 <= MAX_TRAIN_COUNT
        pairs = [(a, b) for a in range(1, MAX_TRAIN_COUNT) for b in range(1, MAX_TRAIN_COUNT - a + 1)]
        counts = rng.choice(pairs)
    if len(counts) != 2 or min(counts) < 1 or sum(counts) > MAX_COUNT:
        raise ValueError(f"counts must be two numbers >= 1 summing to <= {MAX_COUNT}, got {counts}")
    s1, s2 = _pick_two(rng, SHAPES, shapes, distinct=True)  # distinct: "two stars and a circle"
    c1, c2 = _pick_two(rng, tuple(COLOURS), colours, distinct=False)
    return [(s1, c1)] * counts[0] + [(s2, c2)] * counts[1]


def _relation_specs(rng: random.Random, shapes: Pair | None, colours: Pair | None) -> list[tuple[str, str]]:
    """Two (shape, colour) pairs that differ, so "a red star" names exactly one object."""
    for _ in range(100):
        s = _pick_two(rng, SHAPES, shapes, distinct=False)
        c = _pick_two(rng, tuple(COLOURS), colours, distinct=False)
        if (s[0], c[0]) != (s[1], c[1]):
            return [(s[0], c[0]), (s[1], c[1])]
    raise ValueError(f"relation objects must differ in shape or colour, got {shapes} {colours}")


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A light grey with a slight tint: varied enough not to be a cue, pale enough for yellow."""
    grey = rng.randint(222, 246)
    return tuple(min(255, grey + rng.randint(-8, 8)) for _ in range(3))  # type: ignore[return-value]


def _size_range(n_objects: int) -> tuple[float, float]:
    """Object sizes for a scene of n objects: as big as fits, never under ~8 px at 64 px."""
    if n_objects <= 1:
        return 0.28, 0.5
    if n_objects == 2:
        return 0.22, 0.36
    if n_objects <= 4:
        return 0.18, 0.28
    if n_objects <= 6:
        return 0.15, 0.22
    return 0.13, 0.18


def _drop(rng: random.Random, shape: str, colour: str, size: float, placed: list[Obj]) -> Obj | None:
    """Reject-sample a position for one object that overlaps none of `placed`."""
    lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
    for _ in range(100):
        # Rounded before the overlap test, so the stored ground truth is exactly what was tested.
        obj = Obj(shape, colour, round(rng.uniform(lo, hi), 4), round(rng.uniform(lo, hi), 4), size)
        if not any(obj.overlaps(p) for p in placed):
            return obj
    return None


def _place(rng: random.Random, specs: list[tuple[str, str]]) -> tuple[Obj, ...]:
    """Place objects one by one; if one does not fit, start over with slightly smaller sizes."""
    lo, hi = _size_range(len(specs))
    scale = 1.0
    for _ in range(50):
        placed: list[Obj] = []
        for shape, colour in specs:
            obj = _drop(rng, shape, colour, round(rng.uniform(lo, hi) * scale, 4), placed)
            if obj is None:
                break
            placed.append(obj)
        else:
            return tuple(placed)
        scale *= 0.93
    raise RuntimeError(f"could not place {len(specs)} objects without overlap")


def _place_relation(rng: random.Random, specs: list[tuple[str, str]], relation: str) -> tuple[Obj, ...]:
    """Place objects[0] clearly `relation` of objects[1]: far apart on one axis, close on the other."""
    lo, hi = _size_range(2)
    for _ in range(1000):
        sizes = [round(rng.uniform(lo, hi), 4) for _ in specs]
        # Sample along the relation's axis ("main") and across it ("side"); swap for above/below.
        main = [rng.uniform(MARGIN + s / 2, 1 - MARGIN - s / 2) for s in sizes]
        dist = abs(main[1] - main[0])
        side0 = rng.uniform(MARGIN + sizes[0] / 2, 1 - MARGIN - sizes[0] / 2)
        side = [side0, side0 + rng.uniform(-1, 1) * _GEN_MAX_SLOPE * dist]
        if relation in ("left of", "above") and main[0] > main[1]:
            main.reverse()  # objects[0] must have the smaller coordinate
        if relation in ("right of", "below") and main[0] < main[1]:
            main.reverse()
        xy = (
            list(zip(main, side, strict=True))
            if relation in ("left of", "right of")
            else list(zip(side, main, strict=True))
        )
        objs = tuple(
            Obj(sh, co, round(x, 4), round(y, 4), s)
            for (sh, co), (x, y), s in zip(specs, xy, sizes, strict=True)
        )
        if (
            dist >= _GEN_MIN_DIST
            and all(o.inside() for o in objs)
            and not objs[0].overlaps(objs[1])
            and spatial_relation(objs[0], objs[1]) == relation
        ):
            return objs
    raise RuntimeError(f"could not place two objects {relation} each other")


def item_rng(seed: int, index: int) -> random.Random:
    """The RNG of item `index`: a function of (seed, index) only, so output ignores worker count."""
    return random.Random(f"vlp-synth:{seed}:{index}")
