"""Multiclass task: softmax cross-entropy, class probabilities, accuracy / top-k accuracy / log loss by hand,
class-count inference, label checks and option errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.tasks import build_task

LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.0, -1.0],  # label 0: top-1 right
        [0.0, 3.0, 1.0, 0.5],  # label 2: second -> top-2 right
        [1.0, 0.0, 0.5, 2.0],  # label 1: last -> wrong
        [0.0, 0.0, 0.0, 0.0],  # label 3: all tied
    ]
)
LABELS = torch.tensor([0, 2, 1, 3])


def softmax(row):
    z = [math.exp(v) for v in row]
    return [v / sum(z) for v in z]


def test_loss_and_prediction_by_hand():
    task = build_task("genre", {"kind": "multiclass", "num_classes": 4})
    nll = [-math.log(softmax(r)[y]) for r, y in zip(LOGITS.tolist(), LABELS.tolist(), strict=True)]
    assert task.loss(LOGITS, LABELS).item() == pytest.approx(sum(nll) / 4, rel=1e-6)
    probs = task.predict(LOGITS)
    assert probs.shape == (4, 4) and probs.sum(1).tolist() == pytest.approx([1.0] * 4)
    assert probs[1].tolist() == pytest.approx(softmax(LOGITS[1].tolist()))
    assert task.head(8)(torch.randn(5, 8)).shape == (5, 4) and task.output_dim == 4


def test_metrics_by_hand():
    task = build_task("genre", {"kind": "multiclass", "num_classes": 4, "top_k": 2})
    metrics = task.metrics()
    assert sorted(metrics) == ["accuracy", "logloss", "top2_accuracy"]
    task.update_metrics(metrics, LOGITS[:3], LABELS[:3])
    v = metrics.compute()
    assert v["accuracy"].item() == pytest.approx(1 / 3)
    assert v["top2_accuracy"].item() == pytest.approx(2 / 3)
    nll = [-math.log(softmax(r)[y]) for r, y in zip(LOGITS[:3].tolist(), LABELS[:3].tolist(), strict=True)]
    assert v["logloss"].item() == pytest.approx(sum(nll) / 3, rel=1e-9)


def test_top1_and_topk_accuracy_stay_separate_after_an_all_correct_first_batch():
    """torchmetrics' compute groups would merge two accuracies whose states agree after the first batch."""
    task = build_task("genre", {"kind": "multiclass", "num_classes": 4, "top_k": 2})
    metrics = task.metrics()
    task.update_metrics(metrics, LOGITS[:1], LABELS[:1])  # right at top-1 and top-2: equal states
    task.update_metrics(metrics, LOGITS[1:2], LABELS[1:2])  # right at top-2 only
    v = metrics.compute()
    assert (v["accuracy"].item(), v["top2_accuracy"].item()) == (0.5, 1.0)


def test_logloss_is_finite_for_a_confident_mistake():
    task = build_task("genre", {"kind": "multiclass", "num_classes": 3})
    metrics = task.metrics()
    task.update_metrics(metrics, torch.tensor([[1000.0, 0.0, 0.0]]), torch.tensor([2]))
    assert metrics.compute()["logloss"].item() == pytest.approx(-math.log(1e-15))


def test_top_k_naming():
    names = lambda **kw: sorted(build_task("g", {"kind": "multiclass", "num_classes": 4, **kw}).metrics())  # noqa: E731
    assert names() == ["accuracy", "logloss", "top5_accuracy"]  # default top_k 5: clamped to the 4 classes
    assert names(top_k=1) == names(top_k=None) == ["accuracy", "logloss"]
    task = build_task("g", {"kind": "multiclass", "num_classes": 4, "top_k": 5})
    metrics = task.metrics()
    task.update_metrics(metrics, LOGITS, LABELS)
    assert metrics.compute()["top5_accuracy"].item() == 1.0  # every class is in a list of all 4


def test_num_classes_is_inferred_from_training_labels():
    task = build_task("g", {"kind": "multiclass"})
    with pytest.raises(ConfigError, match="num_classes"):
        task.head(8)
    task.setup(torch.tensor([0, 4, 2]), None)
    assert task.num_classes == 5 and task.head(8).out_features == 5
    with pytest.raises(DataError, match=r"not in \[0, 5\).*num_classes"):
        task.validate_labels(torch.tensor([1, 5]), "val")
    fixed = build_task("g", {"kind": "multiclass", "num_classes": 7})
    fixed.setup(torch.tensor([0, 1]), None)
    assert fixed.num_classes == 7


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.tensor([0.0, 1.5]), "non-integer"),
        (torch.tensor([-1, 2]), r"not in \[0, 3\)"),
        (torch.tensor([0, 3]), r"not in \[0, 3\)"),
        (torch.tensor([0.0, float("nan")]), "NaN"),
    ],
)
def test_labels_must_be_class_ids(labels, match):
    task = build_task("g", {"kind": "multiclass", "num_classes": 3})
    with pytest.raises(DataError, match=match):
        task.validate_labels(labels, "train")


def test_inference_rejects_bad_training_labels():
    with pytest.raises(DataError, match="non-integer"):
        build_task("g", {"kind": "multiclass"}).setup(torch.tensor([0.5, 1.0]), None)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
        ({"num_classes": "3"}, "num_classes must be an integer >= 2, got '3'"),
        ({"top_k": 0}, "top_k must be"),
        ({"top_k": True}, "top_k must be"),
        ({"classes": 3}, "invalid option"),
    ],
)
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        build_task("g", {"kind": "multiclass", **options})
