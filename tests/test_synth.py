"""The synthetic generator: captions and counterfactuals checked against ground truth.

Captions are parsed back here with an independent little grammar rather than
with the generator's own `Statement.holds`, so a bug shared by the caption
writer and its truth test cannot hide itself.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from vlp.data_tools.synth import generate, make_pair

from vlp.core import synth
from vlp.core.errors import UserError
from vlp.core.synth import Obj, Scene

# ---------------------------------------------------------------------------
# An independent caption parser and truth test
# ---------------------------------------------------------------------------

_NUMBERS = {
    w: i
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
} | {"a": 1, "an": 1}
_SINGULAR = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "stars": "star",
    "diamonds": "diamond",
    "crosses": "cross",
}
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
_PREFIXES = ("a photo of ", "an image of ", "a picture of ", "there is ", "there are ")
_RELATIONS = {
    " to the left of ": "left of",
    " to the right of ": "right of",
    " above ": "above",
    " below ": "below",
}
_CONNECTIVES = (" together with ", " and ", " with ")
_NOUN_PHRASE = re.compile(rf"^(\w+) (?:({'|'.join(_COLOURS)}) )?(\w+)$")

Phrase = tuple[int, str | None, str]  # count, colour (None: any), shape


def _noun_phrase(text: str) -> Phrase:
    m = _NOUN_PHRASE.match(text)
    assert m, f"not a noun phrase: {text!r}"
    number, colour, noun = m.groups()
    count = int(number) if number.isdigit() else _NUMBERS[number]
    shape = _SINGULAR.get(noun, noun)
    assert shape in _SHAPES, text
    assert (noun == shape) == (count == 1), f"number agreement: {text!r}"
    assert number not in ("a", "an") or number == ("an" if (colour or shape)[0] in "aeiou" else "a"), text
    return count, colour, shape


def parse(text: str) -> tuple[list[Phrase], str | None, str, str | None]:
    """(noun phrases, relation, template prefix, connective) of a caption ("there is/are": "there")."""
    prefix = next((p for p in _PREFIXES if text.startswith(p)), "")
    body = text[len(prefix) :]
    if prefix.startswith("there"):  # "there is/are" agrees with the first phrase
        first = body.split(" ")[0]
        assert (prefix == "there is ") == (first in ("a", "an", "one", "1")), text
    template = "there" if prefix.startswith("there") else prefix
    for sep, relation in _RELATIONS.items():
        if sep in body:
            left, right = body.split(sep)
            return [_noun_phrase(left.removesuffix(" is")), _noun_phrase(right)], relation, template, sep
    for sep in _CONNECTIVES:
        if sep in body:
            return [_noun_phrase(part) for part in body.split(sep)], None, template, sep
    return [_noun_phrase(body)], None, template, None


def _matching(scene: Scene, phrase: Phrase) -> list[Obj]:
    _, colour, shape = phrase
    return [o for o in scene.objects if o.shape == shape and (colour is None or o.colour == colour)]


def _left_of(a: Obj, b: Obj) -> bool:
    return b.x > a.x and abs(b.x - a.x) > abs(b.y - a.y)


def _above(a: Obj, b: Obj) -> bool:
    return b.y > a.y and abs(b.y - a.y) > abs(b.x - a.x)


_GEOMETRY = {
    "left of": _left_of,
    "right of": lambda a, b: _left_of(b, a),
    "above": _above,
    "below": lambda a, b: _above(b, a),
}


def is_true(text: str, scene: Scene) -> bool:
    """Whether a caption is true of the scene: exact counts, and the relation by plain geometry."""
    phrases, relation, _, _ = parse(text)
    if any(len(_matching(scene, p)) != p[0] for p in phrases):
        return False
    if relation is None:
        return True
    (a,), (b,) = (_matching(scene, p) for p in phrases)
    return _GEOMETRY[relation](a, b)


def _scenes(n: int, seed: int = 0) -> list[tuple[Scene, str, int]]:
    """n (scene, caption, rng seed used after sampling) triples."""
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        scene = synth.sample_scene(rng)
        state = rng.getstate()
        text = synth.caption(scene, rng)
        out.append((scene, text, state))
    return out


SCENES = _scenes(400)

# ---------------------------------------------------------------------------
# Vocabulary, scenes, rendering
# ---------------------------------------------------------------------------


def test_vocabulary() -> None:
    assert synth.SHAPES == _SHAPES and tuple(synth.COLOURS) == _COLOURS
    assert [synth.number_word(i) for i in range(1, 7)] == ["one", "two", "three", "four", "five", "six"]
    assert synth.number_word(10) == "ten" and synth.WORD_TO_NUMBER["seven"] == 7
    with pytest.raises(ValueError):
        synth.number_word(11)
    assert len(set(synth.COLOURS.values())) == len(synth.COLOURS)


def test_scene_json_round_trips() -> None:
    for scene, _, _ in SCENES:
        assert Scene.from_json(scene.to_json()) == scene
        assert json.loads(scene.to_json())["objects"][0].keys() == {"shape", "colour", "x", "y", "size"}


def test_counts() -> None:
    scene = Scene(
        (
            Obj("star", "red", 0.2, 0.2, 0.1),
            Obj("star", "blue", 0.5, 0.5, 0.1),
            Obj("circle", "red", 0.8, 0.8, 0.1),
        ),
        "mixed",
    )
    assert scene.counts() == {
        "shape": {"circle": 1, "star": 2},
        "colour": {"blue": 1, "red": 2},
        "colour_shape": {"blue star": 1, "red circle": 1, "red star": 1},
    }
    assert scene.count("star") == 2 and scene.count(colour="red") == 2 and scene.count("star", "red") == 1


def test_objects_inside_and_not_overlapping() -> None:
    rng = random.Random(1)
    crowded = [synth.sample_scene(rng, "count", n=synth.MAX_COUNT) for _ in range(20)]
    for scene in [s for s, _, _ in SCENES] + crowded:
        objs = scene.objects
        for i, a in enumerate(objs):
            assert synth.MARGIN - 1e-9 <= a.x - a.size / 2 and a.x + a.size / 2 <= 1 - synth.MARGIN + 1e-9
            assert synth.MARGIN - 1e-9 <= a.y - a.size / 2 and a.y + a.size / 2 <= 1 - synth.MARGIN + 1e-9
            assert a.size >= 0.1  # >= 6 px at 64 px
            for b in objs[i + 1 :]:
                reach = (a.size + b.size) / 2
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach, scene


def test_all_kinds_shapes_colours_and_relations_appear() -> None:
    kinds = Counter(s.kind for s, _, _ in SCENES)
    assert set(kinds) == set(synth.KINDS) and min(kinds.values()) >= 40
    assert {o.shape for s, _, _ in SCENES for o in s.objects} == set(_SHAPES)
    assert {o.colour for s, _, _ in SCENES for o in s.objects} == set(_COLOURS)
    assert {parse(t)[1] for _, t, _ in SCENES} == {None, *_GEOMETRY}
    assert {len(s.objects) for s, _, _ in SCENES if s.kind == "count"} == set(range(1, 7))
    assert any(re.search(r"\d", t) for _, t, _ in SCENES)  # digit phrasing is used too
    assert len({parse(t)[2] for _, t, _ in SCENES}) == len(_PREFIXES)  # there is/are: one template


def test_render_draws_each_object_in_its_colour() -> None:
    for scene, _, _ in SCENES[:60]:
        image = synth.render(scene, 64)
        assert image.mode == "RGB" and image.size == (64, 64)
        for o in scene.objects:
            pixel = image.getpixel((int(o.x * 64), int(o.y * 64)))
            assert max(abs(p - q) for p, q in zip(pixel, synth.COLOURS[o.colour], strict=True)) < 60, o
        corner = image.getpixel((0, 0))
        assert max(abs(p - q) for p, q in zip(corner, scene.background, strict=True)) <= 2


# ---------------------------------------------------------------------------
# Captions and counterfactuals
# ---------------------------------------------------------------------------


def test_captions_agree_with_ground_truth() -> None:
    for scene, text, _ in SCENES:
        assert is_true(text, scene), (text, scene)
        phrases, relation, _, _ = parse(text)
        # every object is accounted for: the caption is about the whole picture
        assert sum(p[0] for p in phrases) == len(scene.objects), text
        if scene.kind == "count":
            assert phrases[0][0] == len(scene.objects)
        if scene.kind == "relation":
            a, b = (_matching(scene, p)[0] for p in phrases)
            main = abs(b.x - a.x) if relation in ("left of", "right of") else abs(b.y - a.y)
            assert main >= synth.REL_MIN_DIST, text  # clearly apart, not a borderline call


def test_counterfactuals_are_false_and_keep_the_phrasing() -> None:
    seen = Counter()
    for scene, text, state in SCENES:
        rng = random.Random()
        rng.setstate(state)  # the rng as `caption` got it: negatives for that very caption
        negatives = synth.counterfactuals(scene, rng)
        assert set(negatives) == {"count", "attribute_swap", "relation_swap"}
        _, _, prefix, connective = parse(text)
        for name, texts in negatives.items():
            seen[name] += bool(texts)
            for neg in texts:
                assert neg != text and not is_true(neg, scene), (name, neg, text)
                assert parse(neg)[2] == prefix, (neg, text)  # same template
                if name != "relation_swap":
                    assert parse(neg)[3] == connective, (neg, text)
        if scene.kind in ("count", "mixed"):
            assert negatives["count"], text
        if scene.kind == "attributes":
            assert negatives["attribute_swap"], text
        if scene.kind == "relation":
            assert len(negatives["relation_swap"]) == 2, text
    assert min(seen.values()) > 20


def test_counterfactual_examples() -> None:
    scene = Scene(
        (Obj("square", "blue", 0.25, 0.5, 0.2), Obj("triangle", "green", 0.75, 0.55, 0.2)), "relation"
    )
    statement = synth.Statement(
        "relation",
        (synth.Phrase(1, "square", "blue"), synth.Phrase(1, "triangle", "green")),
        0,
        "article",
        "left of",
    )
    assert statement.text() == "a blue square to the left of a green triangle" and statement.holds(scene)
    negatives = synth.counterfactuals(scene, random.Random(0), statement)
    assert negatives["attribute_swap"] == ["a green square to the left of a blue triangle"]
    assert negatives["relation_swap"] == [
        "a green triangle to the left of a blue square",
        "a blue square to the right of a green triangle",
    ]
    assert negatives["count"] == []


def test_attribute_swap_skipped_when_colours_are_shared() -> None:
    rng = random.Random(3)
    for _ in range(30):
        scene = synth.sample_scene(rng, "relation", colours=("red", "red"))
        negatives = synth.counterfactuals(scene, rng)
        assert negatives["attribute_swap"] == [] and negatives["relation_swap"]
        scene = synth.sample_scene(rng, "mixed", colours=("blue", "blue"))
        assert synth.counterfactuals(scene, rng)["attribute_swap"] == []


def test_constraints_are_honoured() -> None:
    rng = random.Random(5)
    scene = synth.sample_scene(rng, "count", n=4, shape="star", colour="blue")
    assert scene.counts()["colour_shape"] == {"blue star": 4}
    scene = synth.sample_scene(rng, "mixed", counts=(2, 1), shapes=("star", "circle"))
    assert scene.counts()["shape"] == {"circle": 1, "star": 2}
    scene = synth.sample_scene(rng, "attributes", shapes=(None, "cross"), colours=("orange", None))
    assert scene.objects[0].colour == "orange" and scene.objects[1].shape == "cross"
    for relation in synth.RELATIONS:
        scene = synth.sample_scene(rng, "relation", relation=relation)
        assert _GEOMETRY[relation](*scene.objects)
        assert synth.spatial_relation(*scene.objects) == relation


@pytest.mark.parametrize(
    "kind, constraints",
    [
        (None, {"n": 3}),  # constraints without a kind
        ("count", {"shapes": ("circle", "star")}),  # wrong constraint for the kind
        ("count", {"n": 11}),
        ("count", {"shape": "hexagon"}),
        ("attributes", {"colours": ("red", "red")}),
        ("relation", {"shapes": ("star", "star"), "colours": ("red", "red")}),
        ("relation", {"relation": "behind"}),
        ("mixed", {"counts": (0, 2)}),
        ("sideways", {}),
    ],
)
def test_bad_constraints_are_refused(kind: str | None, constraints: dict) -> None:
    with pytest.raises(ValueError):
        synth.sample_scene(random.Random(0), kind, **constraints)


def test_describe_refuses_a_scene_it_cannot_caption_truthfully() -> None:
    close = Scene((Obj("star", "red", 0.45, 0.5, 0.1), Obj("circle", "blue", 0.55, 0.5, 0.1)), "relation")
    with pytest.raises(ValueError):
        synth.caption(close, random.Random(0))


# ---------------------------------------------------------------------------
# generate(): files, determinism, workers
# ---------------------------------------------------------------------------


def _snapshot(csv_path: Path) -> dict[str, bytes]:
    root = csv_path.parent
    files = {"pairs.csv": csv_path.read_bytes()}
    files |= {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}
    return files


def test_generate_writes_csv_and_images(tmp_path: Path) -> None:
    csv_path = generate(tmp_path / "out", n=30, seed=0, image_size=48, progress=False)
    assert csv_path == tmp_path / "out" / "pairs.csv"
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["url", "caption", "kind", "scene", "counts", "n_objects", "hard_negatives"]
        rows = list(reader)
    assert [r["url"] for r in rows] == [f"images/{i:06d}.png" for i in range(30)]
    for row in rows:
        assert not Path(row["url"]).is_absolute()
        with Image.open(csv_path.parent / row["url"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (48, 48)
        scene = Scene.from_json(row["scene"])
        assert scene.kind == row["kind"] and int(row["n_objects"]) == len(scene.objects)
        assert json.loads(row["counts"]) == scene.counts()
        assert is_true(row["caption"], scene)
        negatives = json.loads(row["hard_negatives"])
        assert set(negatives) == {"count", "attribute_swap", "relation_swap"}
        flat = [c for kind in negatives.values() for c in kind]
        assert flat, "every synthetic caption has at least one counterfactual"
        assert all(not is_true(c, scene) for c in flat)
    # the rows are exactly make_pair's items
    scene, text, image = make_pair(0, 7, 48)
    assert rows[7]["caption"] == text and Scene.from_json(rows[7]["scene"]) == scene


def test_generate_is_deterministic_and_ignores_workers(tmp_path: Path) -> None:
    first = _snapshot(generate(tmp_path / "a", n=24, seed=0, progress=False))
    again = _snapshot(generate(tmp_path / "b", n=24, seed=0, progress=False))
    pooled = _snapshot(generate(tmp_path / "c", n=24, seed=0, workers=2, progress=False))
    other = _snapshot(generate(tmp_path / "d", n=24, seed=1, progress=False))
    assert len(first) == 25
    assert first == again == pooled
    assert other["pairs.csv"] != first["pairs.csv"]
    assert sum(other[k] != first[k] for k in first) >= 20


def test_generate_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        generate(tmp_path, n=-1, seed=0)
    with pytest.raises(UserError):
        generate(tmp_path, n=1, seed=0, image_size=8)
    empty = generate(tmp_path / "empty", n=0, seed=0, progress=False)
    assert empty.read_text() == "url,caption,kind,scene,counts,n_objects,hard_negatives\n"
