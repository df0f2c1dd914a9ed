"""Image-text retrieval with several captions per image (CLIP_benchmark's protocol and metric names).

Data formats:
- `karpathy`: Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`
  ({"images": [{filepath?, filename, split, sentences: [{raw}]}]}, filtered by
  `split`), or the list form of `coco_karpathy_test.json` / `flickr30k_test.json`
  ([{image, caption: str | [str]}], entries of one image merged);
- `csv`: (image, caption) rows, rows of one image merged;
- `wds`: tar shards: CLIP_benchmark's retrieval layout (`KEY.txt` holds the
  captions one per line) or ours / img2dataset's (one caption per sample);
- `synthetic`: random scenes with several true captions each, written as Karpathy JSON.

Metrics: `image_retrieval_recall@k` (text -> image: the caption's image in the
top k) and `text_retrieval_recall@k` (image -> text: any of its captions in
the top k), on scores = texts @ images.T. With `loss_batch_size: B`, also
`clip_val_loss`: the model's CLIP loss (its own logit scale) over each image and
its first caption in batches of B, as open_clip_train's validation reports it. With `qb_norm`, the same figures
after querybank normalisation (dynamic inverted softmax, eval.metrics.qb_norm)
are reported next to them with a `_qbnorm` suffix. The querybank is either the
test queries themselves (`self`: transductive, say so when quoting it) or
files of other queries (`texts`: captions, one per line; `images`: image paths,
one per line, relative to that file). With `db_norm`, dual bank normalisation
(eval.metrics.db_norm) with a query-side and a gallery-side bank from such files
(never the evaluated set: the paper builds its banks from training data), both
variants: `_dbnorm` (dual inverted softmax) and `_dbnorm_dynamic` (dual dynamic
inverted softmax).

An image that cannot be loaded is skipped with its captions (one skip, its id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, TypeAdapter, field_validator
from vlp.eval import metrics, plots
from vlp.eval.features import FeatureStore
from vlp.eval.image_refs import ImageRef, resolve
from vlp.eval.markup import img
from vlp.eval.specs import Spec, SyntheticData, TaskSpec
from vlp.eval.tasks.base import Task, TaskResult, image_root, read_csv, read_json, read_lines, user_path
from vlp.eval.wds import find_shards, read_samples

from vlp.core.errors import UserError

CURVE_MAX_K = 50


class KarpathyData(Spec):
    format: Literal["karpathy"]
    path: str
    image_root: str | None = Field(None, description="default: the JSON file's folder")
    split: str | None = Field("test", description="Karpathy 'split' to keep (dict form only); null keeps all")


class CsvPairs(Spec):
    format: Literal["csv"]
    path: str
    image_root: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"


class WdsPairs(Spec):
    format: Literal["wds"]
    path: str
    split: str | None = "test"


class SyntheticRetrieval(SyntheticData):
    captions_per_image: int = Field(2, ge=1, le=5)


Data = Annotated[KarpathyData | CsvPairs | WdsPairs | SyntheticRetrieval, Field(discriminator="format")]
_DATA = TypeAdapter(Data)


class QueryBankFiles(Spec):
    texts: str = Field(description="captions, one per line: the bank for text -> image")
    images: str = Field(
        description="image paths, one per line (relative to this file): the bank for image -> text"
    )


class QBNormSpec(Spec):
    beta: float = Field(20.0, gt=0)
    k: int = Field(1, ge=1)
    querybank: Literal["self"] | QueryBankFiles = "self"


class DBNormSpec(Spec):
    """Dual bank normalisation: a query-side and a gallery-side bank from another set of pairs (never the
    evaluated queries: a transductive bank would flatter the figures)."""

    banks: QueryBankFiles = Field(description="texts and images of another set: for text -> image the texts "
                                  "are the query bank and the images the gallery bank, and the other way round")
    beta_query: float = Field(20.0, gt=0, description="inverse temperature of the query-bank inverted softmax")
    beta_gallery: float = Field(20.0, gt=0, description="inverse temperature of the gallery-bank inverted softmax")
    k: int = Field(1, ge=1, description="the dynamic variant's activation set: each bank item's top k")


class RetrievalSpec(TaskSpec):
    type: Literal["retrieval"]
    dataset: Data
    recall_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    qb_norm: QBNormSpec | None = None
    db_norm: DBNormSpec | None = None
    loss_batch_size: int | None = Field(None, ge=2, description="also `clip_val_loss`: the model's CLIP loss over "
                                        "each image and its first caption in batches of this size (open_clip_train's "
                                        "validation loss, with its training batch size)")

    @field_validator("recall_k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError("recall_k: give one or more k >= 1")
        return sorted(set(value))


@dataclass(frozen=True)
class CaptionedImage:
    """An image and every caption the dataset gives it (before empty ones are dropped)."""

    image: ImageRef
    captions: tuple[str, ...]

    def adding(self, captions: Iterable[str]) -> CaptionedImage:
        return CaptionedImage(self.image, (*self.captions, *captions))


@dataclass(frozen=True)
class RetrievalImage:
    """A gallery image, with the id skips and the report name it by."""

    id: str
    image: ImageRef


@dataclass(frozen=True)
class Caption:
    """A caption and the index of its image in the task's `images`."""

    text: str
    image: int


