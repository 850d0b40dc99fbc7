"""The one running-mean metric base: a float64 ``sum`` and a ``count``, built on torchmetrics' aggregation metrics.

``RunningMean`` is a ``torchmetrics.aggregation.BaseAggregator`` (the base of ``SumMetric`` and ``MeanMetric``)
whose ``sum`` state may have a shape (a T×T matrix of cosines, a vector of expert shares) and whose ``count``
is an integer: mean = sum / count. Both states are reduced by summation, so the mean over every process's
updates is exact under DDP, and float64 keeps long streams of small values exact enough.

Subclasses say what one ``update`` adds: the task metrics add per-sample values (``add(values.sum(), n)``), the
conflict metrics one value per measured step (``add(value)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.aggregation import BaseAggregator


class RunningMean(BaseAggregator):
    """Mean of a fixed-shape value over what was added: states ``sum`` (float64, ``shape``) and ``count`` (long)."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, shape: Sequence[int] = (), **kwargs):
        # nan_strategy="disable": a NaN is a value like any other here (the module stops on non-finite losses)
        super().__init__(
            "sum", torch.zeros(tuple(shape), dtype=torch.float64), nan_strategy="disable", state_name="sum", **kwargs
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def add(self, total: Tensor, count: int = 1) -> None:
        """Add ``total`` (the sum of ``count`` values) to the running sum."""
        self.sum += total.to(self.sum)
        self.count += count

    def update(self, *args, **kwargs) -> None:
        raise NotImplementedError

    def compute(self) -> Tensor:
        return self.sum / self.count


class MeanOfValues(RunningMean):
    """Mean over samples of a per-sample value ``value(*inputs)`` (a subclass's): ``update(*inputs)``.

    ``count`` grows by the number of values of the update (one per sample, query or list item)."""

    def value(self, *inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, *inputs: Tensor) -> None:
        values = self.value(*inputs)
        self.add(values.sum(), values.numel())
