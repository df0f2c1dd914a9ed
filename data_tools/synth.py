"""Synthetic image/caption pairs: coloured shapes with counts, attributes and relations.

Why this exists: no data set can be downloaded here, yet the project has to
train and evaluate a CLIP end to end. Shapes on a plain background are the
smallest world in which a tiny model, trained on 2 CPU cores in minutes, can
learn something measurable, and in which every caption has a known truth
value: counting ("three red circles"), attribute binding ("a red circle and a
blue square" vs its colour swap) and spatial relations ("... to the left of
...") can be scored against ground truth instead of human labels.

The pieces are separate so that eval sets and hard negatives can reuse them:

    sample_scene(rng, kind, **constraints) -> Scene   what is in the picture
    render(scene, size)                    -> image   how it looks
    describe(scene, rng)                   -> Statement, its .text() is the caption
    counterfactuals(scene, rng)            -> false captions in the same phrasing
    generate(out_dir, n, seed)             -> pairs.csv + images/, for the shard builder

Coordinates are fractions of the image, origin top-left, y growing downwards,
so "above" means a smaller y.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from vlp.errors import UserError

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
_RELATION_TEXT: dict[str, str] = {
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


def _article(phrase: str) -> str:
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


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

Point = tuple[float, float]


def _star(cx: float, cy: float, r: float) -> list[Point]:
    # Five points, tip up; a fat inner radius keeps the points visible when small.
    cy += 0.095 * r  # centre the star's bounding box (its bottom tips sit at 0.81 r)
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.47 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _triangle(cx: float, cy: float, r: float) -> list[Point]:
    # Equilateral, tip up, as large as the box allows, shifted so its box is centred.
    big = 1.15 * r
    cy += big / 4
    return [(cx, cy - big), (cx - 0.866 * big, cy + big / 2), (cx + 0.866 * big, cy + big / 2)]


def _square(cx: float, cy: float, r: float) -> list[Point]:
    h = 0.85 * r  # a full-box square would look much heavier than a circle of the same size
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def _diamond(cx: float, cy: float, r: float) -> list[Point]:
    w = 0.75 * r  # taller than wide, so it never reads as a tilted square
    return [(cx, cy - r), (cx + w, cy), (cx, cy + r), (cx - w, cy)]


def _cross(cx: float, cy: float, r: float) -> list[Point]:
    t = 0.32 * r  # half the arm thickness
    return [
        (cx - t, cy - r),
        (cx + t, cy - r),
        (cx + t, cy - t),
        (cx + r, cy - t),
        (cx + r, cy + t),
        (cx + t, cy + t),
        (cx + t, cy + r),
        (cx - t, cy + r),
        (cx - t, cy + t),
        (cx - r, cy + t),
        (cx - r, cy - t),
        (cx - t, cy - t),
    ]


_POLYGONS: dict[str, Callable[[float, float, float], list[Point]]] = {
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "diamond": _diamond,
    "cross": _cross,
}


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene as an RGB image of size x size pixels.

    Drawn `supersample` times larger and shrunk with LANCZOS, so edges are
    anti-aliased like a photo's instead of jagged; a tiny model then learns
    shapes rather than aliasing patterns.
    """
    big = size * supersample
    image = Image.new("RGB", (big, big), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * big, obj.y * big, obj.size * big / 2
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_POLYGONS[obj.shape](cx, cy, r), fill=fill)
    if supersample == 1:
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS)


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
            return f"{_article(head)} {head}"
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
        rel = _RELATION_TEXT[self.relation] if self.relation else ""
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


# ---------------------------------------------------------------------------
# Writing a data set
# ---------------------------------------------------------------------------

CSV_COLUMNS: tuple[str, ...] = ("url", "caption", "kind", "scene", "counts", "n_objects", "hard_negatives")


def item_rng(seed: int, index: int) -> random.Random:
    """The RNG of item `index`: a function of (seed, index) only, so output ignores worker count."""
    return random.Random(f"vlp-synth:{seed}:{index}")


def make_pair(seed: int, index: int, image_size: int = 64) -> tuple[Scene, str, Image.Image]:
    """Scene, caption and image of item `index` of the data set with this seed."""
    rng = item_rng(seed, index)
    scene = sample_scene(rng)
    return scene, caption(scene, rng), render(scene, image_size)


def _write_chunk(job: tuple[str, int, int, int, int]) -> list[list[str]]:
    """Worker: render items [start, stop), save their PNGs, return their CSV rows in order."""
    out_dir, seed, image_size, start, stop = job
    rows = []
    for i in range(start, stop):
        rng = item_rng(seed, i)  # the same draws as make_pair, then the counterfactuals
        scene = sample_scene(rng)
        statement = describe(scene, rng)
        negatives = json.dumps(counterfactuals(scene, rng, statement), separators=(",", ":"))
        rel = f"images/{i:06d}.png"
        render(scene, image_size).save(os.path.join(out_dir, rel), format="PNG")
        counts = json.dumps(scene.counts(), separators=(",", ":"))
        rows.append([rel, statement.text(), scene.kind, scene.to_json(), counts, str(len(scene.objects)), negatives])
    return rows


def generate(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    image_size: int = 64,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write n pairs as out_dir/images/NNNNNN.png plus out_dir/pairs.csv; return the CSV path.

    The CSV is what `vlp shards build` reads: `url` is relative to the CSV's
    folder, `kind`/`scene`/`counts`/`n_objects` carry the ground truth for
    analysis, and `hard_negatives` the caption's counterfactuals by kind
    (JSON), which the loader feeds to the hard-negative loss term. Output bytes depend only on (n, seed, image_size): each item
    has its own RNG, and rows are written in index order whatever `workers`
    is. PNG keeps the ground truth lossless. The CSV is written last, through
    a temporary file, so a CSV present means a complete set.
    """
    if n < 0:
        raise UserError(f"--n must be >= 0, got {n}")
    if image_size < 16:
        raise UserError(f"--image-size must be >= 16 to keep shapes recognisable, got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    chunk = max(1, min(250, -(-n // max(1, 4 * workers))))
    jobs = [(str(out), seed, image_size, a, min(n, a + chunk)) for a in range(0, n, chunk)]
    csv_path = out / "pairs.csv"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with (
        open(tmp, "w", newline="", encoding="utf-8") as fh,
        tqdm(total=n, unit="pair", desc="synth", leave=False, disable=not progress) as bar,
    ):
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for rows in _run(jobs, workers):
            writer.writerows(rows)
            bar.update(len(rows))
    os.replace(tmp, csv_path)
    return csv_path


def _run(jobs: list[tuple[str, int, int, int, int]], workers: int) -> Iterable[list[list[str]]]:
    """Chunk results in job order, in this process or in a pool of `workers`."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_write_chunk, jobs)
        return
    # spawn, not fork: callers (vlp demo) may have torch's threads running, which fork can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(_write_chunk, jobs)  # imap keeps job order
