"""What every task kind provides: head, loss, prediction, metrics, label checks, and the hooks the datamodule
and the module call (``setup``, ``valid``, ``group_by``, ``observed_if``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mtl_experiments.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mtl_experiments.data.base import ItemInfo


class Task:
    """One prediction task. Subclasses set ``kind``, ``loss_type`` and ``output_dim``.

    ``loss_type`` ("classification" or "regression") is what likelihood-based weightings such as
    uncertainty weighting need to know about a task; they never look at ``kind`` itself.

    ``observed_if``: the name of a *binary* task of the same config; rows where its label is 0 carry no label
    for this task (a like is only observed after a click). Only stored here; the module checks it names a
    binary task and masks those rows out of loss and metrics.
    ``group_by``: set by the datamodule ("user_id") when batches carry user ids; binary tasks then add
    grouped AUC. It must be set before ``metrics()`` is called for the collections the module updates.
    """

    kind: ClassVar[str]
    loss_type: ClassVar[str]
    output_dim: int = 1
    group_by: str | None = None

    def __init__(self, name: str, label: str | None = None, observed_if: str | None = None):
        self.name = name
        self.label = label or name  # the data column this task reads; datasets may ignore it
        if observed_if is not None and (not isinstance(observed_if, str) or not observed_if.isidentifier()):
            raise ConfigError(
                f"Task '{name}': observed_if must be the name of a binary task of the same config, got {observed_if!r}."
            )
        if observed_if == name:
            raise ConfigError(f"Task '{name}': observed_if names the task itself; name another (binary) task.")
        self.observed_if = observed_if

    def setup(self, train_target: Tensor, items: ItemInfo | None) -> None:
        """Learn what the head and metrics need from the training labels (and the item catalogue) before the
        model is built; called by the datamodule before ``validate_labels``. Default: nothing to learn."""

    def set_train_interactions(self, user_id: Tensor, item_id: Tensor) -> None:
        """The training split's (user, item) pairs, given by the datamodule after ``setup`` when batches carry both
        ids (retrieval's ``exclude: train`` drops them from each user's ranking). Default: not needed."""

    def head(self, in_dim: int) -> nn.Module:
        """Maps the backbone's representation for this task to the raw output (logits or values)."""
        return nn.Linear(in_dim, self.output_dim)

    def valid(self, target: Tensor) -> Tensor | None:
        """Bool[B] of the rows that carry a label for this task; None: every row does."""
        return None

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, output: Tensor) -> Tensor:
        """What a user consumes: probabilities for classification, values for regression."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        raise NotImplementedError

    def update_metrics(
        self, metrics: MetricCollection, output: Tensor, target: Tensor, context: Mapping[str, Tensor] | None = None
    ) -> None:
        """``context``: ``{"user_id": Long[B], "item_id": Long[B]}`` for the same rows, when the batch has them."""
        metrics.update(self.predict(output.detach()), target)

    def validate_labels(self, labels: Tensor, split: str) -> None:
        if not torch.isfinite(labels.float()).all():
            raise DataError(f"Task '{self.name}': {split} labels contain NaN or infinite values.")

    def __repr__(self) -> str:
        extra = f", observed_if={self.observed_if!r}" if self.observed_if else ""
        return f"{type(self).__name__}(name={self.name!r}, label={self.label!r}{extra})"


def check_integer_labels(task: Task, labels: Tensor, split: str, low: int, high: int | None, fix: str) -> None:
    """DataError unless every label is a finite integer in ``[low, high)`` (``high`` None: no upper bound)."""
    task_name, kind = task.name, task.kind
    x = labels.double() if labels.is_floating_point() else labels
    if labels.is_floating_point():
        if not torch.isfinite(x).all():
            raise DataError(f"Task '{task_name}': {split} labels contain NaN or infinite values.")
        bad = x != x.round()
        if bad.any():
            raise DataError(
                f"Task '{task_name}' is {kind} but its {split} labels contain {int(bad.sum())} non-integer value(s) "
                f"(e.g. {x[bad][0].item()}); {kind} labels are integer ids."
            )
    bad = x < low if high is None else (x < low) | (x >= high)
    if bad.any():
        where = f">= {low}" if high is None else f"in [{low}, {high})"
        raise DataError(
            f"Task '{task_name}' ({kind}): {int(bad.sum())} {split} label(s) are not {where} "
            f"(e.g. {x[bad][0].item():g}); {fix}"
        )
