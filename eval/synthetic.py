"""Synthetic benchmark sets from vlp.core.synth, written in the public formats and cached.

Why: nothing can be downloaded here, yet the report must measure zero-shot
classification, retrieval, counting and compositionality. The shapes world
has ground truth for all of them. Each set is written to disk in the format
of the public benchmark it stands in for, so the very adapters that read the
real files read these:

    zeroshot_classification  shape: an image folder per class; colour: CLIP_benchmark's webdataset layout
    retrieval                Karpathy's dataset_coco.json layout, several true captions per image
    counting                 CountBench.json (numbers as words, min_count..max_count, default one..six)
    sugarcrepe               swap_att.json (colours swapped) and replace_rel.json (relation inverted)
    aro_relation             visual_genome_relation.json (subject and object swapped)
    aro_attribution          visual_genome_attribution.json (attributes swapped)
    aro_order                precomputed ARO order file (four shuffles per caption)
    winoground               examples.jsonl + images/ex_N_img_M.png

Seeds: training data uses small seeds (0, 1, ...); eval sets default to
SYNTH_SEED = 10_000_019, and every item draws from its own RNG keyed by
("vlp-eval", set, seed, index), never from vlp.core.synth's training RNG
(keyed "vlp-synth:seed:index"), so no eval image repeats a training image.

Cache: `cache_dir/synthetic/<task type>-<hash>/`, the hash covering the
generation parameters and the source of this module and of vlp.core.synth,
so a changed generator never serves stale files. A set is written to a
temporary folder and renamed into place: a folder that exists is complete,
and concurrent runs (several ranks) cannot see half a set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from vlp.eval.shuffle import HeuristicTagger, perturb_all, pre_caption, tokenize
from vlp.eval.specs import SyntheticData

from vlp.core import synth
from vlp.core.synth import COLOURS, INVERSE_RELATION, PLURALS, SHAPES, Scene, Statement, describe, render

GENERATOR_VERSION = 1
SHAPE_TEMPLATES = ("a {c}.", "a photo of a {c}.", "a picture of a {c}.", "there is a {c}.")
COLOUR_TEMPLATES = tuple(f"a {{c}} {shape}." for shape in SHAPES)  # an ensemble over every shape
MAX_TRIES = 20


class _Retry(Exception):
    """This draw cannot make a valid item (rare); the next attempt uses a fresh RNG."""


def _draw(make: Callable[[random.Random], Any], kind: str, seed: int, index: int) -> Any:
    for attempt in range(MAX_TRIES):
        try:
            return make(random.Random(f"vlp-eval:{kind}:{seed}:{index}:{attempt}"))
        except (_Retry, ValueError):  # ValueError: vlp.core.synth found no true caption for the scene
            continue
    raise RuntimeError(f"could not draw synthetic {kind} item {index} in {MAX_TRIES} attempts")


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- one writer per set


def _zeroshot(spec: Any, out: Path) -> dict[str, Any]:
    if spec.attribute == "shape":
        for label, shape in enumerate(SHAPES):
            for j in range(spec.n):
                scene = _draw(
                    lambda r, shape=shape: synth.sample_scene(r, "count", n=1, shape=shape),
                    "shape",
                    spec.seed,
                    label * spec.n + j,
                )
                _save(render(scene, spec.image_size), out / shape / f"{j:05d}.png")
        return {"format": "folder", "path": str(out)}
    colours = list(COLOURS)
    (out / "test").mkdir(parents=True)
    with open(out / "test" / "0.tar", "wb") as fh, wds.TarWriter(fh, mtime=0) as sink:
        for label, colour in enumerate(colours):
            for j in range(spec.n):
                index = label * spec.n + j
                scene = _draw(
                    lambda r, colour=colour: synth.sample_scene(r, "count", n=r.randint(1, 3), colour=colour),
                    "colour",
                    spec.seed,
                    index,
                )
                sink.write(
                    {"__key__": f"s{index:07d}", "png": _png(render(scene, spec.image_size)), "cls": label}
                )
    (out / "test" / "nshards.txt").write_text("1\n")
    (out / "classnames.txt").write_text("".join(c + "\n" for c in colours))
    (out / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in COLOUR_TEMPLATES))
    return {"format": "wds", "path": str(out), "split": "test"}


def _retrieval(spec: Any, out: Path) -> dict[str, Any]:
    def make(r: random.Random) -> tuple[Scene, list[str]]:
        scene = synth.sample_scene(r)
        caps: list[str] = []
        for _ in range(10 * spec.captions_per_image):
            text = describe(scene, r).text()
            if text not in caps:
                caps.append(text)
            if len(caps) == spec.captions_per_image:
                break
        return scene, caps

    images = []
    for i in range(spec.n):
        scene, caps = _draw(make, "retrieval", spec.seed, i)
        _save(render(scene, spec.image_size), out / "images" / f"{i:06d}.png")
        sentences = [
            {"raw": c, "tokens": [t.lower() for t in tokenize(c)], "imgid": i, "sentid": i * 10 + k}
            for k, c in enumerate(caps)
        ]
        images.append(
            {
                "filepath": "images",
                "filename": f"{i:06d}.png",
                "imgid": i,
                "split": "test",
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    _write_json(out / "dataset_synthetic.json", {"dataset": "vlp-synthetic", "images": images})
    return {"format": "karpathy", "path": str(out / "dataset_synthetic.json"), "split": "test"}


def _counting(spec: Any, out: Path) -> dict[str, Any]:
    items = []
    for k in range(spec.min_count, spec.max_count + 1):
        for _ in range(spec.n):
            index = len(items)

            def make(r: random.Random, k: int = k) -> tuple[Scene, str]:
                scene = synth.sample_scene(r, "count", n=k)
                # Spelled out ("three"), as CountBench's captions are: the protocol substitutes words.
                return scene, dataclasses.replace(describe(scene, r), style="word").text()

            scene, text = _draw(make, "counting", spec.seed, index)
            _save(render(scene, spec.image_size), out / "images" / f"{index:06d}.png")
            items.append({"image_url": f"images/{index:06d}.png", "text": text, "number": k})
    _write_json(out / "CountBench.json", items)
    return {"format": "countbench", "path": str(out / "CountBench.json")}


def _colour_swap(st: Statement) -> Statement:
    """The statement with the colours of its two phrases exchanged."""
    a, b = st.phrases
    return dataclasses.replace(
        st, phrases=(dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
    )


def _false(scene: Scene, st: Statement) -> str:
    """The statement's text if it is false of the scene, else retry."""
    if st.holds(scene):
        raise _Retry
    return st.text()


