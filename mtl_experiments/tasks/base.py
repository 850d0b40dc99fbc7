"""What every task kind provides: head, loss, prediction, metrics, label checks."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mtl_experiments.errors import DataError


class Task:
    """One prediction task. Subclasses set ``kind``, ``loss_type`` and ``output_dim``.

    ``loss_type`` ("classification" or "regression") is what likelihood-based weightings such as
    uncertainty weighting need to know about a task; they never look at ``kind`` itself.
    """

    kind: ClassVar[str]
    loss_type: ClassVar[str]
    output_dim: int = 1

    def __init__(self, name: str, label: str | None = None):
        self.name = name
        self.label = label or name  # the data column this task reads; datasets may ignore it

    def head(self, in_dim: int) -> nn.Module:
        """Maps the backbone's representation for this task to the raw output (logits or values)."""
        return nn.Linear(in_dim, self.output_dim)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, output: Tensor) -> Tensor:
        """What a user consumes: probabilities for classification, values for regression."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, output: Tensor, target: Tensor) -> None:
        metrics.update(self.predict(output.detach()), target)

    def validate_labels(self, labels: Tensor, split: str) -> None:
        if not torch.isfinite(labels.float()).all():
            raise DataError(f"Task '{self.name}': {split} labels contain NaN or infinite values.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, label={self.label!r})"
