"""Task metrics that torchmetrics does not provide, and helpers to name and aggregate them."""

from __future__ import annotations

from torch import Tensor

from mtl_experiments.metrics.running import RunningMean


class MeanLogLoss(RunningMean):
    """The mean over samples of a per-sample negative log-likelihood ``nll(preds, target)`` (a subclass's), summed
    in float64 (``RunningMean``: sum/count states, so it reduces exactly across batches and processes)."""

    higher_is_better = False

    def __init__(self, eps: float = 1e-15, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps

    def nll(self, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.add(self.nll(preds, target).sum(), target.numel())


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
