"""Zero-shot classification (CLIP_benchmark's protocol and metric names).

Data formats:
- `folder`: ROOT/<class>/<image> (torchvision ImageFolder: classes are the sorted
  sub-folder names; `classnames` may give display names in that order);
- `csv`: rows of (image, label); the label is a class name or an index into
  `classnames` (default: the sorted distinct labels);
- `wds`: CLIP_benchmark's webdataset layout (`KEY.webp|png|jpg` + `KEY.cls`,
  `classnames.txt`, `zeroshot_classification_templates.txt`);
- `synthetic`: single-shape scenes (classes = shapes, written as a folder) or
  single-colour scenes (classes = colours, written in CLIP_benchmark's layout).

Scoring: class embeddings by prompt ensembling (eval.templates), logits =
100 * image @ W, then `acc1`, `acc5` (None below 5 classes, where
CLIP_benchmark says NaN) and `mean_per_class_recall` (balanced accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, TypeAdapter, field_validator
from vlp.eval import metrics, plots
from vlp.eval.features import FeatureStore
from vlp.eval.image_refs import ImageRef, resolve
from vlp.eval.markup import img
from vlp.eval.specs import Spec, SyntheticData, TaskSpec
from vlp.eval.tasks.base import Task, TaskResult, image_root, read_csv, read_lines, user_path
from vlp.eval.templates import check_template, class_embeddings, load_templates, prompts
from vlp.eval.wds import find_shards, read_samples

from vlp.core.errors import UserError
from vlp.core.images import IMAGE_SUFFIXES

ClassNames = list[str] | str | None  # a list, or a text file with one name per line
MAX_RECALL_BARS = 60  # more classes than this (ImageNet's 1000): no per-class plot


class FolderData(Spec):
    format: Literal["folder"]
    path: str
    classnames: ClassNames = None


class CsvData(Spec):
    format: Literal["csv"]
    path: str
    image_root: str | None = Field(
        None, description="relative image paths start here (default: the CSV's folder)"
    )
    image_column: str = "image"
    label_column: str = "label"
    classnames: ClassNames = None


class WdsData(Spec):
    format: Literal["wds"]
    path: str
    split: str = "test"
    classnames: ClassNames = None


class SyntheticZeroShot(SyntheticData):
    attribute: Literal["shape", "colour"]


Data = Annotated[FolderData | CsvData | WdsData | SyntheticZeroShot, Field(discriminator="format")]
_DATA = TypeAdapter(Data)


class ZeroShotSpec(TaskSpec):
    type: Literal["zeroshot_classification"]
    dataset: Data
    templates: list[str] | str | None = Field(
        None,
        description="list, built-in set ('imagenet') or file; default: the dataset's own, else 'imagenet'",
    )

    @field_validator("templates")
    @classmethod
    def _slots(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("templates: give at least one")
            for t in value:
                check_template(t)
        return value


def _classnames(value: ClassNames, what: str) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    return read_lines(user_path(value), f"{what} classnames")


@dataclass(frozen=True)
class LabelledImage:
    """One item: an image and the index of its class in the task's `classnames`."""

    id: str
    image: ImageRef
    label: int


