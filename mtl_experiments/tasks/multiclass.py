"""Multiclass classification (genre, category of the next item, ...): C logits, softmax cross-entropy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mtl_experiments import checks
from mtl_experiments.data.spec import LabelType
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.metrics.task import MulticlassLogLoss
from mtl_experiments.tasks.base import Task, check_integer_labels


class MulticlassTask(Task):
    """Labels are class ids in ``[0, num_classes)``; loss softmax cross-entropy; prediction class probabilities.

    ``num_classes``: None infers it in ``setup()`` as (largest training label) + 1.
    Metrics: ``accuracy`` (share of rows whose argmax is the label), ``top{k}_accuracy`` (label among the
    ``top_k`` most probable classes; not logged for top_k 1 or null, where it is ``accuracy``) and ``logloss``
    (mean -log p_label, clamped). With top_k >= num_classes the top-k list is clamped to all C classes, so the
    value is 1 by definition; the name stays ``top{k}_accuracy`` so that metric keys do not depend on the data
    (the pipeline checks ``optimized_metric`` before loading it). Before ``setup()`` with ``num_classes=None``,
    ``metrics()`` serves names and directions only.
    """

    kind = "multiclass"
    loss_type = "classification"
    label_type = LabelType.CLASS  # serving shows the most likely class; it has no per-item score to fuse

    def __init__(
        self,
        name: str,
        label: str | None = None,
        observed_if: str | None = None,
        num_classes: int | None = None,
        top_k: int | None = 5,
    ):
        super().__init__(name, label, observed_if)
        key = f"data.tasks.{name}"
        hint = "null: inferred from the labels; use kind: binary for two-way yes/no"
        self.num_classes = checks.optional(checks.integer, f"{key}.num_classes", num_classes, low=2, hint=hint)
        self.top_k = checks.optional(checks.positive_int, f"{key}.top_k", top_k, hint="null: no top-k accuracy")

    @property
    def output_dim(self) -> int:  # type: ignore[override]
        return self._classes("build its head")

    def _classes(self, purpose: str) -> int:
        if self.num_classes is None:
            raise ConfigError(
                f"Task '{self.name}' (multiclass) does not know its number of classes yet, so it cannot {purpose}: "
                f"set data.tasks.{self.name}.num_classes, or let the datamodule's setup() infer it from the labels."
            )
        return self.num_classes

    def setup(self, train_target: Tensor, items=None) -> None:
        if self.num_classes is None:
            check_integer_labels(self, train_target, "train", 0, None, "class ids start at 0.")
            if train_target.numel() == 0:
                raise DataError(f"Task '{self.name}': no training labels to infer num_classes from; set num_classes.")
            self.num_classes = max(int(train_target.max().item()) + 1, 2)

    def fit_classes(self, count: int, names: Sequence[str] | None = None) -> None:
        """Adopt the ``count`` classes a dataset found over every split, or check ``num_classes`` covers them."""
        if self.num_classes is None:
            self.num_classes = count
        elif self.num_classes < count:
            raise DataError(
                f"Task {self.name!r} has num_classes={self.num_classes}, but its label column {self.label!r} has "
                f"{count} classes" + (f" {list(names)[:20]}" if names else f" (0..{count - 1})") + "; raise "
                f"data.tasks.{self.name}.num_classes or leave it null to count them."
            )

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target.long())

    def predict(self, output: Tensor) -> Tensor:
        # float64 keeps small probabilities representable, so log loss stays exact
        return torch.softmax(output.double(), dim=-1)

    def item_scores(self, output: Tensor) -> Tensor:
        """The most likely class of each row (shown when serving, never fused)."""
        return self.predict(output).argmax(-1)

    def metrics(self) -> MetricCollection:
        # before setup() the class count is a stand-in: the collection then only serves names and directions
        c = self.num_classes or max(2, self.top_k or 1)
        metrics = {"accuracy": MulticlassAccuracy(num_classes=c, average="micro")}
        if self.top_k is not None and self.top_k > 1:
            k = min(self.top_k, c)
            metrics[f"top{self.top_k}_accuracy"] = MulticlassAccuracy(num_classes=c, top_k=k, average="micro")
        metrics["logloss"] = MulticlassLogLoss()
        # no compute groups: top-1 and top-k accuracy hold equal states after a first batch the model gets right,
        # and torchmetrics would then merge them for good
        return MetricCollection(metrics, compute_groups=False)

    def update_metrics(
        self, metrics: MetricCollection, output: Tensor, target: Tensor, context: Mapping[str, Tensor] | None = None
    ) -> None:
        metrics.update(self.predict(output.detach()), target.long())

    def validate_labels(self, labels: Tensor, split: str) -> None:
        fix = (
            f"set data.tasks.{self.name}.num_classes to cover every class (ids 0 .. num_classes-1)."
            if self.num_classes is not None
            else "class ids start at 0."
        )
        check_integer_labels(self, labels, split, 0, self.num_classes, fix)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, num_classes={self.num_classes}, top_k={self.top_k})"
