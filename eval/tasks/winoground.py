"""Winoground-style pairs: two images, two captions using the same words in a different order.

Data: `winoground` reads the benchmark's `examples.jsonl` (one JSON object per
line; a JSON list is accepted too) of {id, image_0, image_1, caption_0,
caption_1, tag?, collapsed_tag?, ...}; image names have no extension in the
release ("ex_0_img_0"), so `image_ext` (.png) is appended to names without
one; images live in `image_root` (default: `images/` next to the file).
`synthetic` writes the same layout from shape scenes: attribute pairs (the two
objects' colours swapped in the second image) and relation pairs (the scene
mirrored, so the same words in the other order are true of it).

Scores (Thrush et al. 2022), s(c, i) the similarity of caption c and image i:
text score: s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1); image score:
s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0); group score: both. Ties are
wrong. Reported as `text_score`, `image_score`, `group_score`, and per tag
(`collapsed_tag` if present, else `tag`) in the details.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, TypeAdapter
from vlp.eval import metrics, plots
from vlp.eval.features import FeatureStore
from vlp.eval.image_refs import ImageRef, resolve
from vlp.eval.markup import img
from vlp.eval.specs import Spec, SyntheticData, TaskSpec
from vlp.eval.tasks.base import Task, TaskResult, image_root, read_json, read_text, require_keys, user_path

from vlp.core.errors import UserError


class WinogroundData(Spec):
    format: Literal["winoground"]
    path: str = Field(description="examples.jsonl")
    image_root: str | None = Field(None, description="default: images/ next to the file")
    image_ext: str = ".png"


class SyntheticWinoground(SyntheticData):
    pass


Data = Annotated[WinogroundData | SyntheticWinoground, Field(discriminator="format")]
_DATA = TypeAdapter(Data)


class WinogroundSpec(TaskSpec):
    type: Literal["winoground"]
    dataset: Data


def _read_examples(path: Path) -> list:
    """examples.jsonl (one object per line), or a JSON list."""
    if path.suffix == ".json":
        doc = read_json(path, "Winoground")
        if not isinstance(doc, list):
            raise UserError(f"{path} must hold a list of examples")
        return doc
    out = []
    for n, line in enumerate(read_text(path, "Winoground").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {n} is not valid JSON ({err.msg})") from None
    return out


@dataclass(frozen=True)
class WinogroundExample:
    """One example: two images and two captions, caption_k true of image_k; `tag` groups it in the report."""

    id: str
    images: tuple[ImageRef, ImageRef]
    captions: tuple[str, str]
    tag: str


class WinogroundTask(Task):
    type = "winoground"
    Spec = WinogroundSpec
    spec: WinogroundSpec

    def load(self) -> None:
        data = self.dataset(_DATA)
        path = user_path(data.path)
        root = image_root(data.path, data.image_root, "images")
        self.items: list[WinogroundExample] = []
        for n, item in enumerate(_read_examples(path)):
            item_id = str(item.get("id", n)) if isinstance(item, dict) else str(n)
            problem = require_keys(item, ("image_0", "image_1", "caption_0", "caption_1"))
            if problem:
                self.skip(item_id, "malformed_item", problem)
                continue
            image_0, image_1 = (
                resolve(self._file(str(item[k]), data.image_ext), root) for k in ("image_0", "image_1")
            )
            tag = str(item.get("collapsed_tag") or item.get("tag") or "all")
            captions = (str(item["caption_0"]), str(item["caption_1"]))
            self.items.append(WinogroundExample(item_id, (image_0, image_1), captions, tag))

    @staticmethod
    def _file(name: str, ext: str) -> str:
        return name if Path(name).suffix else name + ext

    def inputs(self) -> tuple[list[ImageRef], list[str]]:
        return [r for it in self.items for r in it.images], [c for it in self.items for c in it.captions]

    def score(self, store: FeatureStore) -> TaskResult:
        refs = [r for it in self.items for r in it.images]
        ids = [it.id for it in self.items for _ in range(2)]
        feats, ok = self.image_features(store, refs, ids)
        good = ok.reshape(-1, 2).all(dim=1)
        kept = [it for it, g in zip(self.items, good.tolist(), strict=True) if g]
        images = feats.reshape(-1, 2, feats.shape[-1])[good]  # (n, image, dim)
        captions = store.texts([c for it in kept for c in it.captions]).reshape(
            len(kept), 2, store.encoder.dim
        )  # (n, caption, dim)
        scores = torch.einsum("ncd,nid->nci", captions, images)
        flags = metrics.winoground_scores(scores)
        out = {f"{k}_score": metrics.mean(v) for k, v in flags.items()}
        groups: dict[str, dict[str, float | int | None]] = {}
        tags = [it.tag for it in kept]
        for tag in sorted(set(tags)):
            mask = torch.tensor([t == tag for t in tags])
            groups[tag] = {f"{k}_score": metrics.mean(v[mask]) for k, v in flags.items()} | {
                "n": int(mask.sum())
            }
        return TaskResult(
            metrics=out,
            main_metric="group_score",
            n_scored=len(kept),
            skipped=self.skipped,
            details={"chance": 1 / 6, "groups": groups, "group_label": "tag"},
        )

    @classmethod
    def report_figures(cls, name: str, result: dict[str, Any]) -> list[str]:
        """The three scores against chance, and each per tag."""
        groups = result["details"].get("groups") or {}
        if not groups:
            return []
        label = result["details"].get("group_label", "group")
        tags = list(groups)
        series = {k: [groups[t].get(f"{k}_score") for t in tags] for k in ("text", "image", "group")}
        overall = result["metrics"]
        chart = plots.bars(
            ["text", "image", "group"],
            [overall.get("text_score"), overall.get("image_score"), overall.get("group_score")],
            f"{name}: Winoground scores",
            chance=1 / 6,
        )
        return [
            img(chart, "scores"),
            img(plots.grouped_bars(tags, series, f"{name}: scores per {label}", "score"), "per tag"),
        ]
