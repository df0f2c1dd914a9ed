"""SugarCrepe: does the image score its caption above a hard negative caption?

Data: `sugarcrepe` reads the benchmark's `data/` folder: up to seven files
add_obj, add_att, replace_obj, replace_att, replace_rel, swap_obj, swap_att
(.json), each a dict keyed by a string index (numbers may be skipped) of
{filename, caption, negative_caption}; `filename` is relative to `image_root`
(COCO val2017). `subsets` picks files (default: every one present).
`synthetic` writes swap_att (colours of two objects swapped) and replace_rel
(relation inverted) files in the same format.

Correct iff score(positive) > score(negative); a tie is wrong (SugarCrepe's
rule, and ARO's: both run eval.tasks.pairs.PairTask's protocol). Reported:
`acc/<subset>` and `acc`, the mean over subsets (SugarCrepe's averages are per
subset, so a big subset does not outweigh a small one).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, TypeAdapter
from vlp.eval import metrics
from vlp.eval.image_refs import resolve
from vlp.eval.specs import Spec, SyntheticData, TaskSpec
from vlp.eval.tasks.base import read_json, require_keys, user_path
from vlp.eval.tasks.pairs import CaptionPair, PairTask

from vlp.core.errors import UserError

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


class SugarCrepeTask(PairTask):
    type = "sugarcrepe"
    Spec = SugarCrepeSpec
    spec: SugarCrepeSpec
    main_metric = "acc"

    def read_pairs(self) -> list[CaptionPair]:
        data = self.dataset(_DATA)
        folder, root = user_path(data.path), user_path(data.image_root)
        if not folder.is_dir():
            raise UserError(f"task {self.name}: SugarCrepe folder not found: {folder}")
        present = [s for s in SUBSETS if (folder / f"{s}.json").is_file()]
        self.subsets = list(data.subsets) if data.subsets else present
        missing = [s for s in self.subsets if s not in present]
        if missing or not self.subsets:
            raise UserError(f"task {self.name}: no {', '.join(missing) or 'subset'} .json file in {folder}")
        pairs: list[CaptionPair] = []
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
                    pairs.append(
                        CaptionPair(item_id, ref, str(item["caption"]), str(item["negative_caption"]), subset)
                    )
        return pairs

    def summarise(
        self, correct: list[bool], labels: list[str]
    ) -> tuple[dict[str, float | None], dict[str, Any]]:
        """`acc`: the mean over subsets; `acc/<subset>` for each subset asked for (None if none scored)."""
        macro, groups = metrics.group_accuracy(correct, labels)
        out: dict[str, float | None] = {"acc": macro}
        for subset in self.subsets:
            out[f"acc/{subset}"] = groups[subset]["acc"] if subset in groups else None
        details = {
            "groups": groups,
            "group_label": "subset",
            "micro_acc": metrics.mean(torch.tensor(correct)),
        }
        return out, details
