"""Ranking metrics for retrieval tasks (one relevant item per query), and beyond-accuracy metrics of the
recommended top-K lists. All are torchmetrics ``Metric``s with sum/count states (``metrics/running.py``;
coverage: a seen-item vector):
constant memory per query stream, reduced by summation under DDP.

Accuracy, from the rank r of the query's target item (0-based: the number of items scored above it):
- ``ndcg_K`` = 1/log2(r+2) if r < K else 0 (one relevant item: the ideal DCG is 1; Järvelin & Kekäläinen 2002);
- ``hitrate_K`` = ``recall_K`` = 1[r < K] (they coincide with one relevant item; both are reported by name);
- ``mrr`` = 1/(r+1) over the full list (no cut-off).
Ties: an item scored exactly like the target counts half (r = #higher + #tied/2, the target's mean position under
random tie-breaking; McSherry & Najork, ECIR 2008, use the same expectation), so a constant scorer earns chance
level, not a perfect score. With distinct scores this is torchmetrics' ``retrieval_*`` definitions.

Beyond accuracy, over each query's top-K list:
- ``coverage_K``: distinct items recommended over all queries / catalogue size (catalogue coverage);
- ``diversity_K``: intra-list diversity, the mean over the list's item pairs of their distance (Ziegler et al.,
  "Improving Recommendation Lists Through Topic Diversification", WWW 2005): 1[categories differ] when items have
  categories, else the cosine distance 1 − cos(e_i, e_j) of their item-table rows; averaged over queries;
- ``novelty_K``: mean self-information −log2 p(i) of the recommended items, p(i) = the item's share of training
  interactions, add-one smoothed (Zhou et al., "Solving the apparent diversity-accuracy dilemma of recommender
  systems", PNAS 2010; Castells et al., "Novelty and Diversity in Recommender Systems", 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mtl_experiments.metrics.running import MeanOfValues, RunningMean


def target_rank(scores: Tensor, target_col: Tensor) -> Tensor:
    """Rank (0-based, float64) of column ``target_col[b]`` in each row of ``scores[B, I]``: the number of columns
    scored strictly higher plus half of the others scored equal. A NaN target score ranks last."""
    s_t = scores.gather(1, target_col.view(-1, 1))
    higher = (scores > s_t).sum(1)
    ties = (scores == s_t).sum(1) - 1
    rank = higher.double() + ties.double() / 2
    return torch.where(torch.isnan(s_t.squeeze(1)), torch.full_like(rank, scores.shape[1] - 1), rank)


class RankMean(MeanOfValues):
    """Mean over queries of a function ``value(ranks)`` of the target's rank. ``update(ranks)``."""

    higher_is_better = True

    def value(self, ranks: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, ranks: Tensor) -> None:
        super().update(ranks.double())


class NDCG(RankMean):
    """NDCG@K with one relevant item: 1/log2(r+2) if r < K, else 0."""

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        self.k = k

    def value(self, ranks: Tensor) -> Tensor:
        return torch.where(ranks < self.k, 1.0 / torch.log2(ranks + 2), torch.zeros_like(ranks))


class HitRate(RankMean):
    """HitRate@K (= Recall@K with one relevant item): 1[r < K]."""

    def __init__(self, k: int, **kwargs):
        super().__init__(**kwargs)
        self.k = k

    def value(self, ranks: Tensor) -> Tensor:
        return (ranks < self.k).double()


class Recall(HitRate):
    """Recall@K: the share of the query's relevant items in the top K; with one relevant item, 1[r < K]."""


class MRR(RankMean):
    """Mean reciprocal rank over the full list: 1/(r+1)."""

    def value(self, ranks: Tensor) -> Tensor:
        return 1.0 / (ranks + 1)


class Coverage(Metric):
    """Catalogue coverage@K: distinct items in the top-K lists / ``num_items``. ``update(topk)``: Long[B, >=K]
    item ids 1..num_items, best first. State: how often each item was recommended (Long[num_items + 1])."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, num_items: int, **kwargs):
        super().__init__(**kwargs)
        self.k, self.num_items = k, num_items
        self.add_state("counts", default=torch.zeros(num_items + 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, topk: Tensor) -> None:
        items = topk[:, : self.k].reshape(-1)
        self.counts.index_add_(0, items, torch.ones_like(items))

    def compute(self) -> Tensor:
        return (self.counts[1:] > 0).sum().double() / self.num_items


class Diversity(RunningMean):
    """Intra-list diversity@K (Ziegler et al. 2005): mean over the list's K(K−1)/2 pairs of 1[category differs]
    (``category``: Long[num_items + 1]) or, without categories, of 1 − cos(e_i, e_j) over ``topk_vectors``
    (the recommended items' embeddings, [B, >=K, d]); then the mean over queries. ``update(topk, topk_vectors)``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, category: Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        if k < 2:
            raise ValueError("intra-list diversity needs lists of at least 2 items")
        self.k = k
        self.register_buffer("category", None if category is None else category.long().clone(), persistent=False)

    def update(self, topk: Tensor, topk_vectors: Tensor | None = None) -> None:
        k = self.k
        pair = torch.triu(torch.ones(k, k, dtype=torch.bool, device=topk.device), diagonal=1)
        if self.category is not None:
            c = self.category[topk[:, :k]]
            dist = (c[:, :, None] != c[:, None, :]).double()
        else:
            if topk_vectors is None:
                raise ValueError("Diversity without an item category table needs the recommended items' vectors")
            v = F.normalize(topk_vectors[:, :k].double(), dim=-1)
            dist = 1.0 - v @ v.transpose(1, 2)
        self.add(dist[:, pair].mean(1).sum(), topk.shape[0])


class Novelty(RunningMean):
    """Novelty@K: mean self-information −log2 p(i) of the top-K items, p(i) = (c_i + 1) / (N + I) from the training
    interaction counts ``popularity`` (Long[num_items + 1], row 0 unused), N = Σ c_i. ``update(topk)``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int, popularity: Tensor, **kwargs):
        super().__init__(**kwargs)
        self.k = k
        counts = popularity.double().clone()
        counts[0] = 0
        num_items = counts.numel() - 1
        share = (counts + 1) / (counts[1:].sum() + num_items)
        self.register_buffer("information", -torch.log2(share), persistent=False)

    def update(self, topk: Tensor) -> None:
        items = topk[:, : self.k]
        self.add(self.information[items].sum(), items.numel())
