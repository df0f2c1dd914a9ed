"""Counting, CountBench protocol: does the image prefer its caption with the right number word?

Data: `countbench` reads CountBench.json, a list of {image_url, text, number};
`image_url` is an http(s) URL (fetched with `timeout`, failures are skipped
items with a reason), a file:// URL or a path relative to `image_root`
(default: the JSON's folder). `synthetic` writes the same format from
single-group scenes with 1..6 objects (configurable).

Protocol: in the caption, every occurrence of the item's number word is
replaced by each candidate number word (default two..ten, `numbers: [lo, hi]`
to change), the candidates are scored against the image, and the best one is
the prediction. Reported: `acc1` (top-1 accuracy, a tie counts as wrong),
`mean_absolute_deviation` (mean |predicted - true|), and the confusion matrix.

The substitution is whole-word and case-preserving: "Two" -> "Three", "TWO"
-> "THREE"; "someone", "tone", "often", "network" are left alone; a number word
joined by a hyphen ("two-tone", "forty-two") is part of another word and left
alone too. A caption without its number word as a whole word cannot be scored
and is skipped (reason `number_word_not_in_caption`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, TypeAdapter, model_validator
from vlp.eval import metrics, plots
from vlp.eval.features import FeatureStore
from vlp.eval.image_refs import ImageRef, resolve
from vlp.eval.markup import img
from vlp.eval.specs import Spec, SyntheticData, TaskSpec
from vlp.eval.tasks.base import Task, TaskResult, image_root, read_json, require_keys, user_path

from vlp.core.errors import UserError
from vlp.core.fetch import FetchOptions
from vlp.core.synth import NUMBER_WORDS, number_word

DEFAULT_NUMBERS = (2, 10)  # CountBench's range


class CountBenchData(Spec):
    format: Literal["countbench"]
    path: str
    image_root: str | None = Field(
        None, description="relative image_url paths start here (default: the JSON's folder)"
    )


class SyntheticCounting(SyntheticData):
    min_count: int = Field(1, ge=1, le=10)
    max_count: int = Field(6, ge=1, le=10)

    @model_validator(mode="after")
    def _ordered(self) -> SyntheticCounting:
        if self.min_count >= self.max_count:
            raise ValueError("min_count must be < max_count")
        return self


Data = Annotated[CountBenchData | SyntheticCounting, Field(discriminator="format")]
_DATA = TypeAdapter(Data)


class CountingSpec(TaskSpec):
    type: Literal["counting"]
    dataset: Data
    numbers: tuple[int, int] | None = Field(
        None, description="candidate counts, inclusive (default: 2..10, or the synthetic set's range)"
    )
    timeout: float = Field(10.0, gt=0, description="seconds per http image fetch")
    retries: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _range(self) -> CountingSpec:
        if self.numbers is not None:
            lo, hi = self.numbers
            if not 0 <= lo < hi < len(NUMBER_WORDS):
                raise ValueError(
                    f"numbers: need 0 <= lo < hi <= {len(NUMBER_WORDS) - 1}, got {list(self.numbers)}"
                )
        return self


def _pattern(word: str) -> re.Pattern[str]:
    """Whole-word, any case, not glued to letters, digits, apostrophes or hyphens."""
    return re.compile(rf"(?<![\w'’-]){re.escape(word)}(?![\w'’-])", re.IGNORECASE)


def _same_case(found: str, replacement: str) -> str:
    if found.isupper() and len(found) > 1:
        return replacement.upper()
    if found[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def substitute(caption: str, number: int, new: int) -> str | None:
    """The caption with every whole-word occurrence of number's word replaced by new's; None if absent."""
    pattern = _pattern(number_word(number))
    if not pattern.search(caption):
        return None
    target = number_word(new)
    return pattern.sub(lambda m: _same_case(m.group(0), target), caption)


@dataclass(frozen=True)
class CountingItem:
    """One item: an image, its true count, and its caption with each candidate count's word
    (in the order of the task's `numbers`)."""

    id: str
    image: ImageRef
    number: int
    candidates: tuple[str, ...]


class CountingTask(Task):
    type = "counting"
    Spec = CountingSpec
    spec: CountingSpec

    def load(self) -> None:
        spec = self.spec.dataset
        default = (spec.min_count, spec.max_count) if isinstance(spec, SyntheticCounting) else DEFAULT_NUMBERS
        lo, hi = self.spec.numbers or default
        data = self.dataset(_DATA)
        self.numbers = list(range(lo, hi + 1))
        path = user_path(data.path)
        root = image_root(data.path, data.image_root)
        doc = read_json(path, "CountBench")
        if not isinstance(doc, list):
            raise UserError(f"task {self.name}: {path} must hold a list of {{image_url, text, number}}")
        self.items: list[CountingItem] = []
        for i, item in enumerate(doc):
            problem = require_keys(item, ("image_url", "text", "number"))
            if problem:
                self.skip(i, "malformed_item", problem)
                continue
            try:
                number = int(item["number"])
            except (TypeError, ValueError):
                self.skip(i, "malformed_item", f"number {item['number']!r}")
                continue
            if number not in self.numbers:
                self.skip(i, "number_out_of_range", f"{number} not in {lo}..{hi}")
                continue
            texts = [substitute(str(item["text"]), number, n) for n in self.numbers]
            candidates = tuple(t for t in texts if t is not None)
            if len(candidates) != len(texts):
                self.skip(i, "number_word_not_in_caption", f"{number_word(number)!r} not in {item['text']!r}")
                continue
            self.items.append(CountingItem(str(i), resolve(str(item["image_url"]), root), number, candidates))

    def fetch_options(self) -> FetchOptions:
        return FetchOptions(timeout=self.spec.timeout, retries=self.spec.retries)

    def inputs(self) -> tuple[list[ImageRef], list[str]]:
        return [it.image for it in self.items], [t for it in self.items for t in it.candidates]

    def score(self, store: FeatureStore) -> TaskResult:
        feats, ok = self.image_features(store, [it.image for it in self.items], [it.id for it in self.items])
        n_cand = len(self.numbers)
        rows = [k for k in range(len(self.items)) if ok[k]]
        dim = store.encoder.dim
        text_feats = store.texts([t for k in rows for t in self.items[k].candidates]).reshape(
            len(rows), n_cand, dim
        )
        scores = torch.einsum("nd,ncd->nc", feats[rows], text_feats)
        targets = torch.tensor([self.numbers.index(self.items[k].number) for k in rows], dtype=torch.long)
        preds = metrics.predictions(scores, targets) if rows else targets
        true_n = [self.numbers[t] for t in targets.tolist()]
        pred_n = [self.numbers[p] for p in preds.tolist()]
        mad = metrics.mean([abs(a - b) for a, b in zip(true_n, pred_n, strict=True)])
        return TaskResult(
            metrics={"acc1": metrics.topk_accuracy(scores, targets, 1), "mean_absolute_deviation": mad},
            main_metric="acc1",
            n_scored=len(rows),
            skipped=self.skipped,
            details={
                "numbers": self.numbers,
                "chance": 1 / len(self.numbers),
                "confusion_matrix": {
                    "labels": self.numbers,
                    "matrix": metrics.confusion_matrix(true_n, pred_n, self.numbers),
                },
                "per_number_acc": {
                    str(n): metrics.mean([p == n for t, p in zip(true_n, pred_n, strict=True) if t == n])
                    for n in self.numbers
                },
            },
        )

    @classmethod
    def report_figures(cls, name: str, result: dict[str, Any]) -> list[str]:
        """The confusion matrix and accuracy per true count."""
        details = result["details"]
        if not details.get("confusion_matrix"):
            return super().report_figures(name, result)
        cm = details["confusion_matrix"]
        per = details.get("per_number_acc", {})
        confusion = plots.confusion(cm["labels"], cm["matrix"], f"{name}: counting confusion matrix")
        per_number = plots.bars(
            list(per), list(per.values()), f"{name}: accuracy per true count", chance=details.get("chance")
        )
        return [img(confusion, "confusion matrix"), img(per_number, "per number")]
