"""Binned AUROC (metrics/binned.py): a hand-computed case, the stated error bound against the exact AUROC on many
random inputs (float32 and float64 scores), equality with torchmetrics' trapezoidal ROC on the bin edges, and
exact merging of states (as DDP's reduction does)."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import BinaryAUROC

from mtl_experiments.errors import ConfigError
from mtl_experiments.metrics.binned import BinnedAUROC
from mtl_experiments.tasks import build_tasks


def test_hand_computed_case():
    # bins of width 1/2: scores 0.1, 0.35, 0.4 in bin 0, 0.8 in bin 1; P = [1, 1], N = [2, 0]
    # AUROC_2 = (1·(0 + ½·2) + 1·(2 + 0)) / (2·2) = 3/4; the exact AUROC: 0.35 > 0.1, 0.35 < 0.4, 0.8 > both: 3/4
    # max_error = ½ · (1·2 + 1·0) / 4 = 1/4
    metric = BinnedAUROC(bins=2)
    metric.update(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert metric.compute().item() == pytest.approx(0.75, abs=1e-15)
    assert metric.max_error().item() == pytest.approx(0.25, abs=1e-15)


def exact_auroc(preds: torch.Tensor, target: torch.Tensor) -> float:
    """The defining probability over every (positive, negative) pair, ties ½, in float64."""
    pos, neg = preds[target == 1].double(), preds[target == 0].double()
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_within_the_stated_error_of_the_exact_value(dtype):
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 400, (1,), generator=g))
        target = torch.randint(0, 2, (n,), generator=g)
        target[0], target[1] = 0, 1
        # scores related to the label, some tied (rounded), some outside (0, 1) inside the clamp
        preds = torch.sigmoid(torch.randn(n, generator=g) + float(torch.rand(1, generator=g) * 3) * target)
        if seed % 3 == 0:
            preds = (preds * 20).round() / 20
        preds = preds.to(dtype)
        bins = int(torch.randint(2, 3000, (1,), generator=g))
        metric = BinnedAUROC(bins=bins)
        metric.update(preds, target)
        exact = exact_auroc(preds, target)
        assert abs(metric.compute().item() - exact) <= metric.max_error().item() + 1e-12, (seed, bins)


def test_equals_the_trapezoidal_roc_on_the_bin_edges_and_merges_exactly():
    g = torch.Generator().manual_seed(0)
    preds, target = torch.rand(5000, generator=g, dtype=torch.float64), torch.randint(0, 2, (5000,), generator=g)
    whole, halves = BinnedAUROC(bins=100), [BinnedAUROC(bins=100), BinnedAUROC(bins=100)]
    whole.update(preds, target)
    halves[0].update(preds[:1234], target[:1234])
    halves[1].update(preds[1234:], target[1234:])
    halves[0].merge_state(halves[1])  # what the DDP reduction (a sum of the counts) does
    assert halves[0].compute().item() == whole.compute().item()
    trapezoid = BinaryAUROC(thresholds=101)(preds, target).item()
    assert whole.compute().item() == pytest.approx(trapezoid, abs=1e-6)
    # with 10,000 bins on spread scores the bound is small, and the estimate within it
    fine = BinnedAUROC(bins=10_000)
    fine.update(preds, target)
    assert fine.max_error().item() < 1e-3
    assert abs(fine.compute().item() - exact_auroc(preds, target)) <= fine.max_error().item()


def test_binary_task_uses_it_when_asked_and_checks_the_bins():
    task = build_tasks({"click": {"kind": "binary"}})["click"]
    assert type(task.metrics()["auroc"]) is BinaryAUROC
    task.auroc_bins = 64
    assert isinstance(task.metrics()["auroc"], BinnedAUROC)
    with pytest.raises(ConfigError, match="data.auroc_bins must be"):
        BinnedAUROC(bins=1)
