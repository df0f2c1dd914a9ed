"""CountBench: the number-word substitution on tricky captions, and the adapter on real files and URLs."""

from __future__ import annotations

import json

import pytest
from http_server import closed_port, serve
from test_eval_support import noise, save, solid, tiny_encoder
from vlp.eval.features import FeatureStore
from vlp.eval.tasks.base import Context
from vlp.eval.tasks.counting import CountingSpec, CountingTask, substitute

# ---------------------------------------------------------------------- substitution


@pytest.mark.parametrize(
    ("caption", "number", "new", "expected"),
    [
        ("two dogs on a sofa", 2, 3, "three dogs on a sofa"),
        # repeated word: every occurrence
        (
            "two cats and two dogs, two of them asleep",
            2,
            7,
            "seven cats and seven dogs, seven of them asleep",
        ),
        # capitalised and all caps keep their case
        ("Two birds. TWO birds!", 2, 5, "Five birds. FIVE birds!"),
        # words inside other words are not numbers
        (
            "someone holds one apple, often alone by the stone",
            1,
            4,
            "someone holds four apple, often alone by the stone",
        ),
        ("often ten kittens listen", 10, 2, "often two kittens listen"),
        ("a network of nine nodes, canine nine", 9, 8, "a network of eight nodes, canine eight"),
        # hyphenated compounds are other words; possessives too
        ("a two-tone car with two wheels", 2, 3, "a two-tone car with three wheels"),
        ("forty-two mugs and six cups", 6, 9, "forty-two mugs and nine cups"),
        # punctuation around the word is fine
        ('"Three" puppies (three)', 3, 4, '"Four" puppies (four)'),
    ],
)
def test_substitute_tricky_captions(caption, number, new, expected):
    assert substitute(caption, number, new) == expected


def test_substitute_needs_the_word_itself():
    assert substitute("2 dogs on a sofa", 2, 3) is None  # a digit is not the word
    assert substitute("a twosome of dogs", 2, 3) is None
    assert substitute("the two-tone dogs", 2, 3) is None


# ---------------------------------------------------------------------- adapter + scoring


def _task(tmp_path, items, **spec):
    path = tmp_path / "CountBench.json"
    path.write_text(json.dumps(items))
    cfg = {"name": "cb", "type": "counting", "dataset": {"format": "countbench", "path": str(path)}} | spec
    task = CountingTask(CountingSpec.model_validate(cfg), Context(cache_dir=tmp_path / "cache"))
    task.load()
    return task


def _run(task):
    store = FeatureStore(tiny_encoder(), workers=4, progress=False)
    refs, texts = task.inputs()
    store.prefetch(refs, texts, task.name, task.fetch_options())
    return task.score(store)


def test_countbench_local_file_and_http_images_with_failures_skipped(tmp_path):
    web = tmp_path / "web"
    save(noise(1), web / "dogs.jpg", "JPEG")
    save(noise(2), web / "cats.png", "PNG")
    save(solid((200, 10, 10)), tmp_path / "local" / "apples.png")
    with serve(web) as (base, hits):
        items = [
            {"image_url": f"{base}/dogs.jpg", "text": "Two dogs and two bowls", "number": 2},
            {"image_url": f"{base}/cats.png", "text": "five cats on a roof", "number": 5},
            {"image_url": "local/apples.png", "text": "ten apples, often red", "number": 10},
            {"image_url": f"file://{tmp_path}/local/apples.png", "text": "nine apples", "number": 9},
            {"image_url": f"{base}/status/404", "text": "three owls", "number": 3},
            {"image_url": f"http://127.0.0.1:{closed_port()}/x.jpg", "text": "four cups", "number": 4},
            {"image_url": "local/missing.png", "text": "six pens", "number": 6},
            {"image_url": f"{base}/dogs.jpg", "text": "a pair of dogs", "number": 2},  # no number word
            {"image_url": f"{base}/dogs.jpg", "text": "eleven dogs", "number": 11},  # outside two..ten
            {"text": "seven stars", "number": 7},  # malformed
        ]
        task = _task(tmp_path, items, retries=0)
        result = _run(task)
    assert hits["/dogs.jpg"] == 1  # fetched once, though three items name it
    assert result.n_scored == 4 and result.n_items == 10
    reasons = {s.id: s.reason for s in result.skipped}
    assert reasons == {
        "4": "http_404",
        "5": "connection_refused",
        "6": "missing_file",
        "7": "number_word_not_in_caption",
        "8": "number_out_of_range",
        "9": "malformed_item",
    }
    assert "missing.png" in next(s.detail for s in result.skipped if s.id == "6")
    cm = result.details["confusion_matrix"]
    assert cm["labels"] == list(range(2, 11))
    assert sum(map(sum, cm["matrix"])) == 4
    assert sum(cm["matrix"][cm["labels"].index(n)][j] for n in (2, 5, 9, 10) for j in range(9)) == 4
    assert 0.0 <= result.metrics["acc1"] <= 1.0
    assert result.metrics["mean_absolute_deviation"] >= 0


def test_countbench_candidates_and_http_timeout(tmp_path):
    web = tmp_path / "web"
    save(noise(3), web / "a.png")
    with serve(web) as (base, _):
        items = [
            {"image_url": f"{base}/slow/3/a.png", "text": "Three ducks", "number": 3},
            {"image_url": f"{base}/a.png", "text": "THREE ducks", "number": 3},
        ]
        task = _task(tmp_path, items, numbers=[1, 6], timeout=0.5, retries=0)
        assert task.items[1].candidates == (
            "ONE ducks",
            "TWO ducks",
            "THREE ducks",
            "FOUR ducks",
            "FIVE ducks",
            "SIX ducks",
        )
        result = _run(task)
    assert [(s.id, s.reason) for s in result.skipped] == [("0", "timeout")]
    assert result.n_scored == 1 and result.details["numbers"] == [1, 2, 3, 4, 5, 6]


def test_counting_prediction_is_the_best_scoring_caption(tmp_path):
    """Hand-made features: the image matches "four hats" best, the truth is two -> wrong by 2."""
    import torch

    save(solid((0, 0, 0)), tmp_path / "x.png")
    task = _task(tmp_path, [{"image_url": "x.png", "text": "two hats", "number": 2}], numbers=[2, 4])
    store = FeatureStore(tiny_encoder(), progress=False)
    refs, texts = task.inputs()
    e = torch.eye(store.encoder.dim)
    store.insert(images={refs[0].key: e[0]}, texts={"two hats": e[1], "three hats": e[2], "four hats": e[0]})
    result = task.score(store)
    assert result.metrics["acc1"] == 0.0 and result.metrics["mean_absolute_deviation"] == 2.0
    assert result.details["confusion_matrix"]["matrix"] == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert result.details["per_number_acc"] == {"2": 0.0, "3": None, "4": None}