def karpathy_groups(
    path: Path, root: Path, split: str | None, skip: Callable[[str, str, str], None]
) -> dict[str, CaptionedImage]:
    """Image id -> its image and captions, from either Karpathy JSON form; malformed entries go to `skip`."""
    doc = read_json(path, "Karpathy")
    groups: dict[str, CaptionedImage] = {}
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        for i, entry in enumerate(doc["images"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not entry["filename"]:
                skip(f"images[{i}]", "malformed_item", "no 'filename' string")
                continue
            if not isinstance(entry.get("filepath", ""), str) or not isinstance(entry.get("sentences", []), list):
                skip(f"images[{i}]", "malformed_item", "'filepath' must be a string and 'sentences' a list")
                continue
            if split is not None and entry.get("split", split) != split:
                continue
            rel = str(Path(entry.get("filepath", "")) / entry["filename"])
            caps = tuple(str(s.get("raw", "")) for s in entry.get("sentences", []) if isinstance(s, dict))
            groups[rel] = CaptionedImage(resolve(rel, root), caps)
    elif isinstance(doc, list):
        for i, entry in enumerate(doc):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
                skip(f"[{i}]", "malformed_item", "needs an 'image' string and a 'caption'")
                continue
            caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            known = groups.get(entry["image"]) or CaptionedImage(resolve(entry["image"], root), ())
            groups[entry["image"]] = known.adding(str(c) for c in caps)
    else:
        raise UserError(f"{path} is neither Karpathy's {{'images': [...]}} nor a list of {{image, caption}}")
    return groups


class RetrievalTask(Task):
    type = "retrieval"
    Spec = RetrievalSpec
    spec: RetrievalSpec

    def load(self) -> None:
        data = self.dataset(_DATA)
        groups: dict[str, CaptionedImage] = {}  # by image id
        if isinstance(data, KarpathyData):
            path = user_path(data.path)
            root = image_root(data.path, data.image_root)
            groups.update(karpathy_groups(path, root, data.split, self.skip))
        elif isinstance(data, CsvPairs):
            self._load_csv(data, groups)
        else:
            for s in read_samples(find_shards(user_path(data.path), data.split)):
                if s.image is not None:
                    groups[f"{s.shard}/{s.key}"] = CaptionedImage(
                        s.image, tuple(s.texts.get("txt", "").splitlines())
                    )
                else:
                    self.skip(f"{s.shard}/{s.key}", "no_image_member")
        self.images: list[RetrievalImage] = []
        self.captions: list[Caption] = []
        for image_id, group in groups.items():
            caps = [c.strip() for c in group.captions if c and c.strip()]
            if not caps:
                self.skip(image_id, "no_captions")
                continue
            self.captions += [Caption(c, len(self.images)) for c in caps]
            self.images.append(RetrievalImage(image_id, group.image))
        if not self.images:
            raise UserError(f"task {self.name}: no image with a caption in the dataset")
        qb, db = self.spec.qb_norm, self.spec.db_norm
        self.bank_texts, self.bank_images = _read_bank(qb.querybank if qb is not None else None, "querybank")
        self.db_texts, self.db_images = _read_bank(db.banks if db is not None else None, "db_norm banks")

    def _load_csv(self, data: CsvPairs, groups: dict[str, CaptionedImage]) -> None:
        path = user_path(data.path)
        if not path.is_file():
            raise UserError(f"task {self.name}: CSV file not found: {path}")
        root = image_root(data.path, data.image_root)
        for _line, row in read_csv(path, f"task {self.name}", (data.image_column, data.caption_column)):
            image = row[data.image_column]
            known = groups.get(image) or CaptionedImage(resolve(image, root), ())
            groups[image] = known.adding([row[data.caption_column]])

    def inputs(self) -> tuple[list[ImageRef], list[str]]:
        return (
            [im.image for im in self.images] + self.bank_images + self.db_images,
            [c.text for c in self.captions] + self.bank_texts + self.db_texts,
        )

    def score(self, store: FeatureStore) -> TaskResult:
        ids = [im.id for im in self.images]
        image_feats, ok = self.image_features(store, [im.image for im in self.images], ids)
        kept = torch.nonzero(ok).flatten()
        new_index = torch.full((len(self.images),), -1, dtype=torch.long)
        new_index[kept] = torch.arange(len(kept))
        captions = [Caption(c.text, int(new_index[c.image])) for c in self.captions if ok[c.image]]
        text_feats = store.texts([c.text for c in captions])
        text_image = torch.tensor([c.image for c in captions], dtype=torch.long)
        image_feats = image_feats[kept]

        t2i = text_feats @ image_feats.T
        out: dict[str, float | None] = {}
        curves: dict[str, Any] = {}
        self._add(out, curves, "", *metrics.retrieval_ranks_from_scores(t2i, text_image, t2i.T))
        qb = self.spec.qb_norm
        if qb is not None:
            bank_t, bank_i = self._banks(store, text_feats, image_feats)
            t2i_n = metrics.qb_norm(t2i, bank_t @ image_feats.T, qb.beta, qb.k)
            i2t_n = metrics.qb_norm(t2i.T, bank_i @ text_feats.T, qb.beta, qb.k)
            self._add(out, curves, "_qbnorm", *metrics.retrieval_ranks_from_scores(t2i_n, text_image, i2t_n))
        db = self.spec.db_norm
        if db is not None:
            bank_t, bank_i = _encode_bank(store, self.db_texts, self.db_images)
            for suffix, dynamic in (("_dbnorm", False), ("_dbnorm_dynamic", True)):
                norm = partial(metrics.db_norm, beta_query=db.beta_query, beta_gallery=db.beta_gallery, k=db.k,
                               dynamic=dynamic)
                t2i_n = norm(t2i, bank_t @ image_feats.T, bank_i @ image_feats.T)  # queries: texts
                i2t_n = norm(t2i.T, bank_i @ text_feats.T, bank_t @ text_feats.T)  # queries: images
                self._add(out, curves, suffix, *metrics.retrieval_ranks_from_scores(t2i_n, text_image, i2t_n))
        if self.spec.loss_batch_size:
            out["clip_val_loss"] = self._val_loss(store.encoder.logit_scale, image_feats, text_feats, text_image)
        k1 = self.spec.recall_k[0]
        details: dict[str, Any] = {
            "n_images": len(kept),
            "n_captions": len(captions),
            "chance": k1 / len(kept) if len(kept) else None,
            "recall_curve": curves,
        }
        if qb is not None:
            details["qb_norm"] = {
                "beta": qb.beta,
                "k": qb.k,
                "querybank": "self" if qb.querybank == "self" else "files",
            }
        if db is not None:
            details["db_norm"] = {"beta_query": db.beta_query, "beta_gallery": db.beta_gallery, "k": db.k,
                                  "bank_texts": len(self.db_texts), "bank_images": len(self.db_images)}
        return TaskResult(
            metrics=out,
            main_metric=f"image_retrieval_recall@{k1}",
            n_scored=len(kept),
            skipped=self.skipped,
            details=details,
        )

    def _val_loss(self, scale: float | None, image_feats: torch.Tensor, text_feats: torch.Tensor,
                  text_image: torch.Tensor) -> float | None:
        """The CLIP loss of (image, its first caption) pairs in the spec's batches; None without a logit scale."""
        if scale is None or not len(text_image):
            return None
        first = {}
        for t, i in enumerate(text_image.tolist()):
            first.setdefault(i, t)
        images = sorted(first)
        return metrics.batched_clip_loss(image_feats[images], text_feats[[first[i] for i in images]], scale,
                                         self.spec.loss_batch_size)

    def _banks(
        self, store: FeatureStore, text_feats: torch.Tensor, image_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Querybank features (texts for text -> image, images for image -> text); `self`: the test set's."""
        if not self.bank_texts:
            return text_feats, image_feats
        return _encode_bank(store, self.bank_texts, self.bank_images)

    def _add(
        self,
        out: dict[str, float | None],
        curves: dict[str, Any],
        suffix: str,
        text_ranks: torch.Tensor,
        image_ranks: torch.Tensor,
    ) -> None:
        """Recall@k for the spec's k, and a recall curve (k = 1..50) for the plots."""
        for k in self.spec.recall_k:
            out[f"image_retrieval_recall@{k}{suffix}"] = metrics.recall_at_k(text_ranks, k)
            out[f"text_retrieval_recall@{k}{suffix}"] = metrics.recall_at_k(image_ranks, k)
        top = max(CURVE_MAX_K, max(self.spec.recall_k))
        curves["k"] = list(range(1, top + 1))
        curves[f"image_retrieval{suffix}"] = [metrics.recall_at_k(text_ranks, k) for k in curves["k"]]
        curves[f"text_retrieval{suffix}"] = [metrics.recall_at_k(image_ranks, k) for k in curves["k"]]

    @classmethod
    def report_figures(cls, name: str, result: dict[str, Any]) -> list[str]:
        """Recall@k curves, both directions (and QB-Norm's when present)."""
        curves = result["details"].get("recall_curve", {})
        if not curves.get("k"):
            return super().report_figures(name, result)
        return [img(plots.recall_curves(curves, f"{name}: recall@k"), "recall@k curves")]


def _read_bank(files: QueryBankFiles | str | None, what: str) -> tuple[list[str], list[ImageRef]]:
    """The texts and images a bank's files list (none for no bank, or QB-Norm's `self`)."""
    if not isinstance(files, QueryBankFiles):
        return [], []
    texts = read_lines(user_path(files.texts), f"{what} texts")
    images_file = user_path(files.images)
    return texts, [resolve(p, images_file.parent) for p in read_lines(images_file, f"{what} images")]


def _encode_bank(store: FeatureStore, texts: list[str], images: list[ImageRef]) -> tuple[torch.Tensor, torch.Tensor]:
    """A bank's text and image features (images that cannot be read left out: a bank needs no item)."""
    image_feats, failures = store.images(images)
    keep = [i for i in range(len(images)) if i not in failures]
    return store.texts(texts), image_feats[keep]
