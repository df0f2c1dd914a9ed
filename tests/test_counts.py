"""Counting counterfactuals from real captions: the number swapped, stored as the synthetic hard negatives are."""

from __future__ import annotations

import json
import random

import pytest
from shard_helpers import build, noise_image, read_back, save, write_csv
from vlp.data_tools.counts import count_counterfactuals

from vlp.train.loader.batches import hard_negative_captions


@pytest.mark.parametrize("caption,first", [
    ("two dogs on a sofa", "three dogs on a sofa"),
    ("Three cats and the three kittens", "Two cats and the two kittens"),  # said twice: swapped together
    ("3 red apples", "2 red apples"),
    ("a 3D model of 2 cars", "a 3D model of 3 cars"),  # "3D" is no count
    ("TEN boats.", "TWO boats."),
])
def test_a_stated_count_is_swapped_for_each_other_number(caption, first):
    swapped = count_counterfactuals(caption)
    assert swapped[0] == first and len(swapped) == 8 and caption not in swapped and len(set(swapped)) == 8


@pytest.mark.parametrize("caption", ["a dog on a sofa", "two dogs and three cats", "one cat", "the 1920s", ""])
def test_no_single_count_no_counterfactuals(caption):
    assert count_counterfactuals(caption) is None


def test_a_build_stores_them_as_hard_negatives_and_counts_captions(tmp_path):
    captions = ["two dogs on a sofa", "a red car", "5 apples on a table", "two dogs and three cats"]
    rows = []
    for i, caption in enumerate(captions):
        save(noise_image(24, 24, seed=i), tmp_path / "img" / f"{i}.png")
        rows.append({"url": f"img/{i}.png", "caption": caption})
    out = tmp_path / "shards"
    build([write_csv(tmp_path / "p.csv", rows)], out, count_counterfactuals=True)
    samples = {s["caption"]: s["meta"] for s in read_back(out).values()}
    assert samples["two dogs on a sofa"]["hard_negatives"]["count"][0] == "three dogs on a sofa"
    assert samples["5 apples on a table"]["hard_negatives"]["count"][-1] == "10 apples on a table"
    assert "hard_negatives" not in samples["a red car"] and "hard_negatives" not in samples["two dogs and three cats"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"captions_with_count": 2, "captions_without_count": 2}
    # the loader's hard-negative reader takes them as it takes the synthetic set's
    drawn = hard_negative_captions(samples["two dogs on a sofa"], 2, random.Random(0))
    assert len(drawn) == 2 and all(c.endswith("dogs on a sofa") and not c.startswith("two") for c in drawn)
