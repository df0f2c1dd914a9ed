"""Adapters read small fixtures written in the exact public formats (images made with PIL)."""

from __future__ import annotations

import csv
import io
import json
import random

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from shard_helpers import build
from test_eval_support import noise, save, solid
from vlp.eval.image_refs import ImageFailure, load_image
from vlp.eval.shuffle import PERTURBATIONS, HeuristicTagger, perturb_all, pre_caption, tokenize
from vlp.eval.suite import parse_suite
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.aro import ARO_EXCLUDED_RELATIONS
from vlp.eval.tasks.base import Context
from vlp.eval.tasks.retrieval import Caption

from vlp.core.errors import UserError


def make(tmp_path, spec: dict):
    """Validate one task spec as a suite would, build the task and load it."""
    suite = parse_suite({"tasks": [{"name": "t", **spec}]}, "test")
    task = TASKS[spec["type"]](suite.tasks[0], Context(cache_dir=tmp_path / "cache"))
    task.load()
    return task


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------- zero-shot


def test_zeroshot_image_folder(tmp_path):
    root = tmp_path / "imgs"
    save(solid((255, 0, 0)), root / "n001" / "a.jpg", "JPEG")
    save(solid((0, 255, 0)), root / "n001" / "sub" / "b.png")
    save(solid((0, 0, 255)), root / "n002" / "c.JPEG", "JPEG")
    (root / "n002" / "notes.txt").write_text("not an image")
    task = make(
        tmp_path,
        {
            "type": "zeroshot_classification",
            "dataset": {"format": "folder", "path": str(root), "classnames": ["cat", "dog"]},
        },
    )
    assert task.classnames == ["cat", "dog"]
    assert [(it.id, it.label) for it in task.items] == [
        ("n001/a.jpg", 0),
        ("n001/sub/b.png", 0),
        ("n002/c.JPEG", 1),
    ]
    assert len(task.templates) == 80  # no templates given, no dataset templates: CLIP's ImageNet 80
    with pytest.raises(UserError, match="3 class names for 2 class folders"):
        make(
            tmp_path,
            {
                "type": "zeroshot_classification",
                "dataset": {"format": "folder", "path": str(root), "classnames": ["a", "b", "c"]},
            },
        )


def test_zeroshot_csv_names_indices_and_unknown_labels(tmp_path):
    save(solid((1, 2, 3)), tmp_path / "x" / "1.png")
    rows = [
        ("x/1.png", "dog"),
        ("x/1.png", "1"),
        ("x/1.png", "zebra"),
        (str(tmp_path / "x" / "1.png"), "cat"),
    ]
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "label"), *rows])
    spec = {
        "type": "zeroshot_classification",
        "templates": ["a {c}"],
        "dataset": {"format": "csv", "path": str(tmp_path / "labels.csv"), "classnames": ["cat", "dog"]},
    }
    task = make(tmp_path, spec)
    assert [(it.id, it.label) for it in task.items] == [
        ("labels.csv:2", 1),
        ("labels.csv:3", 1),
        ("labels.csv:5", 0),
    ]
    assert {it.image.source for it in task.items} == {str(tmp_path / "x" / "1.png")}
    assert [(s.id, s.reason) for s in task.skipped] == [("labels.csv:4", "unknown_label")]
    # without classnames, the classes are the sorted distinct labels
    spec["dataset"].pop("classnames")
    assert make(tmp_path, spec).classnames == ["1", "cat", "dog", "zebra"]


def _clip_benchmark_classification(root, images_by_label, classnames, templates):
    """The layout of clip_benchmark.webdataset_builder.convert_dataset (lossless webp, .cls labels)."""
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=2) as sink:
        index = 0
        for label, images in images_by_label.items():
            for image in images:
                sink.write(
                    {
                        "__key__": f"s{index:07d}",
                        "webp": png_bytes(image, "WEBP", lossless=True),
                        "cls": label,
                    }
                )
                index += 1
        n = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{n}\n")
    (root / "classnames.txt").write_text("".join(c + "\n" for c in classnames))
    (root / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in templates))


