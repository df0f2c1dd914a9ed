"""Synthetic benchmark sets: public formats, ground truth by construction, caching."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from vlp.eval.shuffle import tokenize
from vlp.eval.synthetic import materialise
from vlp.eval.tasks.aro import SyntheticAro
from vlp.eval.tasks.counting import SyntheticCounting
from vlp.eval.tasks.sugarcrepe import SyntheticSugarCrepe
from vlp.eval.tasks.winoground import SyntheticWinoground


def _words(text: str) -> list[str]:
    return sorted(t.lower() for t in tokenize(text))


def test_counting_set_is_countbench_with_number_words(tmp_path):
    spec = SyntheticCounting(format="synthetic", n=2, min_count=1, max_count=3, image_size=48)
    dataset = materialise("counting", spec, tmp_path)
    items = json.loads(Path(dataset["path"]).read_text())
    assert [i["number"] for i in items] == [1, 1, 2, 2, 3, 3]
    words = {1: "one", 2: "two", 3: "three"}
    for item in items:
        assert words[item["number"]] in tokenize(item["text"]), item
        with Image.open(Path(dataset["path"]).parent / item["image_url"]) as image:
            assert image.size == (48, 48)


def test_materialise_caches_by_parameters(tmp_path):
    spec = SyntheticWinoground(format="synthetic", n=2, image_size=32)
    first = materialise("winoground", spec, tmp_path)
    marker = Path(first["path"]).parent / "dataset.json"
    stamp = marker.stat().st_mtime_ns
    assert materialise("winoground", spec, tmp_path) == first and marker.stat().st_mtime_ns == stamp
    other = materialise(
        "winoground", SyntheticWinoground(format="synthetic", n=2, image_size=32, seed=5), tmp_path
    )
    assert other["path"] != first["path"]
    assert not list((tmp_path / "synthetic").glob("*.tmp-*"))  # nothing half-written left behind


def test_winoground_pairs_use_the_same_words(tmp_path):
    dataset = materialise("winoground", SyntheticWinoground(format="synthetic", n=6, image_size=32), tmp_path)
    lines = [json.loads(x) for x in Path(dataset["path"]).read_text().splitlines()]
    assert [x["tag"] for x in lines] == ["Attribute", "Relation"] * 3
    for x in lines:
        assert x["caption_0"] != x["caption_1"] and _words(x["caption_0"]) == _words(x["caption_1"])
        for k in (0, 1):
            assert (Path(dataset["path"]).parent / "images" / f"{x[f'image_{k}']}.png").is_file()


def test_binding_negatives_are_word_preserving_swaps(tmp_path):
    dataset = materialise("sugarcrepe", SyntheticSugarCrepe(format="synthetic", n=4, image_size=32), tmp_path)
    swap = json.loads((Path(dataset["path"]) / "swap_att.json").read_text())
    assert list(swap) == ["0", "1", "2", "3"]
    for item in swap.values():
        assert item["caption"] != item["negative_caption"]
        assert _words(item["caption"]) == _words(item["negative_caption"])
    rel = json.loads((Path(dataset["path"]) / "replace_rel.json").read_text())
    for item in rel.values():
        assert item["caption"] != item["negative_caption"]
        assert any(w in item["negative_caption"] for w in ("left", "right", "above", "below"))

    vgr = materialise("aro_relation", SyntheticAro(format="synthetic", n=4, image_size=32), tmp_path)
    for item in json.loads(Path(vgr["path"]).read_text()):
        assert item["relation_name"] in ("left of", "right of", "above", "below")
        assert _words(item["true_caption"]) == _words(item["false_caption"])
        assert (item["bbox_w"], item["bbox_h"]) == (32, 32)
