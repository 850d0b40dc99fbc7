"""Geometric loss strategy (GLS): Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.

    total = (Π_t L_t)^(1/T) = exp(mean_t log L_t)

computed in log space, since a product of T small (or large) losses under- or overflows. The total is
invariant to each task's loss scale up to a constant factor, so no weights need tuning. Its gradient is a
weighted sum of the task gradients with

    w_t = ∂total/∂L_t = total / (T·L_t)

(a task with a smaller loss gets a larger weight); these, detached, are the reported weights.

Every loss must be > 0: at L_t = 0 the total is 0 and w_t = 0/0, so the update would be NaN. A batch
with a loss <= 0 therefore raises ``NonFiniteLossError`` at once, naming the task, instead of letting a
NaN reach the parameters (our task losses, BCE and MSE, are >= 0 and reach 0 only when a task is fit
exactly, e.g. a constant label with saturated logits).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_experiments.errors import NonFiniteLossError
from mtl_experiments.loss.base import LossWeighting


class GLS(LossWeighting):
    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if (losses <= 0).any():
            names = getattr(self, "task_names", None) or [str(i) for i in range(losses.shape[0])]
            bad = {n: float(v) for n, v in zip(names, losses.detach().cpu(), strict=True) if v <= 0}
            raise NonFiniteLossError(
                f"loss=gls takes the log of every task loss, but task(s) {bad} have a loss <= 0, where the "
                "geometric mean's gradient is undefined. Check those tasks' labels (a constant label is fit "
                "exactly), or use another loss (e.g. loss=equal)."
            )
        total = torch.exp(torch.log(losses).mean())
        weights = total.detach() / (losses.shape[0] * losses.detach())
        return total, weights