def test_zeroshot_clip_benchmark_webdataset(tmp_path):
    root = tmp_path / "wds_cars"
    images = {0: [solid((255, 0, 0)), noise(1)], 1: [solid((0, 0, 255))]}
    _clip_benchmark_classification(root, images, ["red car", "blue car"], ["a photo of a {c}.", "a {c}"])
    task = make(
        tmp_path, {"type": "zeroshot_classification", "dataset": {"format": "wds", "path": str(root)}}
    )
    assert task.classnames == ["red car", "blue car"]
    assert task.templates == ["a photo of a {c}.", "a {c}"]
    assert [(it.id, it.label) for it in task.items] == [
        ("0.tar/s0000000", 0),
        ("0.tar/s0000001", 0),
        ("1.tar/s0000002", 1),
    ]
    first = load_image(task.items[1].image)
    assert np.array_equal(
        np.asarray(first), np.asarray(noise(1))
    )  # the bytes inside the tar, decoded losslessly


# ---------------------------------------------------------------------- retrieval


def test_retrieval_karpathy_dataset_json_keeps_the_split(tmp_path):
    for name in ("a", "b", "c"):
        save(noise(ord(name)), tmp_path / "val2014" / f"{name}.jpg", "JPEG")
    doc = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "test",
                "sentences": [{"raw": "a one"}, {"raw": "a two"}],
            },
            {"filepath": "val2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "b one"}]},
            {
                "filepath": "val2014",
                "filename": "c.jpg",
                "split": "test",
                "sentences": [{"raw": "c one"}, {"raw": " "}],
            },
        ],
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(doc))
    task = make(
        tmp_path,
        {"type": "retrieval", "dataset": {"format": "karpathy", "path": str(tmp_path / "dataset_coco.json")}},
    )
    assert [im.id for im in task.images] == ["val2014/a.jpg", "val2014/c.jpg"]
    assert task.captions == [Caption("a one", 0), Caption("a two", 0), Caption("c one", 1)]


def test_retrieval_blip_list_form_merges_entries_of_one_image(tmp_path):
    save(noise(1), tmp_path / "img" / "1.jpg", "JPEG")
    save(noise(2), tmp_path / "img" / "2.jpg", "JPEG")
    doc = [
        {"image": "img/1.jpg", "caption": ["one a", "one b"]},
        {"image": "img/2.jpg", "caption": "two a", "image_id": 2},
        {"image": "img/2.jpg", "caption": "two b", "image_id": 2},
        {"caption": "lost"},
    ]
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(doc))
    task = make(
        tmp_path,
        {
            "type": "retrieval",
            "dataset": {"format": "karpathy", "path": str(tmp_path / "flickr30k_test.json")},
        },
    )
    assert task.captions == [
        Caption(c, i) for c, i in (("one a", 0), ("one b", 0), ("two a", 1), ("two b", 1))
    ]
    assert [(s.id, s.reason) for s in task.skipped] == [("[3]", "malformed_item")]


def test_retrieval_csv_pairs(tmp_path):
    save(noise(5), tmp_path / "p.png")
    (tmp_path / "pairs.tsv").write_text("url\ttext\np.png\tfirst\np.png\tsecond\n")
    spec = {
        "format": "csv",
        "path": str(tmp_path / "pairs.tsv"),
        "image_column": "url",
        "caption_column": "text",
    }
    task = make(tmp_path, {"type": "retrieval", "dataset": spec})
    assert task.captions == [Caption("first", 0), Caption("second", 0)] and len(task.images) == 1


