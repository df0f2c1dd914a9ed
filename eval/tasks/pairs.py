"""Paired-caption tasks: one image, a true and a false caption; does the image score the true one higher?

SugarCrepe and ARO's VG-Relation / VG-Attribution share this protocol; each
subclass keeps only its adapter (`read_pairs`: the benchmark's public format
-> `CaptionPair`s, skips recorded as it goes) and its metric grouping
(`summarise`: per-pair outcomes -> metrics and details). Loading, the inputs
to encode and the scoring rule live here once: correct iff
score(positive) > score(negative), a tie is wrong (both benchmarks' rule).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from vlp.eval import metrics
from vlp.eval.features import FeatureStore
from vlp.eval.image_refs import ImageRef
from vlp.eval.tasks.base import Task, TaskResult

PAIR_CHANCE = 0.5


@dataclass(frozen=True)
class CaptionPair:
    """One item: an image, the caption true of it, a hard negative, and the group it is reported in
    (SugarCrepe's subset, ARO's relation or attribute pair)."""

    id: str
    image: ImageRef
    positive: str
    negative: str
    group: str


class PairTask(Task):
    """Base of the paired-caption tasks: subclasses set `main_metric` and implement read_pairs / summarise."""

    main_metric: ClassVar[str]
    items: list[CaptionPair]

    @abstractmethod
    def read_pairs(self) -> list[CaptionPair]:
        """The benchmark's items in its public format (UserError if unusable; `self.skip` a bad item)."""

    @abstractmethod
    def summarise(
        self, correct: list[bool], labels: list[str]
    ) -> tuple[dict[str, float | None], dict[str, Any]]:
        """(metrics, details) from each scored pair's outcome and group label, in item order."""

    def load(self) -> None:
        self.items = self.read_pairs()

    def inputs(self) -> tuple[list[ImageRef], list[str]]:
        return [p.image for p in self.items], [t for p in self.items for t in (p.positive, p.negative)]

    def score(self, store: FeatureStore) -> TaskResult:
        feats, ok = self.image_features(store, [p.image for p in self.items], [p.id for p in self.items])
        kept = [p for p, good in zip(self.items, ok.tolist(), strict=True) if good]
        img = feats[ok]
        pos = (img * store.texts([p.positive for p in kept])).sum(-1)
        neg = (img * store.texts([p.negative for p in kept])).sum(-1)
        correct = metrics.pairwise_correct(pos, neg).tolist()
        scores, details = self.summarise(correct, [p.group for p in kept])
        return TaskResult(
            metrics=scores,
            main_metric=self.main_metric,
            n_scored=len(kept),
            skipped=self.skipped,
            details={"chance": PAIR_CHANCE, **details},
        )