def _attribute_pair(r: random.Random) -> tuple[Scene, Statement, str]:
    scene = synth.sample_scene(r, "attributes")
    st = describe(scene, r)
    return scene, st, _false(scene, _colour_swap(st))


def _relation_inverted(r: random.Random) -> tuple[Scene, Statement, str]:
    scene = synth.sample_scene(r, "relation")
    st = describe(scene, r)
    return scene, st, _false(scene, dataclasses.replace(st, relation=INVERSE_RELATION[st.relation]))


def _relation_swapped(r: random.Random) -> tuple[Scene, Statement, str]:
    scene = synth.sample_scene(r, "relation")
    st = describe(scene, r)
    return scene, st, _false(scene, dataclasses.replace(st, phrases=st.phrases[::-1]))


def _sugarcrepe(spec: Any, out: Path) -> dict[str, Any]:
    makers = {"swap_att": _attribute_pair, "replace_rel": _relation_inverted}
    for subset in spec.subsets:
        doc = {}
        for i in range(spec.n):
            scene, st, negative = _draw(makers[subset], f"sugarcrepe-{subset}", spec.seed, i)
            name = f"{subset}_{i:06d}.png"
            _save(render(scene, spec.image_size), out / "images" / name)
            doc[str(i)] = {"filename": name, "caption": st.text(), "negative_caption": negative}
        _write_json(out / "data" / f"{subset}.json", doc)
    return {
        "format": "sugarcrepe",
        "path": str(out / "data"),
        "image_root": str(out / "images"),
        "subsets": list(spec.subsets),
    }


def _aro(kind: str, spec: Any, out: Path) -> dict[str, Any]:
    relation = kind == "aro_relation"
    items = []
    for i in range(spec.n):
        scene, st, false = _draw(_relation_swapped if relation else _attribute_pair, kind, spec.seed, i)
        _save(render(scene, spec.image_size), out / "images" / f"{i:06d}.png")
        item = {
            "image_id": i,
            "image_path": f"{i:06d}.png",
            # The whole image: our scenes hold nothing but the two objects.
            "bbox_x": 0,
            "bbox_y": 0,
            "bbox_w": spec.image_size,
            "bbox_h": spec.image_size,
            "true_caption": st.text(),
            "false_caption": false,
        }
        if relation:
            item["relation_name"] = st.relation
        else:
            item["attributes"] = [p.colour for p in st.phrases]
        items.append(item)
    name = "visual_genome_relation.json" if relation else "visual_genome_attribution.json"
    _write_json(out / name, items)
    return {"format": "aro", "path": str(out / name)}


SYNTH_TAGGER = HeuristicTagger(
    extra_nouns=frozenset(SHAPES)
    | frozenset(PLURALS.values())
    | {"photo", "image", "picture", "left", "right"},
    extra_adjectives=frozenset(COLOURS),
)


