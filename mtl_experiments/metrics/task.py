"""Task metrics that torchmetrics does not provide, and helpers to name and aggregate them."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanLogLoss(Metric):
    """The mean over samples of a per-sample negative log-likelihood ``nll(preds, target)`` (a subclass's), summed
    in float64 with sum/count states so it reduces exactly across batches and processes."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = 1e-15, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def nll(self, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.total += self.nll(preds, target).sum()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class BinaryLogLoss(MeanLogLoss):
    """Mean binary cross-entropy of predicted probabilities: -mean(y·log p + (1-y)·log(1-p)).

    Probabilities are clamped to [eps, 1-eps] (eps=1e-15, as scikit-learn's ``log_loss`` did) so a
    single over-confident mistake gives a large but finite value.
    """

    def nll(self, preds: Tensor, target: Tensor) -> Tensor:
        p = preds.double().clamp(self.eps, 1 - self.eps)
        y = target.double()
        return -(y * p.log() + (1 - y) * (1 - p).log())


class MulticlassLogLoss(MeanLogLoss):
    """Mean negative log-likelihood of the true class: -mean(log p_y), p = predicted class probabilities [B, C].

    p_y is clamped to [eps, 1] (eps=1e-15, as ``BinaryLogLoss``) so a confident mistake gives a large but finite
    value.
    """

    def nll(self, preds: Tensor, target: Tensor) -> Tensor:
        p = preds.double().gather(1, target.long().view(-1, 1)).squeeze(1).clamp(self.eps, 1.0)
        return -p.log()