def test_retrieval_clip_benchmark_wds_and_our_shards(tmp_path):
    root = tmp_path / "cb"
    (root / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        sink.write(
            {"__key__": "s0000000", "webp": png_bytes(noise(1), "WEBP", lossless=True), "txt": "cap a\ncap b"}
        )
        sink.write({"__key__": "s0000001", "png": png_bytes(noise(2)), "txt": "cap c"})
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    task = make(tmp_path, {"type": "retrieval", "dataset": {"format": "wds", "path": str(root)}})
    assert task.captions == [Caption("cap a", 0), Caption("cap b", 0), Caption("cap c", 1)]

    # shards made by our own builder (img2dataset layout: KEY.jpg + KEY.txt + KEY.json)
    for i in range(3):
        save(noise(10 + i, 40), tmp_path / "raw" / f"{i}.png")
    with open(tmp_path / "raw.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("url", "caption"), *[(f"raw/{i}.png", f"caption {i}") for i in range(3)]])
    build([tmp_path / "raw.csv"], tmp_path / "shards")
    task = make(
        tmp_path, {"type": "retrieval", "dataset": {"format": "wds", "path": str(tmp_path / "shards")}}
    )
    assert sorted(c.text for c in task.captions) == ["caption 0", "caption 1", "caption 2"]
    assert all(not isinstance(load_image(im.image), ImageFailure) for im in task.images)


# ---------------------------------------------------------------------- SugarCrepe, ARO, Winoground


def test_sugarcrepe_folder(tmp_path):
    data, coco = tmp_path / "data", tmp_path / "val2017"
    save(noise(1), coco / "000000000139.jpg", "JPEG")
    data.mkdir()
    entry = {
        "filename": "000000000139.jpg",
        "caption": "a cat on a mat",
        "negative_caption": "a mat on a cat",
    }
    (data / "swap_obj.json").write_text(
        json.dumps({"0": entry, "2": entry, "7": {**entry, "negative_caption": entry["caption"]}})
    )
    (data / "add_att.json").write_text(json.dumps({"1": entry, "3": {"filename": "x.jpg"}}))
    task = make(
        tmp_path,
        {
            "type": "sugarcrepe",
            "dataset": {"format": "sugarcrepe", "path": str(data), "image_root": str(coco)},
        },
    )
    assert task.subsets == ["add_att", "swap_obj"]
    assert [it.id for it in task.items] == ["add_att/1", "swap_obj/0", "swap_obj/2"]
    assert {(s.id, s.reason) for s in task.skipped} == {
        ("add_att/3", "malformed_item"),
        ("swap_obj/7", "identical_captions"),
    }
    with pytest.raises(UserError, match="no replace_rel"):
        make(
            tmp_path,
            {
                "type": "sugarcrepe",
                "dataset": {
                    "format": "sugarcrepe",
                    "path": str(data),
                    "image_root": str(coco),
                    "subsets": ["replace_rel"],
                },
            },
        )


def test_aro_relation_crops_to_the_box(tmp_path):
    image = Image.new("RGB", (60, 40), (0, 0, 0))
    image.paste((255, 0, 0), (10, 5, 30, 25))
    save(image, tmp_path / "aro" / "images" / "2345.jpg", "PNG")
    items = [
        {
            "image_id": "2345",
            "image_path": "2345.jpg",
            "bbox_x": 10,
            "bbox_y": 5,
            "bbox_w": 20,
            "bbox_h": 20,
            "true_caption": "the horse is eating the grass",
            "false_caption": "the grass is eating the horse",
            "relation_name": "eating",
        },
        {
            "image_id": "2345",
            "image_path": "2345.jpg",
            "bbox_x": 0,
            "bbox_y": 0,
            "bbox_w": 60,
            "bbox_h": 40,
            "true_caption": "the cup is next to the plate",
            "false_caption": "the plate is next to the cup",
            "relation_name": "next to",
        },
        {"image_path": "2345.jpg", "true_caption": "x", "false_caption": "y", "relation_name": "on"},
    ]
    (tmp_path / "aro" / "visual_genome_relation.json").write_text(json.dumps(items))
    task = make(
        tmp_path,
        {
            "type": "aro_relation",
            "dataset": {"format": "aro", "path": str(tmp_path / "aro" / "visual_genome_relation.json")},
        },
    )
    assert [it.group for it in task.items] == ["eating", "next to"]
    crop = load_image(task.items[0].image)
    assert crop.size == (20, 20) and (np.asarray(crop) == [255, 0, 0]).all()
    # same file, different crops: different features
    assert task.items[0].image.key != task.items[1].image.key
    assert "next to" in ARO_EXCLUDED_RELATIONS and "eating" not in ARO_EXCLUDED_RELATIONS
    assert [(s.id, s.reason) for s in task.skipped] == [("2", "malformed_item")]


def test_aro_attribution_groups_pairs(tmp_path):
    save(noise(1), tmp_path / "images" / "1.jpg", "JPEG")
    item = {
        "image_path": "1.jpg",
        "bbox_x": 0,
        "bbox_y": 0,
        "bbox_w": 8,
        "bbox_h": 8,
        "true_caption": "the white dog and the black cat",
        "false_caption": "the black dog and the white cat",
        "attributes": ["white", "black"],
    }
    (tmp_path / "visual_genome_attribution.json").write_text(json.dumps([item, item]))
    task = make(
        tmp_path,
        {
            "type": "aro_attribution",
            "dataset": {"format": "aro", "path": str(tmp_path / "visual_genome_attribution.json")},
        },
    )
    assert [it.group for it in task.items] == ["white_black", "white_black"]
    assert task.spec.min_group_size == 25


def test_aro_order_precomputed_and_karpathy(tmp_path):
    save(noise(1), tmp_path / "img" / "1.jpg", "JPEG")
    items = [
        {
            "image": "img/1.jpg",
            "caption_options": [
                "A man riding a horse.",
                "a horse riding a man",
                "man a riding horse a",
                "a a man riding horse",
                "horse a man a riding",
            ],
        },
        {
            "image": "img/1.jpg",
            "caption": "a dog",
            "perturbations": {"shuffle_trigrams": "a dog", "shuffle_within_trigrams": "dog a"},
        },
        {"image": "img/1.jpg", "caption": "a cat", "perturbations": {"shuffle_trigrams": "a cat"}},
    ]
    (tmp_path / "order.json").write_text(json.dumps(items))
    task = make(
        tmp_path,
        {"type": "aro_order", "dataset": {"format": "precomputed", "path": str(tmp_path / "order.json")}},
    )
    assert task.items[0].original == "a man riding a horse"  # ARO's pre_caption: lower case, no full stop
    assert list(task.items[0].shuffles) == list(PERTURBATIONS)
    # the identical shuffle is no negative
    assert task.items[1].shuffles == {"shuffle_within_trigrams": "dog a"}
    assert [(s.id, s.reason) for s in task.skipped] == [("2", "no_distinct_shuffle")]

    (tmp_path / "coco_karpathy_test.json").write_text(
        json.dumps(
            [{"image": "img/1.jpg", "caption": ["a black dog runs on green grass near the old fence"]}]
        )
    )
    spec = {
        "type": "aro_order",
        "seed": 7,
        "dataset": {"format": "karpathy", "path": str(tmp_path / "coco_karpathy_test.json")},
    }
    first, again = make(tmp_path, spec), make(tmp_path, spec)
    assert first.items == again.items and len(first.items[0].shuffles) == 4  # reproducible from the seed


def test_winoground_examples_jsonl(tmp_path):
    for name in ("ex_0_img_0", "ex_0_img_1"):
        save(noise(len(name)), tmp_path / "data" / "images" / f"{name}.png")
    example = {
        "id": 0,
        "caption_0": "an old person kisses a young person",
        "caption_1": "a young person kisses an old person",
        "image_0": "ex_0_img_0",
        "image_1": "ex_0_img_1",
        "tag": "Noun",
        "secondary_tag": "",
        "num_main_preds": 1,
        "collapsed_tag": "Object",
    }
    (tmp_path / "data" / "examples.jsonl").write_text(
        json.dumps(example) + "\n" + json.dumps({"id": 1, "caption_0": "x"}) + "\n"
    )
    task = make(
        tmp_path,
        {
            "type": "winoground",
            "dataset": {"format": "winoground", "path": str(tmp_path / "data" / "examples.jsonl")},
        },
    )
    (example_0,) = task.items
    i0, _ = example_0.images
    assert (example_0.id, example_0.tag) == ("0", "Object") and i0.source.endswith("images/ex_0_img_0.png")
    assert example_0.captions == (example["caption_0"], example["caption_1"])
    assert [(s.id, s.reason) for s in task.skipped] == [("1", "malformed_item")]


# ---------------------------------------------------------------------- ARO shuffles


def test_tokenize_keeps_words_and_splits_punctuation():
    assert tokenize("A man's dog, running.") == ["A", "man's", "dog", ",", "running", "."]


def test_shuffles_are_permutations_that_move_only_their_slots():
    text = "a small black dog sits on the green grass near a wooden fence"
    tagger = HeuristicTagger()
    tags = [tagger.tag(t) for t in tokenize(text)]
    assert [t for t, g in zip(tokenize(text), tags, strict=True) if g == "ADJ"] == [
        "small",
        "black",
        "green",
        "wooden",
    ]
    assert [t for t, g in zip(tokenize(text), tags, strict=True) if g == "NOUN"] == ["dog", "grass", "fence"]
    out = perturb_all(text, random.Random(0), tagger)
    for name, shuffled in out.items():
        assert sorted(shuffled.split()) == sorted(tokenize(text)), name
    na = out["shuffle_nouns_and_adj"].split()
    for tok, tag, new in zip(tokenize(text), tags, na, strict=True):
        if tag == "OTHER":
            assert new == tok  # function words stay put
        else:
            assert tagger.tag(new) == tag  # nouns move to noun slots, adjectives to adjective slots
    trigrams = out["shuffle_within_trigrams"].split()
    words = tokenize(text)
    assert all(sorted(trigrams[i : i + 3]) == sorted(words[i : i + 3]) for i in range(0, len(words), 3))
    assert perturb_all(text, random.Random(0), tagger) == out


def test_pre_caption_matches_aro():
    assert pre_caption('A "big" dog!  Running: fast.', max_words=3) == "a big dog"


# ---------------------------------------------------------------------- shipped suites


def test_shipped_suites_validate():
    from vlp.eval.suite import load_suite

    default = load_suite("default")
    assert [t.type for t in default.tasks].count("zeroshot_classification") == 2
    assert all(t.dataset.format == "synthetic" and t.dataset.seed == 10_000_019 for t in default.tasks)
    public = load_suite("public")
    assert {t.type for t in public.tasks} == set(TASKS)  # every task type has a public-format entry


# ---------------------------------------------------------------------- image loading never raises


def test_bad_images_become_reasons(tmp_path):
    from shard_helpers import bomb_png
    from vlp.eval.image_refs import ImageRef, resolve

    good = save(noise(1, 40), tmp_path / "good.png")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:100])
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        "garbage.jpg": "undecodable_image",
        "cut.png": "undecodable_image",
        "bomb.png": "image_too_large",
        "empty.png": "empty_file",
        "absent.png": "missing_file",
        "ftp://host/x.png": "unsupported_scheme",
    }
    for ref, reason in cases.items():
        failure = load_image(resolve(ref, tmp_path))
        assert isinstance(failure, ImageFailure) and failure.reason == reason, (ref, failure)
    assert isinstance(load_image(ImageRef(str(good), crop=(0, 0, 0, 5))), ImageFailure)
    assert load_image(ImageRef(str(good), crop=(30, 30, 20, 20))).size == (20, 20)  # past the edge: padded
