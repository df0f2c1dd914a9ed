"""Metrics on score matrices: pure functions, no model, so they can be tested on hand-built numbers.

One rule for ties everywhere: a tie counts against the model. A true class
that ties with a wrong one is not top-1, a positive caption that ties with its
negative is wrong (SugarCrepe's rule), a retrieval target tied with a
non-target at the k-th place is not in the top k. Without ties (which real
float features practically never produce) every figure here equals
CLIP_benchmark's; with ties, CLIP_benchmark's answer depends on the order
torch.topk happens to return, ours does not.

Conventions: score matrices are (queries, candidates); higher is better.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def true_class_rank(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each row, how many other classes score >= the true class (0 = strictly best)."""
    true = logits.gather(1, targets.view(-1, 1))
    at_least = (logits >= true).sum(dim=1) - 1  # minus the true class itself
    return at_least


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float | None:
    """Fraction of rows whose true class is among the k best (None if there are fewer than k classes).

    CLIP_benchmark reports acc5 as NaN below 5 classes; None is JSON's way to say the same.
    """
    if logits.shape[1] < k:
        return None
    if logits.shape[0] == 0:
        return None
    return (true_class_rank(logits, targets) < k).double().mean().item()


def predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Predicted class per row, consistent with the tie rule: the true class only if strictly best,
    else the best-scoring wrong class."""
    correct = true_class_rank(logits, targets) == 0
    others = logits.clone()
    others.scatter_(1, targets.view(-1, 1), float("-inf"))
    return torch.where(correct, targets, others.argmax(dim=1))


def mean_per_class_recall(targets: torch.Tensor, preds: torch.Tensor) -> float | None:
    """Balanced accuracy: the mean over classes present in `targets` of that class's recall."""
    if targets.numel() == 0:
        return None
    recalls = [(preds[targets == c] == c).double().mean().item() for c in torch.unique(targets).tolist()]
    return float(sum(recalls) / len(recalls))


def per_class_recall(targets: torch.Tensor, preds: torch.Tensor, n_classes: int) -> list[float | None]:
    """Recall of every class (None for a class with no items)."""
    out: list[float | None] = []
    for c in range(n_classes):
        mask = targets == c
        out.append((preds[mask] == c).double().mean().item() if mask.any() else None)
    return out


def confusion_matrix(true: Sequence[int], pred: Sequence[int], labels: Sequence[int]) -> list[list[int]]:
    """counts[i][j] = items with true label labels[i] predicted as labels[j]."""
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, pred, strict=True):
        counts[index[t]][index[p]] += 1
    return counts


# ---------------------------------------------------------------------- retrieval


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each query, how many non-positive candidates score >= its best-scoring positive.

    A query is a hit at k iff this is < k: "any of its positives in the top k",
    with ties resolved against the model. Rows with no positive get a rank
    past every candidate (never a hit). Computed in chunks of queries so a
    25k x 5k COCO matrix does not need a second boolean copy at once.
    """
    out = torch.empty(scores.shape[0], dtype=torch.long)
    for start in range(0, scores.shape[0], chunk):
        s = scores[start : start + chunk]
        pos = positives[start : start + chunk]
        best = torch.where(pos, s, torch.full_like(s, float("-inf"))).max(dim=1).values
        ranks = ((s >= best[:, None]) & ~pos).sum(dim=1)
        ranks[~pos.any(dim=1)] = scores.shape[1]
        out[start : start + chunk] = ranks
    return out


def recall_at_k(ranks: torch.Tensor, k: int) -> float | None:
    """Fraction of queries with a positive in the top k."""
    if ranks.numel() == 0:
        return None
    return (ranks < k).double().mean().item()


def retrieval_ranks(
    text_feats: torch.Tensor, image_feats: torch.Tensor, text_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text->image ranks per text, image->text ranks per image) for captions `text_image[j]` of image j.

    scores = texts @ images.T (CLIP_benchmark's layout): text->image asks
    whether the caption's own image is in the top k; image->text whether
    any of the image's captions is.
    """
    scores = text_feats @ image_feats.T
    return retrieval_ranks_from_scores(scores, text_image, scores.T)


