"""Regression (watch time, rating, ...): one output, mean squared error loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from mtl_experiments.data.spec import LabelType
from mtl_experiments.tasks.base import Task


class RegressionTask(Task):
    """Real-valued labels; metrics MSE and MAE."""

    kind = "regression"
    loss_type = "regression"
    output_dim = 1
    label_type = LabelType.REAL
    fusions = fused_by_default = frozenset({"sum"})  # values, not probabilities: summed, never multiplied

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output.squeeze(-1), target.to(output.dtype))

    def predict(self, output: Tensor) -> Tensor:
        return output.squeeze(-1)

    def metrics(self) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()})
