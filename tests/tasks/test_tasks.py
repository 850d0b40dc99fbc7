"""Task kinds: head, loss, prediction, metrics (hand-computed), label checks, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.metrics.grouped import GroupedAUROC, grouped_auroc
from mtl_experiments.metrics.task import BinaryLogLoss
from mtl_experiments.tasks import Task, available_kinds, build_task, build_tasks

# labels each kind reads (a new kind adds its own here)
TARGETS = {
    "binary": lambda g: torch.randint(0, 2, (32,), generator=g).float(),
    "regression": lambda g: torch.randn(32, generator=g),
    "multiclass": lambda g: torch.randint(0, 4, (32,), generator=g),
    "retrieval": lambda g: torch.randint(1, 21, (32,), generator=g),
}


@pytest.mark.parametrize("kind", available_kinds())
def test_every_kind_gives_head_loss_prediction_and_metrics(kind):
    task = build_task("t", {"kind": kind})
    target = TARGETS[kind](torch.Generator().manual_seed(0))
    task.setup(target, None)
    task.validate_labels(target, "train")
    head = task.head(16)
    out = head(torch.randn(32, 16))
    assert out.shape == (32, task.output_dim)
    loss = task.loss(out, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    metrics = task.metrics()
    task.update_metrics(metrics, out, target, {"user_id": torch.arange(32) % 4, "item_id": torch.arange(32)})
    values = metrics.compute()
    assert values and all(torch.isfinite(v) for v in values.values())
    assert all(m.higher_is_better is not None for m in metrics.values())  # model selection needs a direction
    assert task.loss_type in ("classification", "regression")
    valid = task.valid(target)
    assert valid is None or (valid.dtype == torch.bool and valid.shape == target.shape)


@pytest.mark.parametrize("kind", available_kinds())
def test_metric_names_are_known_before_setup(kind):
    """The pipeline resolves optimized_metric before loading data: names must not need the data."""
    task = build_task("t", {"kind": kind})
    names = list(task.metrics())
    target = TARGETS[kind](torch.Generator().manual_seed(0))
    task.setup(target, None)
    assert list(task.metrics()) == names


def test_task_keeps_positional_name_and_label():
    task = build_task("like", {"kind": "binary", "label": "liked", "observed_if": "click"})
    assert (task.name, task.label, task.observed_if, task.group_by) == ("like", "liked", "click", None)
    assert "observed_if='click'" in repr(task)
    assert Task("a", "b").label == "b" and Task("a").observed_if is None


@pytest.mark.parametrize("value", ["like", "", 3, "a b"])
def test_observed_if_must_name_another_task(value):
    with pytest.raises(ConfigError, match="observed_if"):
        build_task("like", {"kind": "binary", "observed_if": value})


def test_binary_loss_and_metrics_by_hand():
    task = build_task("ctr", {"kind": "binary"})
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = [1 / (1 + math.exp(-z)) for z in (2.0, -1.0, 0.5, -3.0)]
    bce = -sum(t * math.log(q) + (1 - t) * math.log(1 - q) for t, q in zip(y.tolist(), p, strict=True)) / 4
    assert task.loss(logits, y).item() == pytest.approx(bce, rel=1e-6)
    metrics = task.metrics()
    task.update_metrics(metrics, logits, y)
    v = metrics.compute()
    assert v["logloss"].item() == pytest.approx(bce, rel=1e-9)
    # positives score 2.0 and -3.0, negatives -1.0 and 0.5: 2 of the 4 pairs ranked right
    assert v["auroc"].item() == pytest.approx(0.5)
    assert v["accuracy"].item() == pytest.approx(0.5)  # predictions 1, 0, 1, 0
    assert task.predict(logits).tolist() == pytest.approx(p)


@pytest.mark.filterwarnings("ignore:No negative samples")
def test_binary_accuracy_uses_probabilities_even_when_all_logits_lie_in_0_1():
    """torchmetrics would read logits in [0, 1] as probabilities; the task must pass probabilities."""
    task = build_task("ctr", {"kind": "binary"})
    logits = torch.tensor([[0.1], [0.2], [0.3]])  # all p > 0.5 -> every prediction is 1
    metrics = task.metrics()
    task.update_metrics(metrics, logits, torch.tensor([1.0, 1.0, 1.0]))
    assert metrics.compute()["accuracy"].item() == 1.0


def test_logloss_is_finite_for_confident_mistakes():
    m = BinaryLogLoss()
    m.update(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    assert m.compute().item() == pytest.approx(-math.log(1e-15), rel=1e-4)  # 1 - (1 - 1e-15) is inexact


def test_regression_loss_and_metrics_by_hand():
    task = build_task("watch", {"kind": "regression"})
    out = torch.tensor([[1.0], [2.0], [4.0]])
    y = torch.tensor([1.5, 2.0, 1.0])
    assert task.loss(out, y).item() == pytest.approx((0.25 + 0 + 9) / 3)
    metrics = task.metrics()
    task.update_metrics(metrics, out, y)
    v = metrics.compute()
    assert v["mse"].item() == pytest.approx((0.25 + 0 + 9) / 3)
    assert v["mae"].item() == pytest.approx((0.5 + 0 + 3) / 3)


def test_binary_labels_must_be_zero_or_one():
    task = build_task("ctr", {"kind": "binary"})
    with pytest.raises(DataError, match="ctr.*other than 0/1"):
        task.validate_labels(torch.tensor([0.0, 1.0, 2.0]), split="train")


def test_nan_labels_are_rejected():
    task = build_task("w", {"kind": "regression"})
    with pytest.raises(DataError, match="NaN"):
        task.validate_labels(torch.tensor([0.0, float("nan")]), split="val")


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"valid kinds are \['binary', 'multiclass', 'regression', 'retrieval'\]"):
        build_task("t", {"kind": "ranking"})


@pytest.mark.parametrize("name", ["train", "a-b", "1st", "x.y"])
def test_task_names_must_be_usable_as_keys(name):
    with pytest.raises(ConfigError, match="task name"):
        build_tasks({name: {"kind": "binary"}})


def test_tasks_keep_config_order():
    tasks = build_tasks({"b": {"kind": "binary"}, "a": {"kind": "regression"}})
    assert list(tasks) == ["b", "a"]
    with pytest.raises(ConfigError, match="empty"):
        build_tasks({})


# -- grouped AUC ---------------------------------------------------------------------------------------------
def test_grouped_auc_by_hand():
    # user 1: the positive above both negatives -> AUC 1 (3 rows)
    # user 2: positives 0.3, 0.6 vs negatives 0.6, 0.1 -> pairs 0, 1, 1/2 (tie), 1 -> 2.5/4 (4 rows)
    # user 3: positives only -> skipped
    preds = torch.tensor([0.9, 0.2, 0.5, 0.3, 0.6, 0.6, 0.1, 0.4, 0.7])
    target = torch.tensor([1, 0, 0, 1, 0, 1, 0, 1, 1])
    users = torch.tensor([1, 1, 1, 2, 2, 2, 2, 3, 3])
    expected = (3 * 1.0 + 4 * 0.625) / 7
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))  # row order must not matter
    assert grouped_auroc(preds[perm], target[perm], users[perm]).item() == pytest.approx(expected, abs=1e-12)


def test_grouped_auc_matches_a_loop_of_per_user_auroc():
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, 40, (600,), generator=g)
    target = (torch.rand(600, generator=g) < 0.3).long()
    preds = (torch.randint(0, 12, (600,), generator=g).double() / 12 + 0.5 * target).clamp(max=1)  # with ties
    num, den = 0.0, 0
    for u in users.unique():
        rows = users == u
        if 0 < int(target[rows].sum()) < int(rows.sum()):
            num += int(rows.sum()) * binary_auroc(preds[rows], target[rows]).item()
            den += int(rows.sum())
    metric = GroupedAUROC()
    for chunk in torch.arange(600).split(128):  # users spread over batches
        metric.update(preds[chunk], target[chunk], users[chunk])
    assert metric.compute().item() == pytest.approx(num / den, abs=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_grouped_auc_is_nan_without_a_user_with_both_classes():
    metric = GroupedAUROC()
    metric.update(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([0, 1, 1]), torch.tensor([1, 2, 2]))
    assert math.isnan(metric.compute().item())
    assert math.isnan(GroupedAUROC().compute().item())


def test_binary_task_adds_gauc_when_grouped_by_user():
    task = build_task("ctr", {"kind": "binary"})
    assert "gauc" not in task.metrics()
    task.group_by = "user_id"
    metrics = task.metrics()
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0], [1.0], [0.0]])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    # user 7: positive 2.0 above negatives -1.0, 0.5 -> 1; user 8: positives -3.0, 1.0 vs negative 0.0 -> 1/2
    task.update_metrics(metrics, logits, y, {"user_id": torch.tensor([7, 7, 7, 8, 8, 8]), "item_id": torch.arange(6)})
    v = metrics.compute()
    assert v["gauc"].item() == pytest.approx((3 * 1.0 + 3 * 0.5) / 6)
    assert v["auroc"].item() == pytest.approx(binary_auroc(torch.sigmoid(logits.squeeze(1)), y.long()).item())
    # a batch without user ids leaves gauc alone and the other metrics still update
    other = task.metrics()
    task.update_metrics(other, logits, y)
    values = other.compute()
    assert math.isnan(values["gauc"].item()) and values["auroc"].item() == pytest.approx(v["auroc"].item())
