"""SugarCrepe: does the image score its caption above a hard negative caption?

Data: `sugarcrepe` reads the benchmark's `data/` folder: up to seven files
add_obj, add_att, replace_obj, replace_att, replace_rel, swap_obj, swap_att
(.json), each a dict keyed by a string index (numbers may be skipped) of
{filename, caption, negative_caption}; `filename` is relative to `image_root`
(COCO val2017). `subsets` picks files (default: every one present).
`synthetic` writes swap_att (colours of two objects swapped) and replace_rel
(relation inverted) files in the same format.

Correct iff score(positive) > score(negative); a tie is wrong (SugarCrepe's
rule). Reported: `acc/<subset>` and `acc`, the mean over subsets (SugarCrepe's
averages are per subset, so a big subset does not outweigh a small one).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, TypeAdapter

from eval import metrics
from eval.features import FeatureStore
from eval.images import ImageRef, resolve
from eval.tasks.base import (
    Spec,
    SyntheticData,
    Task,
    TaskResult,
    TaskSpec,
    read_json,
    require_keys,
    user_path,
)
from vlp.errors import UserError

SUBSETS: tuple[str, ...] = (
    "add_obj",
    "add_att",
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
)
Subset = Literal["add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att"]


class SugarCrepeData(Spec):
    format: Literal["sugarcrepe"]
    path: str = Field(description="folder holding the subset JSON files")
    image_root: str = Field(description="folder of the images the files name (COCO val2017)")
    subsets: list[Subset] | None = None


class SyntheticSugarCrepe(SyntheticData):
    subsets: list[Literal["swap_att", "replace_rel"]] = Field(
        default_factory=lambda: ["swap_att", "replace_rel"]
    )


Data = Annotated[SugarCrepeData | SyntheticSugarCrepe, Field(discriminator="format")]
_DATA = TypeAdapter(Data)


class SugarCrepeSpec(TaskSpec):
    type: Literal["sugarcrepe"]
    dataset: Data


class SugarCrepeTask(Task):
    type = "sugarcrepe"
    Spec = SugarCrepeSpec
    spec: SugarCrepeSpec

    def load(self) -> None:
        data = self.dataset(_DATA)
        folder, root = user_path(data.path), user_path(data.image_root)
        if not folder.is_dir():
            raise UserError(f"task {self.name}: SugarCrepe folder not found: {folder}")
        present = [s for s in SUBSETS if (folder / f"{s}.json").is_file()]
        self.subsets = list(data.subsets) if data.subsets else present
        missing = [s for s in self.subsets if s not in present]
        if missing or not self.subsets:
            raise UserError(f"task {self.name}: no {', '.join(missing) or 'subset'} .json file in {folder}")
        self.items: list[tuple[str, ImageRef, str, str, str]] = []  # id, image, positive, negative, subset
        for subset in self.subsets:
            doc = read_json(folder / f"{subset}.json", "SugarCrepe")
            if not isinstance(doc, dict):
                raise UserError(f"task {self.name}: {subset}.json must be a dict keyed by index")
            for key, item in doc.items():
                item_id = f"{subset}/{key}"
                problem = require_keys(item, ("filename", "caption", "negative_caption"))
                if problem:
                    self.skip(item_id, "malformed_item", problem)
                elif item["caption"] == item["negative_caption"]:
                    self.skip(item_id, "identical_captions", item["caption"])
                else:
                    ref = resolve(str(item["filename"]), root)
                    self.items.append(
                        (item_id, ref, str(item["caption"]), str(item["negative_caption"]), subset)
                    )

    def inputs(self) -> tuple[list[ImageRef], list[str]]:
        return [it[1] for it in self.items], [t for it in self.items for t in it[2:4]]

    def score(self, store: FeatureStore) -> TaskResult:
        feats, ok = self.image_features(store, [it[1] for it in self.items], [it[0] for it in self.items])
        kept = [it for it, good in zip(self.items, ok.tolist(), strict=True) if good]
        img = feats[ok]
        pos = (img * store.texts([it[2] for it in kept])).sum(-1)
        neg = (img * store.texts([it[3] for it in kept])).sum(-1)
        correct = metrics.pairwise_correct(pos, neg).tolist()
        macro, groups = metrics.group_accuracy(correct, [it[4] for it in kept])
        out: dict[str, float | None] = {"acc": macro}
        for subset in self.subsets:
            out[f"acc/{subset}"] = groups[subset]["acc"] if subset in groups else None
        return TaskResult(
            metrics=out,
            main_metric="acc",
            n_scored=len(kept),
            skipped=self.skipped,
            details={
                "chance": 0.5,
                "groups": groups,
                "group_label": "subset",
                "micro_acc": metrics.mean(torch.tensor(correct)),
            },
        )
