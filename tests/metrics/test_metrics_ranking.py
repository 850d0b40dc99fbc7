"""Ranking and beyond-accuracy metrics (metrics/ranking.py): hand-computed values, equality with torchmetrics'
retrieval metrics on random queries, ties, and states that merge like DDP's reduction."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.retrieval import (
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from mtl_experiments.metrics.ranking import MRR, NDCG, Coverage, Diversity, HitRate, Novelty, Recall, target_rank


def test_target_rank_counts_higher_items_and_half_the_ties():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5], [0.5, 0.9, 0.5, 0.1, 0.5], [float("nan"), 1.0, 2.0, 3.0, 4.0]])
    ranks = target_rank(scores, torch.tensor([0, 3, 0]))
    assert ranks.tolist() == [1 + 2 / 2, 4.0, 4.0]  # 0.9 above, two others tied; all above; NaN ranks last
    constant = target_rank(torch.zeros(1, 101), torch.tensor([7]))
    assert constant.item() == 50.0  # a constant scorer sits mid-list: chance level, not a perfect score


def test_rank_metrics_by_hand():
    ranks = torch.tensor([0.0, 2.0, 4.0, 11.0])
    values = {}
    for name, metric in {"ndcg": NDCG(3), "hit": HitRate(3), "recall": Recall(3), "mrr": MRR()}.items():
        metric.update(ranks)
        values[name] = metric.compute().item()
    assert values["ndcg"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert values["hit"] == values["recall"] == 0.5
    assert values["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 5 + 1 / 12) / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_rank_metrics_equal_torchmetrics_retrieval_metrics(seed, k):
    g = torch.Generator().manual_seed(seed)
    # positive scores: torchmetrics' reciprocal rank treats an item scored <= 0 as not relevant
    scores = torch.rand(40, 25, generator=g) + 0.01
    target = torch.randint(0, 25, (40,), generator=g)
    ranks = target_rank(scores, target)
    ours = {"ndcg": NDCG(k), "hit": HitRate(k), "recall": Recall(k), "mrr": MRR()}
    for metric in ours.values():
        for part in ranks.split(16):  # several batches
            metric.update(part)
    relevant = torch.nn.functional.one_hot(target, 25).bool()
    theirs = {
        "ndcg": [retrieval_normalized_dcg(s, r, top_k=k) for s, r in zip(scores, relevant, strict=True)],
        "hit": [retrieval_hit_rate(s, r, top_k=k) for s, r in zip(scores, relevant, strict=True)],
        "recall": [retrieval_recall(s, r, top_k=k) for s, r in zip(scores, relevant, strict=True)],
        "mrr": [retrieval_reciprocal_rank(s, r) for s, r in zip(scores, relevant, strict=True)],
    }
    for name, metric in ours.items():
        assert metric.compute().item() == pytest.approx(torch.stack(theirs[name]).double().mean().item(), abs=1e-6)


def test_coverage_by_hand():
    top = torch.tensor([[1, 2, 3], [2, 3, 4]])
    c2, c3 = Coverage(2, num_items=10), Coverage(3, num_items=10)
    c2.update(top)
    c3.update(top)
    assert c2.compute().item() == pytest.approx(0.3)  # items 1, 2, 3
    assert c3.compute().item() == pytest.approx(0.4)  # items 1, 2, 3, 4


def test_diversity_by_category_by_hand():
    category = torch.tensor([0, 5, 5, 7, 8])  # items 1..4
    metric = Diversity(3, category)
    metric.update(torch.tensor([[1, 2, 3], [1, 3, 4]]))
    # list 1: categories 5, 5, 7 -> pairs 0, 1, 1 -> 2/3; list 2: 5, 7, 8 -> 1
    assert metric.compute().item() == pytest.approx((2 / 3 + 1) / 2)


def test_diversity_by_embedding_distance_by_hand():
    vectors = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])  # cosine: 0, 1/sqrt2, 1/sqrt2
    metric = Diversity(3)
    metric.update(torch.tensor([[1, 2, 3]]), vectors)
    assert metric.compute().item() == pytest.approx((1 + 2 * (1 - 1 / math.sqrt(2))) / 3)
    only_two = Diversity(2)
    only_two.update(torch.tensor([[1, 2, 3]]), vectors)  # the first K=2 items only
    assert only_two.compute().item() == pytest.approx(1.0)


def test_novelty_by_hand():
    metric = Novelty(2, popularity=torch.tensor([9, 3, 1, 0]))  # row 0 ignored; N = 4, I = 3
    metric.update(torch.tensor([[1, 3, 2]]))
    # add-one shares: item 1 4/7, item 3 1/7
    assert metric.compute().item() == pytest.approx((-math.log2(4 / 7) - math.log2(1 / 7)) / 2)


def test_states_merge_like_a_distributed_reduction():
    """Two ranks' states, merged with the metrics' own reduction, give the one-process value."""
    g = torch.Generator().manual_seed(3)
    ranks = torch.randint(0, 30, (50,), generator=g).double()
    top = torch.randint(1, 31, (50, 5), generator=g)
    popularity = torch.randint(0, 9, (31,), generator=g)
    makers = [
        (lambda: NDCG(5), {"ranks": ranks}),
        (lambda: MRR(), {"ranks": ranks}),
        (lambda: Coverage(5, 30), {"topk": top}),
        (lambda: Diversity(5, torch.randint(0, 4, (31,), generator=g)), {"topk": top}),
        (lambda: Novelty(5, popularity), {"topk": top}),
    ]
    for make, data in makers:
        whole, a, b = make(), make(), make()
        if isinstance(whole, Diversity):
            b.category = a.category = whole.category
        whole.update(**data)
        a.update(**{k: v[:20] for k, v in data.items()})
        b.update(**{k: v[20:] for k, v in data.items()})
        a.merge_state(b)
        assert a.compute().item() == pytest.approx(whole.compute().item())
