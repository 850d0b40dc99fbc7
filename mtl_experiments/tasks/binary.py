"""Binary classification (CTR, CVR, like, ...): one logit, BCE-with-logits loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from mtl_experiments.data.spec import LabelType
from mtl_experiments.errors import DataError
from mtl_experiments.metrics.binned import BinnedAUROC
from mtl_experiments.metrics.grouped import GroupedAUROC
from mtl_experiments.metrics.task import BinaryLogLoss
from mtl_experiments.tasks.base import Task


class BinaryTask(Task):
    """Labels in {0, 1}; metrics ``auroc``, ``logloss``, ``accuracy`` (threshold 0.5) and, when ``group_by`` is set
    (batches carry user ids), ``gauc``: grouped AUC over the ``context[group_by]`` ids (metrics/grouped.py)."""

    kind = "binary"
    loss_type = "classification"
    output_dim = 1
    label_type = LabelType.BINARY
    fusions = fused_by_default = frozenset({"product", "sum"})
    auroc_bins: int | None = None  # set by a datamodule (data=stream's data.auroc_bins): AUROC from bin counts

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(output.squeeze(-1), target.to(output.dtype))

    def predict(self, output: Tensor) -> Tensor:
        # float64 keeps 1 - p representable for confident logits, so log loss stays finite and exact
        return torch.sigmoid(output.squeeze(-1).double())

    def metrics(self) -> MetricCollection:
        auroc = BinaryAUROC() if self.auroc_bins is None else BinnedAUROC(self.auroc_bins)
        metrics = {"auroc": auroc, "logloss": BinaryLogLoss(), "accuracy": BinaryAccuracy()}
        if self.group_by is not None:
            metrics["gauc"] = GroupedAUROC()
        return MetricCollection(metrics)

    def update_metrics(
        self, metrics: MetricCollection, output: Tensor, target: Tensor, context: Mapping[str, Tensor] | None = None
    ) -> None:
        groups = (context or {}).get(self.group_by) if self.group_by is not None else None
        # the collection passes keyword arguments only to the metrics whose update() takes them (gauc)
        metrics.update(self.predict(output.detach()), target.long(), groups=groups)

    def validate_labels(self, labels: Tensor, split: str) -> None:
        super().validate_labels(labels, split)
        bad = ~((labels == 0) | (labels == 1))
        if bad.any():
            raise DataError(
                f"Task '{self.name}' is binary but its {split} labels contain "
                f"{int(bad.sum())} value(s) other than 0/1 (e.g. {labels[bad][0].item()}); "
                "binarise the label column or use kind: regression."
            )
