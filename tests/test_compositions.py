"""Rule-made compositional negatives from real captions, and the build storing them as hard negatives."""

from __future__ import annotations

import json
import random

import pytest
from shard_helpers import build, noise_image, read_back, save, write_csv
from vlp.data_tools.compositions import attribute_swaps, compositional_negatives, relation_swaps

from vlp.train.loader.batches import hard_negative_captions


@pytest.mark.parametrize("caption, attributes, relations", [
    # the synthetic generator's own forms: the rules find what it wrote as counterfactuals
    ("a yellow cross is to the left of a red cross", ["a red cross is to the left of a yellow cross"],
     ["a yellow cross is to the right of a red cross", "a red cross is to the left of a yellow cross"]),
    ("The cat sits on top of the old wooden table", [],
     ["The cat sits underneath the old wooden table", "The old wooden table sits on top of the cat"]),
    ("A small red ball above a big blue box, in a garden",
     ["A big red ball above a small blue box, in a garden", "A small blue ball above a big red box, in a garden"],
     ["A small red ball below a big blue box, in a garden", "A big blue box above a small red ball, in a garden"]),
    ("Red apples and green pears", ["Green apples and red pears"], []),
    ("a red car behind a truck", [], ["a red car in front of a truck", "a truck behind a red car"]),
])
def test_the_rules_trade_attributes_of_one_kind_and_reverse_relations(caption, attributes, relations):
    assert attribute_swaps(caption) == attributes
    assert relation_swaps(caption) == relations


@pytest.mark.parametrize("caption", ["a dog", "a red car", "two dogs", "the leftover pizza", "a redwood forest"])
def test_a_caption_no_rule_applies_to_gets_none(caption):
    # one attribute alone, or a word that merely contains one (leftover, redwood)
    assert compositional_negatives(caption) is None


def test_a_relation_with_one_object_is_reversed_without_a_trade():
    assert relation_swaps("a small car parked outside") == ["a small car parked inside"]


def test_a_build_stores_them_beside_count_counterfactuals_and_counts_captions(tmp_path):
    captions = ["two red cubes left of a blue ball", "a dog", "a small cup on top of a big plate"]
    rows = []
    for i, caption in enumerate(captions):
        save(noise_image(24, 24, seed=i), tmp_path / "img" / f"{i}.png")
        rows.append({"url": f"img/{i}.png", "caption": caption})
    out = tmp_path / "shards"
    build([write_csv(tmp_path / "p.csv", rows)], out, count_counterfactuals=True, compositional_negatives=True)
    samples = {s["caption"]: s["meta"] for s in read_back(out).values()}
    first = samples["two red cubes left of a blue ball"]["hard_negatives"]
    assert set(first) == {"count", "attribute_swap", "relation_swap"}
    assert first["attribute_swap"] == ["two blue cubes left of a red ball"]
    assert first["relation_swap"] == ["two red cubes right of a blue ball", "a blue ball left of two red cubes"]
    assert "hard_negatives" not in samples["a dog"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"captions_with_count": 1, "captions_without_count": 2,
                                  "captions_with_compositional_negatives": 2,
                                  "captions_without_compositional_negatives": 1}
    drawn = hard_negative_captions(samples["a small cup on top of a big plate"], 3, random.Random(0))
    assert sorted(drawn) == sorted(["a big cup on top of a small plate", "a small cup underneath a big plate",
                                    "a big plate on top of a small cup"])