def _order(spec: Any, out: Path) -> dict[str, Any]:
    def make(r: random.Random) -> tuple[Scene, str, dict[str, str]]:
        scene = synth.sample_scene(r)
        text = describe(scene, r).text()
        shuffles = perturb_all(text, r, SYNTH_TAGGER)
        if all(pre_caption(s) == pre_caption(text) for s in shuffles.values()):
            raise _Retry  # e.g. "6 green stars": nothing to shuffle, no negative to score against
        return scene, text, shuffles

    items = []
    for i in range(spec.n):
        scene, text, shuffles = _draw(make, "aro_order", spec.seed, i)
        _save(render(scene, spec.image_size), out / "images" / f"{i:06d}.png")
        items.append({"image": f"images/{i:06d}.png", "caption": text, "perturbations": shuffles})
    _write_json(out / "order_precomputed.json", items)
    return {"format": "precomputed", "path": str(out / "order_precomputed.json")}


def _mirror(scene: Scene, axis: str) -> Scene:
    """The scene reflected left-right (axis 'x') or top-bottom ('y'): every relation between objects inverts."""
    objects = tuple(
        dataclasses.replace(o, x=round(1 - o.x, 4))
        if axis == "x"
        else dataclasses.replace(o, y=round(1 - o.y, 4))
        for o in scene.objects
    )
    return dataclasses.replace(scene, objects=objects)


def _winoground_pair(r: random.Random, tag: str) -> tuple[tuple[Scene, Scene], tuple[str, str]]:
    """Two scenes and two captions with the same words, each caption true of its own scene only."""
    if tag == "Attribute":
        scene0 = synth.sample_scene(r, "attributes")
        st0 = describe(scene0, r)
        a, b = scene0.objects
        scene1 = dataclasses.replace(
            scene0, objects=(dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
        )
        st1 = _colour_swap(st0)
    else:
        scene0 = synth.sample_scene(r, "relation")
        st0 = describe(scene0, r)
        scene1 = _mirror(scene0, "x" if st0.relation in ("left of", "right of") else "y")
        st1 = dataclasses.replace(st0, phrases=st0.phrases[::-1])
    if not (st0.holds(scene0) and st1.holds(scene1)) or st0.holds(scene1) or st1.holds(scene0):
        raise _Retry
    return (scene0, scene1), (st0.text(), st1.text())


def _winoground(spec: Any, out: Path) -> dict[str, Any]:
    lines = []
    for i in range(spec.n):
        tag = "Attribute" if i % 2 == 0 else "Relation"
        scenes, captions = _draw(lambda r, tag=tag: _winoground_pair(r, tag), "winoground", spec.seed, i)
        for j, scene in enumerate(scenes):
            _save(render(scene, spec.image_size), out / "images" / f"ex_{i}_img_{j}.png")
        example = {
            "id": i,
            "caption_0": captions[0],
            "caption_1": captions[1],
            "image_0": f"ex_{i}_img_0",
            "image_1": f"ex_{i}_img_1",
            "tag": tag,
            "secondary_tag": "",
            "num_main_preds": 1,
            "collapsed_tag": tag,
        }
        lines.append(json.dumps(example))
    (out / "examples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"format": "winoground", "path": str(out / "examples.jsonl")}


WRITERS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "zeroshot_classification": _zeroshot,
    "retrieval": _retrieval,
    "counting": _counting,
    "sugarcrepe": _sugarcrepe,
    "aro_relation": lambda spec, out: _aro("aro_relation", spec, out),
    "aro_attribution": lambda spec, out: _aro("aro_attribution", spec, out),
    "aro_order": _order,
    "winoground": _winoground,
}


# ---------------------------------------------------------------------- caching


def _source_digest() -> str:
    """Hash of the generator code: this module and vlp.core.synth."""
    h = hashlib.sha256()
    for module_file in (__file__, *sorted(Path(synth.__file__).parent.glob("*.py"))):
        h.update(Path(module_file).read_bytes())
    return h.hexdigest()


def cache_key(task_type: str, spec: SyntheticData) -> str:
    """The folder name for a set: task type plus a hash of everything that shapes its bytes."""
    params = {"task": task_type, "spec": spec.model_dump(mode="json"), "version": GENERATOR_VERSION}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode() + _source_digest().encode())
    return f"{task_type}-{digest.hexdigest()[:16]}"


def _relocate(dataset: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """Rewrite paths in a dataset spec from the temporary folder to the final one."""
    return {
        k: (str(new / Path(v).relative_to(old)) if k in ("path", "image_root") else v)
        for k, v in dataset.items()
    }


def materialise(task_type: str, spec: SyntheticData, cache_dir: Path) -> dict[str, Any]:
    """Write the set (if not cached) and return the dataset spec, in a public format, that reads it."""
    final = Path(cache_dir) / "synthetic" / cache_key(task_type, spec)
    marker = final / "dataset.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    dataset = _relocate(WRITERS[task_type](spec, tmp), tmp, final)
    _write_json(tmp / "dataset.json", dataset)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same set first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    return json.loads(marker.read_text())
