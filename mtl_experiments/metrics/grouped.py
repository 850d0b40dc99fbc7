"""Grouped AUC: the AUC of each user's own ranking, averaged over users.

GAUC = Σ_u w_u·AUC_u / Σ_u w_u with w_u = the user's number of impressions (rows), over the users whose rows hold
both classes (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018, §6.1; Zhu et al.,
"Optimized Cost per Click in Taobao Display Advertising", KDD 2017). A global AUC also rewards ranking one user's
impressions above another's, which serving never does; GAUC measures only the within-user order.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


def grouped_auroc(preds: Tensor, target: Tensor, groups: Tensor) -> Tensor:
    """Impression-weighted mean of per-group AUC (float64); NaN when no group has both classes.

    Per group, AUC_u = (R⁺ − n⁺(n⁺+1)/2) / (n⁺·n⁻) with R⁺ the sum of the positives' ranks (1-based) within the
    group, tied scores sharing their mean rank (Mann–Whitney U; a tie counts as half a correctly ordered pair,
    as in ``BinaryAUROC``). Vectorised: one sort by (group, score), no loop over users.
    """
    preds, target, groups = preds.double().flatten(), target.flatten().double(), groups.flatten().long()
    n = preds.numel()
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=preds.device)
    # sort by score, then stably by group: rows end up grouped, ascending by score within each group
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    p, y, g = preds[order], target[order], groups[order]
    new_group = torch.ones(n, dtype=torch.bool, device=p.device)
    new_group[1:] = g[1:] != g[:-1]
    new_block = new_group.clone()  # a block = a run of equal scores within one group
    new_block[1:] |= p[1:] != p[:-1]
    group_id = torch.cumsum(new_group.long(), 0) - 1
    block_id = torch.cumsum(new_block.long(), 0) - 1
    pos = torch.arange(n, device=p.device)
    group_start = pos[new_group]
    block_start = pos[new_block]
    block_end = torch.cat([block_start[1:], torch.tensor([n], device=p.device)]) - 1
    # mean 1-based rank of a tie block within its group
    rank = (block_start[block_id] + block_end[block_id]).double() / 2 - group_start[group_id].double() + 1
    num_groups = int(group_id[-1]) + 1
    size = torch.zeros(num_groups, dtype=torch.float64, device=p.device).index_add_(0, group_id, torch.ones_like(p))
    n_pos = torch.zeros_like(size).index_add_(0, group_id, y)
    rank_pos = torch.zeros_like(size).index_add_(0, group_id, y * rank)
    n_neg = size - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return torch.tensor(float("nan"), dtype=torch.float64, device=p.device)
    auc = (rank_pos[both] - n_pos[both] * (n_pos[both] + 1) / 2) / (n_pos[both] * n_neg[both])
    return (size[both] * auc).sum() / size[both].sum()


class GroupedAUROC(Metric):
    """Grouped AUC (see module docstring). ``update(preds, target, groups)``: probabilities or scores, 0/1 labels,
    group ids (user ids). Users with a single class are skipped; when no user has both classes the value is NaN
    (undefined, not 0.5: a split of one-impression users has no within-user ranking to measure).

    States are the concatenated rows (like ``BinaryAUROC`` without thresholds): exact, reduced by concatenation
    under DDP. ``update`` without ``groups`` adds nothing (a batch without user ids cannot be grouped).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor | None = None) -> None:
        if groups is None:
            return
        self.preds.append(preds.detach().double().flatten())
        self.target.append(target.detach().flatten().to(torch.int8))
        self.groups.append(groups.detach().flatten().long())

    def compute(self) -> Tensor:
        if isinstance(self.preds, list) and not self.preds:  # never updated with groups
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        return grouped_auroc(dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.groups))