class ZeroShotTask(Task):
    type = "zeroshot_classification"
    Spec = ZeroShotSpec
    spec: ZeroShotSpec

    def load(self) -> None:
        self.data = data = self.dataset(_DATA)
        self.items: list[LabelledImage] = []
        self.dataset_templates: list[str] | None = None
        if isinstance(data, FolderData):
            self._load_folder(data)
        elif isinstance(data, CsvData):
            self._load_csv(data)
        else:
            self._load_wds(data)
        if not self.classnames:
            raise UserError(f"task {self.name}: the dataset has no classes")
        source = (
            self.spec.templates if self.spec.templates is not None else self.dataset_templates or "imagenet"
        )
        self.templates = load_templates(source)

    def _load_folder(self, data: FolderData) -> None:
        root = user_path(data.path)
        if not root.is_dir():
            raise UserError(f"task {self.name}: image folder not found: {root}")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        names = _classnames(data.classnames, self.name) or [p.name for p in folders]
        if len(names) != len(folders):
            raise UserError(
                f"task {self.name}: {len(names)} class names for {len(folders)} class folders in {root}"
            )
        self.classnames = names
        for label, folder in enumerate(folders):
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    self.items.append(
                        LabelledImage(str(path.relative_to(root)), ImageRef(str(path.resolve())), label)
                    )

    def _load_csv(self, data: CsvData) -> None:
        path = user_path(data.path)
        if not path.is_file():
            raise UserError(f"task {self.name}: CSV file not found: {path}")
        root = image_root(data.path, data.image_root)
        rows = [
            (line, r[data.image_column], r[data.label_column].strip())
            for line, r in read_csv(path, f"task {self.name}", (data.image_column, data.label_column))
        ]
        names = _classnames(data.classnames, self.name)
        self.classnames = names or sorted({label for _, _, label in rows if label})
        index = {c: i for i, c in enumerate(self.classnames)}
        for line, image, label in rows:
            item_id = f"{path.name}:{line}"
            if label in index:
                target = index[label]
            elif names and label.isdigit() and int(label) < len(names):
                target = int(label)
            else:
                self.skip(item_id, "unknown_label", f"label {label!r}")
                continue
            if not image:
                self.skip(item_id, "no_image", "empty image column")
                continue
            self.items.append(LabelledImage(item_id, resolve(image, root), target))

    def _load_wds(self, data: WdsData) -> None:
        root = user_path(data.path)
        samples = read_samples(find_shards(root, data.split))
        names = _classnames(data.classnames, self.name)
        if names is None:
            names = read_lines(root / "classnames.txt", f"task {self.name}: CLIP_benchmark")
        self.classnames = names
        templates = root / "zeroshot_classification_templates.txt"
        if templates.is_file():
            self.dataset_templates = read_lines(templates, "templates")
        for s in samples:
            item_id = f"{s.shard}/{s.key}"
            label = s.texts.get("cls", "").strip()
            if s.image is None:
                self.skip(item_id, "no_image_member")
            elif not label.isdigit() or int(label) >= len(names):
                self.skip(item_id, "bad_label", f".cls {label!r} with {len(names)} classes")
            else:
                self.items.append(LabelledImage(item_id, s.image, int(label)))

    def inputs(self) -> tuple[list[ImageRef], list[str]]:
        return [it.image for it in self.items], prompts(self.classnames, self.templates)

    def score(self, store: FeatureStore) -> TaskResult:
        weights = class_embeddings(
            store.texts(prompts(self.classnames, self.templates)), len(self.classnames)
        )
        ids = [it.id for it in self.items]
        feats, ok = self.image_features(store, [it.image for it in self.items], ids)
        targets = torch.tensor([it.label for it in self.items], dtype=torch.long)[ok]
        logits = 100.0 * feats[ok] @ weights
        preds = metrics.predictions(logits, targets)
        recall = metrics.per_class_recall(targets, preds, len(self.classnames))
        return TaskResult(
            metrics={
                "acc1": metrics.topk_accuracy(logits, targets, 1),
                "acc5": metrics.topk_accuracy(logits, targets, 5),
                "mean_per_class_recall": metrics.mean_per_class_recall(targets, preds),
            },
            main_metric="acc1",
            n_scored=int(ok.sum()),
            skipped=self.skipped,
            details={
                "classnames": self.classnames,
                "n_templates": len(self.templates),
                "chance": 1 / len(self.classnames),
                "per_class_recall": dict(zip(self.classnames, recall, strict=True)),
            },
        )

    @classmethod
    def report_figures(cls, name: str, result: dict[str, Any]) -> list[str]:
        """Recall per class, when there are few enough classes to read."""
        details = result["details"]
        rec = details.get("per_class_recall")
        if not rec:
            return super().report_figures(name, result)
        if len(rec) > MAX_RECALL_BARS:
            return []
        chart = plots.bars(
            list(rec), list(rec.values()), f"{name}: recall per class", "recall", details.get("chance")
        )
        return [img(chart, "recall per class")]
