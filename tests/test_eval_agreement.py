"""Our zero-shot and retrieval figures equal clip_benchmark's on the same open_clip model and local data."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_support import noise, save, solid, tiny_model
from torch.utils.data import DataLoader, Dataset
from vlp.eval import templates as tmpl
from vlp.eval.encoders import Encoder
from vlp.eval.features import FeatureStore
from vlp.eval.suite import parse_suite
from vlp.eval.tasks import TASKS
from vlp.eval.tasks.base import Context

cb_zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
cb_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

CLASSES = ["red", "green", "blue", "white", "black", "grey"]
COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (250, 250, 250), (5, 5, 5), (128, 128, 128)]
TEMPLATES = ["a photo of a {c} thing.", "a {c} square.", "{c}"]


def _image(k: int, j: int):
    """Class colour blended with noise, so images of a class differ and features vary."""
    from PIL import Image

    return Image.blend(solid(COLOURS[k]), noise(100 * k + j), alpha=0.15 * j)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def _run_task(spec: dict, encoder: Encoder, tmp_path):
    suite = parse_suite({"tasks": [{"name": "t", **spec}]}, "test")
    task = TASKS[spec["type"]](suite.tasks[0], Context(cache_dir=tmp_path / "cache"))
    task.load()
    store = FeatureStore(encoder, progress=False)
    refs, texts = task.inputs()
    store.prefetch(refs, texts, "t")
    return task, store, task.score(store)


def _clip_benchmark_zeroshot(net, loader, tokenizer, logits, target) -> dict[str, float]:
    """clip_benchmark's zero-shot metrics.

    Its `evaluate` is called when it runs. clip-benchmark 1.6.2's `accuracy()` ends in
    `float(ndarray of shape (1,))`, which NumPy >= 2.3 rejects with a TypeError; there the
    same figures are taken from its own logits exactly as `evaluate` takes them:
    top-k hits from torch.topk, and sklearn's balanced_accuracy_score of the argmax.
    """
    from sklearn.metrics import balanced_accuracy_score

    try:
        return cb_zeroshot.evaluate(net, loader, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    except TypeError as err:
        if "0-dimensional" not in str(err):
            raise

    def topk(k: int) -> float:
        pred = logits.topk(k, 1, True, True)[1].t()
        return pred.eq(target.view(1, -1).expand_as(pred)).reshape(-1).float().sum().item() / len(target)

    return {
        "acc1": topk(1),
        "acc5": topk(5),
        "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1)),
    }


def test_zeroshot_classification_matches_clip_benchmark(tmp_path, model):
    from torchvision.datasets import ImageFolder

    net, preprocess, tokenizer = model
    root = tmp_path / "folder"
    for k, name in enumerate(CLASSES):
        for j in range(4):
            save(_image(k, j), root / f"{k}_{name}" / f"{j}.png")

    ds = ImageFolder(str(root), transform=preprocess)
    ds.classes = CLASSES
    loader = DataLoader(ds, batch_size=7)
    classifier = cb_zeroshot.zero_shot_classifier(net, tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    their_logits, target = cb_zeroshot.run_classification(net, classifier, loader, "cpu", amp=False)
    theirs = _clip_benchmark_zeroshot(net, loader, tokenizer, their_logits, target)

    encoder = Encoder(net, preprocess, tokenizer, batch_size=5, workers=2)
    spec = {
        "type": "zeroshot_classification",
        "templates": TEMPLATES,
        "dataset": {"format": "folder", "path": str(root), "classnames": CLASSES},
    }
    task, store, ours = _run_task(spec, encoder, tmp_path)

    weights = tmpl.class_embeddings(store.texts(tmpl.prompts(CLASSES, TEMPLATES)), len(CLASSES))
    assert torch.allclose(weights, classifier, atol=1e-6)
    our_logits = 100 * store.images([it.image for it in task.items])[0] @ weights
    assert torch.allclose(our_logits, their_logits, atol=1e-4)
    assert len(set(our_logits.argmax(1).tolist())) > 1  # a non-degenerate case: several classes predicted
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours.metrics[key] == pytest.approx(theirs[key], abs=1e-6), key


class _Pairs(Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, captions = self.items[i]
        return self.transform(image), captions


def test_retrieval_matches_clip_benchmark(tmp_path, model):
    net, preprocess, tokenizer = model
    items, doc = [], []
    for k, name in enumerate(CLASSES):
        for j in range(2):
            image = _image(k, j)
            path = save(image, tmp_path / "img" / f"{name}{j}.png")
            captions = [
                f"a {name} picture number {j}",
                f"{name} {'square' if j else 'thing'}",
                f"photo {k} {j}",
            ][: 2 + j]
            items.append((image, captions))
            doc.append({"image": str(path.relative_to(tmp_path)), "caption": captions})
    (tmp_path / "test.json").write_text(json.dumps(doc))

    loader = DataLoader(
        _Pairs(items, preprocess),
        batch_size=5,
        collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b]),
    )
    theirs = cb_retrieval.evaluate(net, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])

    encoder = Encoder(net, preprocess, tokenizer, batch_size=4, workers=2)
    spec = {
        "type": "retrieval",
        "recall_k": [1, 5, 10],
        "dataset": {"format": "karpathy", "path": str(tmp_path / "test.json")},
    }
    _, _, ours = _run_task(spec, encoder, tmp_path)
    assert ours.n_scored == len(items) and ours.details["n_captions"] == sum(len(c) for _, c in items)
    for key, value in theirs.items():
        assert ours.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < ours.metrics["image_retrieval_recall@5"] < 1  # neither trivial nor perfect