def retrieval_ranks_from_scores(
    t2i: torch.Tensor, text_image: torch.Tensor, i2t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks for given (texts, images) and (images, texts) score matrices, which may differ (QB-Norm)."""
    n_images = t2i.shape[1]
    positives = torch.zeros(t2i.shape, dtype=torch.bool)
    positives[torch.arange(t2i.shape[0]), text_image] = True
    text_ranks = positive_ranks(t2i, positives)
    image_ranks = positive_ranks(i2t, positives.T.contiguous())
    assert image_ranks.shape[0] == n_images
    return text_ranks, image_ranks


def batched_clip_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: float, batch: int) -> float | None:
    """open_clip_train's validation loss: CLIP's symmetric cross-entropy over consecutive batches of
    `batch` pairs (row i of each is a pair), averaged over pairs (a short last batch counts for its size)."""
    n = images.shape[0]
    if n == 0:
        return None
    total = 0.0
    for start in range(0, n, batch):
        img, txt = images[start:start + batch].float(), texts[start:start + batch].float()
        logits = logit_scale * img @ txt.T
        labels = torch.arange(img.shape[0])
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        total += float(loss) * img.shape[0]
    return total / n


def qb_norm(sims: torch.Tensor, bank_sims: torch.Tensor, beta: float = 20.0, k: int = 1) -> torch.Tensor:
    """Querybank normalisation with dynamic inverted softmax (Bogolin et al., CVPR 2022).

    `sims` (queries, gallery) are the test scores, `bank_sims` (bank queries,
    gallery) the querybank's. Gallery items that appear in some bank query's
    top k form the activation set; a test query whose top-1 item is in that
    set has its row replaced by exp(beta*s) / sum over the bank of
    exp(beta*s_bank) (an inverted softmax that demotes hubs), other rows stay
    as they are. Only the order within a row matters for retrieval, so the
    normalised rows are kept in log space: beta*s - logsumexp(beta*s_bank).
    """
    use = active_rows(sims, bank_sims, k)
    return torch.where(use[:, None], inverted_softmax(sims, bank_sims, beta), sims.double())


def inverted_softmax(sims: torch.Tensor, bank_sims: torch.Tensor, beta: float) -> torch.Tensor:
    """log of exp(beta*s) / sum over the bank of exp(beta*s_bank), per gallery item (column): a gallery
    item close to many bank items (a hub) is demoted. Rows keep their order up to this column shift, so
    the log is what retrieval needs."""
    return beta * sims.double() - torch.logsumexp(beta * bank_sims.double(), dim=0)[None, :]


def active_rows(sims: torch.Tensor, bank_sims: torch.Tensor, k: int) -> torch.Tensor:
    """QB-Norm's dynamic rule: the rows whose top-1 gallery item is among some bank item's top k."""
    bank_top = bank_sims.topk(min(k, bank_sims.shape[1]), dim=1).indices.reshape(-1)
    active = torch.zeros(sims.shape[1], dtype=torch.bool)
    active[bank_top] = True
    return active[sims.argmax(dim=1)]


def db_norm(sims: torch.Tensor, query_bank_sims: torch.Tensor, gallery_bank_sims: torch.Tensor,
            beta_query: float = 20.0, beta_gallery: float = 20.0, k: int = 1, dynamic: bool = False) -> torch.Tensor:
    """Dual bank normalisation (DBNorm, "Balance Act", Wang et al., EMNLP 2023), in log space.

    `sims` (queries, gallery) are the test scores; `query_bank_sims` (a query-modality bank, gallery) and
    `gallery_bank_sims` (a gallery-modality bank, gallery) the two banks' scores against the same gallery.
    Dual inverted softmax: the product of the inverted softmax over each bank,
    exp(b1 s) / sum_Bq exp(b1 s_bq) * exp(b2 s) / sum_Bg exp(b2 s_bg), whose log is the sum of the two.
    Dual dynamic inverted softmax (`dynamic`): each factor normalised only in the rows its own bank
    activates (QB-Norm's rule, `active_rows`); elsewhere the factor is exp(b s), which ranks as s does."""
    by_query = inverted_softmax(sims, query_bank_sims, beta_query)
    by_gallery = inverted_softmax(sims, gallery_bank_sims, beta_gallery)
    if dynamic:
        by_query = torch.where(active_rows(sims, query_bank_sims, k)[:, None], by_query, beta_query * sims.double())
        by_gallery = torch.where(active_rows(sims, gallery_bank_sims, k)[:, None], by_gallery,
                                 beta_gallery * sims.double())
    return by_query + by_gallery


# ---------------------------------------------------------------------- pairs and groups


def pairwise_correct(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """True where the positive scores strictly higher than the negative (a tie is wrong)."""
    return positive > negative


def winoground_scores(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-item text / image / group correctness from scores[n, caption c, image i] = s(c_c, i_i).

    text:  s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)  (each image prefers its caption)
    image: s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0)  (each caption prefers its image)
    group: both.
    """
    s00, s01, s10, s11 = scores[:, 0, 0], scores[:, 0, 1], scores[:, 1, 0], scores[:, 1, 1]
    text = (s00 > s10) & (s11 > s01)
    image = (s00 > s01) & (s11 > s10)
    return {"text": text, "image": image, "group": text & image}


def mean(values: torch.Tensor | Sequence[bool | float]) -> float | None:
    """Mean as a float, None for nothing."""
    t = torch.as_tensor(values, dtype=torch.float64)
    return t.mean().item() if t.numel() else None


def group_accuracy(
    correct: Sequence[bool], groups: Sequence[str], min_size: int = 1, exclude: Sequence[str] = ()
) -> tuple[float | None, dict[str, dict[str, float | int | bool]]]:
    """Macro accuracy over groups (ARO: relations; VG-A: attribute pairs with >= 25 items).

    Returns (mean of the per-group accuracies of the groups that count, every
    group's {acc, n, counted}); a group counts if it has >= `min_size` items
    and is not in `exclude`.
    """
    tally: dict[str, list[int]] = {}
    for ok, g in zip(correct, groups, strict=True):
        t = tally.setdefault(g, [0, 0])
        t[0] += int(bool(ok))
        t[1] += 1
    excluded = set(exclude)
    table: dict[str, dict[str, float | int | bool]] = {}
    for g in sorted(tally):
        hits, n = tally[g]
        table[g] = {"acc": hits / n, "n": n, "counted": n >= min_size and g not in excluded}
    counted = [v["acc"] for v in table.values() if v["counted"]]
    return (sum(counted) / len(counted) if counted else None), table
