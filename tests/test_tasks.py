"""Task kinds: head, loss, prediction, metrics (hand-computed), label checks, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.metrics.task import BinaryLogLoss
from mtl_experiments.tasks import available_kinds, build_task, build_tasks


@pytest.mark.parametrize("kind", available_kinds())
def test_every_kind_gives_head_loss_prediction_and_metrics(kind):
    task = build_task("t", {"kind": kind})
    head = task.head(16)
    out = head(torch.randn(32, 16))
    assert out.shape == (32, task.output_dim)
    target = torch.randint(0, 2, (32,)).float()
    loss = task.loss(out, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert head.weight.grad is not None
    metrics = task.metrics()
    task.update_metrics(metrics, out, target)
    values = metrics.compute()
    assert values and all(torch.isfinite(v) for v in values.values())
    assert all(m.higher_is_better is not None for m in metrics.values())  # model selection needs a direction
    assert task.loss_type in ("classification", "regression")


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
    with pytest.raises(ConfigError, match=r"valid kinds are \['binary', 'regression'"):
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
