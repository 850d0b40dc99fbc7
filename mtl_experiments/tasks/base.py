"""What every task kind provides: head, loss, prediction, metrics, label checks, and the hooks the datamodule,
the module and serving call (``label_type``, ``encode_labels``, ``setup``, ``valid``, ``group_by``,
``observed_if``, ``pointwise``, ``item_scores``, ``catalogue_scores``, ``fusions``), so no other module needs to
know a kind by name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from mtl_experiments import checks
from mtl_experiments.data.spec import ItemInfo, LabelType, as_labels
from mtl_experiments.errors import DataError


class Task:
    """One prediction task. Subclasses set ``kind``, ``loss_type`` and ``output_dim``.

    ``loss_type`` ("classification" or "regression") is what likelihood-based weightings such as
    uncertainty weighting need to know about a task; they never look at ``kind`` itself. ``label_type``
    (data/spec.py's ``LabelType``) is what datasets need to know: how to read and store the label column.

    ``observed_if``: the name of a *binary* task of the same config; rows where its label is 0 carry no label
    for this task (a like is only observed after a click). Only stored here; the module checks it names a
    binary task and masks those rows out of loss and metrics.
    ``group_by``: set by the datamodule ("user_id") when batches carry user ids; binary tasks then add
    grouped AUC. It must be set before ``metrics()`` is called for the collections the module updates.
    """

    kind: ClassVar[str]
    loss_type: ClassVar[str]
    label_type: ClassVar[LabelType]
    output_dim: int = 1
    group_by: str | None = None
    # serving (recommend.py): a pointwise task scores one (user, item) row at a time (``item_scores``), otherwise
    # it scores the whole catalogue from one query (``catalogue_scores``); ``fusions``: the fusions of task scores
    # it may enter, ``fused_by_default``: those it enters with weight 1 when no weights are given
    pointwise: ClassVar[bool] = True
    fusions: ClassVar[frozenset[str]] = frozenset()
    fused_by_default: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, label: str | None = None, observed_if: str | None = None):
        self.name = name
        self.label = label or name  # the data column this task reads; datasets may ignore it
        if observed_if is not None and (
            not isinstance(observed_if, str) or not observed_if.isidentifier() or observed_if == name
        ):
            checks.fail(f"data.tasks.{name}.observed_if", "the name of another binary task of the same config",
                        observed_if)  # fmt: skip
        self.observed_if = observed_if

    def encode_labels(self, values: np.ndarray | Tensor) -> Tensor:
        """A dataset's label column as the tensor this task trains on (``label_type``'s dtype)."""
        return as_labels(values, self.label_type)

    def fit_classes(self, count: int, names: Sequence[str] | None = None) -> None:
        """``label_type`` CLASS: a dataset that read the label column over every split found ``count`` classes
        (``names``: their names, when the column holds text). Default: nothing to fit."""

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

    def item_scores(self, output: Tensor) -> Tensor:
        """Serving a pointwise task: one score per row (the row's item), ``Tensor[B]``. Default: ``predict``."""
        return self.predict(output)

    def catalogue_scores(self, output: Tensor) -> Tensor:
        """Serving a task that is not ``pointwise``: a probability per catalogue item for each query row,
        ``Tensor[B, I]`` (column j = item j + 1)."""
        raise NotImplementedError(f"Task '{self.name}' ({self.kind}) scores one row per item: use item_scores().")

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
