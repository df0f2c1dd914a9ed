"""Metrics on hand-built score matrices whose answers are known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from vlp.eval import metrics
from vlp.eval.templates import check_template, class_embeddings, format_template, load_templates, prompts

# ---------------------------------------------------------------------- retrieval


def _t2i() -> tuple[torch.Tensor, torch.Tensor]:
    """3 images, 6 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2. scores[text, image]."""
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # cap0: own image first (rank 0)
            [0.2, 0.8, 0.1],  # cap1: own image second (rank 1)
            [0.1, 0.7, 0.3],  # cap2: rank 0
            [0.6, 0.2, 0.5],  # cap3: own image (1) last (rank 2)
            [0.1, 0.2, 0.3],  # cap4: rank 0
            [0.4, 0.4, 0.4],  # cap5: three-way tie -> rank 2 (ties count against)
        ]
    )
    return scores, torch.tensor([0, 0, 1, 1, 2, 2])


def test_text_to_image_ranks_and_recall():
    scores, text_image = _t2i()
    text_ranks, image_ranks = metrics.retrieval_ranks_from_scores(scores, text_image, scores.T)
    assert text_ranks.tolist() == [0, 1, 0, 2, 0, 2]
    assert metrics.recall_at_k(text_ranks, 1) == pytest.approx(3 / 6)
    assert metrics.recall_at_k(text_ranks, 2) == pytest.approx(4 / 6)
    assert metrics.recall_at_k(text_ranks, 3) == 1.0


def test_image_to_text_counts_any_of_several_captions():
    scores, text_image = _t2i()
    _, image_ranks = metrics.retrieval_ranks_from_scores(scores, text_image, scores.T)
    # image 0: column 0 = [.9,.2,.1,.6,.1,.4]; best own caption .9 -> nothing above -> rank 0
    # image 1: column 1 = [.1,.8,.7,.2,.2,.4]; own captions are 2 (.7) and 3 (.2); best .7 is beaten by cap1 (.8) -> 1
    # image 2: column 2 = [0,.1,.3,.5,.3,.4]; own captions 4 (.3), 5 (.4); best .4 beaten by cap3 (.5) -> 1
    assert image_ranks.tolist() == [0, 1, 1]
    assert metrics.recall_at_k(image_ranks, 1) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(image_ranks, 2) == 1.0


def test_retrieval_ties_count_against_the_model():
    scores = torch.tensor([[0.5, 0.5], [0.3, 0.7]])  # text 0 ties its image (0) with image 1
    ranks, _ = metrics.retrieval_ranks_from_scores(scores, torch.tensor([0, 1]), scores.T)
    assert ranks.tolist() == [1, 0]
    assert metrics.recall_at_k(ranks, 1) == 0.5 and metrics.recall_at_k(ranks, 2) == 1.0


def test_retrieval_ranks_from_features_match_the_score_layout():
    torch.manual_seed(0)
    texts, images = torch.randn(7, 4), torch.randn(3, 4)
    text_image = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    a = metrics.retrieval_ranks(texts, images, text_image)
    b = metrics.retrieval_ranks_from_scores(texts @ images.T, text_image, images @ texts.T)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_positive_ranks_is_chunk_independent():
    torch.manual_seed(1)
    scores = torch.randn(50, 9)
    pos = torch.zeros(50, 9, dtype=torch.bool)
    pos[torch.arange(50), torch.randint(0, 9, (50,))] = True
    assert torch.equal(
        metrics.positive_ranks(scores, pos, chunk=7), metrics.positive_ranks(scores, pos, chunk=1000)
    )


# ---------------------------------------------------------------------- classification


def test_topk_accuracy_with_a_tie():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    targets = torch.tensor([0, 0, 0])
    assert metrics.true_class_rank(logits, targets).tolist() == [0, 1, 2]
    assert metrics.topk_accuracy(logits, targets, 1) == pytest.approx(1 / 3)  # row 1's tie is wrong
    assert metrics.topk_accuracy(logits, targets, 2) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(logits, targets, 5) is None  # fewer than 5 classes: undefined


def test_predictions_follow_the_tie_rule():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    assert metrics.predictions(logits, torch.tensor([0, 0, 0])).tolist() == [0, 1, 2]


def test_mean_per_class_recall_is_balanced_accuracy():
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 0, 1, 2])
    # recalls: class 0 3/4, class 1 1/2, class 2 1/1 -> mean 0.75; plain accuracy would be 5/7
    assert metrics.mean_per_class_recall(targets, preds) == pytest.approx(0.75)
    assert metrics.per_class_recall(targets, preds, 4) == [0.75, 0.5, 1.0, None]


def test_confusion_matrix():
    cm = metrics.confusion_matrix([2, 2, 3, 4], [2, 3, 3, 2], labels=[2, 3, 4])
    assert cm == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


# ---------------------------------------------------------------------- pairs, Winoground, groups


def test_pairwise_tie_is_wrong():
    assert metrics.pairwise_correct(
        torch.tensor([0.5, 0.6, 0.4]), torch.tensor([0.5, 0.5, 0.5])
    ).tolist() == [
        False,
        True,
        False,
    ]


def test_winoground_scores_on_hand_built_items():
    # scores[item, caption, image]
    items = torch.tensor(
        [
            [[0.9, 0.1], [0.1, 0.9]],  # everything right
            [[0.9, 0.95], [0.1, 0.96]],  # text right (i0: .9>.1, i1: .96>.95), image wrong (c0 prefers i1)
            [[0.9, 0.1], [0.95, 0.96]],  # image right (c0: .9>.1, c1: .96>.95), text wrong (i0 prefers c1)
            [[0.5, 0.5], [0.5, 0.5]],  # all ties: all wrong
        ]
    )
    s = metrics.winoground_scores(items)
    assert s["text"].tolist() == [True, True, False, False]
    assert s["image"].tolist() == [True, False, True, False]
    assert s["group"].tolist() == [True, False, False, False]


def test_group_accuracy_is_macro_with_size_floor_and_exclusions():
    correct = [True, True, False, True, False, False, True]
    groups = ["a", "a", "a", "b", "b", "c", "d"]
    macro, table = metrics.group_accuracy(correct, groups, min_size=2, exclude=["b"])
    # a: 2/3 counted; b: 1/2 excluded; c: 0/1 too small; d: 1/1 too small
    assert macro == pytest.approx(2 / 3)
    assert table["a"] == {"acc": pytest.approx(2 / 3), "n": 3, "counted": True}
    assert not table["b"]["counted"] and not table["c"]["counted"]
    macro_all, _ = metrics.group_accuracy(correct, groups)
    assert macro_all == pytest.approx((2 / 3 + 1 / 2 + 0 + 1) / 4)  # not the micro 4/7


# ---------------------------------------------------------------------- QB-Norm


def test_qb_norm_demotes_a_hub():
    # Gallery item 0 is a hub: every query likes it. Query 1's true item is 1.
    sims = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]])
    bank = torch.tensor([[0.9, 0.2, 0.1], [0.85, 0.3, 0.2], [0.9, 0.1, 0.3]])  # bank top-1: always item 0
    out = metrics.qb_norm(sims, bank, beta=20.0, k=1)
    # rows whose top-1 (item 0) is in the activation set {0} are normalised; row 2 (top-1 = item 2) is kept
    assert torch.equal(out[2], sims[2].double())
    log_norm = torch.logsumexp(20.0 * bank.double(), dim=0)
    assert torch.allclose(out[1], 20.0 * sims[1].double() - log_norm)
    assert out[1].argmax().item() == 1  # the hub lost its place to the true item
    assert sims[1].argmax().item() == 0


def test_qb_norm_leaves_everything_when_no_row_hits_the_activation_set():
    sims = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    bank = torch.tensor([[0.9, 0.1]])
    assert torch.equal(metrics.qb_norm(sims, bank), sims.double())


def test_db_norm_on_a_hand_computed_4x4_case():
    """Gallery item 0 is a hub: close to every bank item of both banks. Query 1 ranks it first on raw scores
    (0.6 against 0.5); after dual inverted softmax item 1 wins. beta 1 keeps the arithmetic by hand:
    out[q, g] = 2 s[q, g] - log sum_j exp(Q[j, g]) - log sum_j exp(G[j, g])."""
    sims = torch.tensor([[0.9, 0.1, 0.0, 0.0],
                         [0.6, 0.5, 0.0, 0.1],
                         [0.2, 0.0, 0.8, 0.1],
                         [0.3, 0.1, 0.1, 0.7]])
    query_bank = torch.tensor([[0.9, 0.0, 0.1, 0.0],
                               [0.8, 0.1, 0.0, 0.2],
                               [0.7, 0.0, 0.3, 0.0]])
    gallery_bank = torch.tensor([[0.9, 0.2, 0.0, 0.1],
                                 [0.8, 0.0, 0.2, 0.0]])
    lse_q = [math.log(math.exp(0.9) + math.exp(0.8) + math.exp(0.7)), math.log(math.exp(0.0) + math.exp(0.1) + 1),
             math.log(math.exp(0.1) + 1 + math.exp(0.3)), math.log(1 + math.exp(0.2) + 1)]
    lse_g = [math.log(math.exp(0.9) + math.exp(0.8)), math.log(math.exp(0.2) + 1),
             math.log(1 + math.exp(0.2)), math.log(math.exp(0.1) + 1)]
    want = torch.tensor([[2 * sims[q, g].item() - lse_q[g] - lse_g[g] for g in range(4)] for q in range(4)],
                        dtype=torch.float64)
    out = metrics.db_norm(sims, query_bank, gallery_bank, beta_query=1.0, beta_gallery=1.0)
    torch.testing.assert_close(out, want)
    assert sims[1].argmax().item() == 0 and out[1].argmax().item() == 1  # the hub demoted
    assert [int(r.argmax()) for r in out] == [0, 1, 2, 3]
    # dynamic: a row is normalised by a bank only if its raw top-1 is among that bank's top-1 items; every
    # bank item's top-1 here is item 0, so rows 0 and 1 are normalised, rows 2 and 3 keep 2 s (their order)
    dyn = metrics.db_norm(sims, query_bank, gallery_bank, beta_query=1.0, beta_gallery=1.0, dynamic=True)
    torch.testing.assert_close(dyn[:2], want[:2])
    torch.testing.assert_close(dyn[2:], 2 * sims[2:].double())
    # one bank of each side: with the gallery bank empty of hubs, only the query bank's factor demotes item 0
    flat = torch.zeros(2, 4)
    only_query = metrics.db_norm(sims, query_bank, flat, beta_query=1.0, beta_gallery=1.0)
    torch.testing.assert_close(only_query, metrics.inverted_softmax(sims, query_bank, 1.0) + sims.double()
                               - math.log(2))


# ---------------------------------------------------------------------- templates


def test_templates_accept_both_slot_styles_and_reject_others():
    assert format_template("a photo of a {c}.", "dog") == "a photo of a dog."
    assert format_template("{}s.", "cat") == "cats."
    for bad in ("no slot", "{c} and {c}", "{x}", "{c"):
        with pytest.raises(ValueError):
            check_template(bad)
    assert len(load_templates("imagenet")) == 80


def test_class_embeddings_average_normalised_prompts_then_renormalise():
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [3.0, 0.0]])  # 2 classes x 2 templates
    w = class_embeddings(feats, 2)
    assert w.shape == (2, 2)
    assert torch.allclose(
        w[:, 0], torch.tensor([1.0, 1.0]) / math.sqrt(2)
    )  # mean of unit vectors, renormalised
    assert torch.allclose(w[:, 1], torch.tensor([1.0, 0.0]))
    assert prompts(["a", "b"], ["x {c}", "{c} y"]) == ["x a", "a y", "x b", "b y"]


def test_batched_clip_loss_is_open_clip_trains_validation_loss():
    """Batches of 4, 4 and 2 pairs: each batch's ClipLoss (open_clip's own), weighted by its size."""
    from open_clip.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=-1)
    scale = 14.3
    want = sum(ClipLoss()(img[s:s + 4], txt[s:s + 4], torch.tensor(scale)).item() * len(img[s:s + 4])
               for s in (0, 4, 8)) / 10
    assert metrics.batched_clip_loss(img, txt, scale, 4) == pytest.approx(want, rel=1e-6)
    assert metrics.batched_clip_loss(img[:0], txt[:0], scale, 4) is None
