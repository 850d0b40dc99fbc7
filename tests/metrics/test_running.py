"""The one running-mean metric base (metrics/running.py): sum / count, shaped sums, DDP-style merging, and every
mean-type metric of the package built on it."""

from __future__ import annotations

import pytest
import torch

from mtl_experiments.metrics import conflict, ranking, task
from mtl_experiments.metrics.running import MeanOfValues, RunningMean


def test_running_mean_of_shaped_values_and_counts():
    m = RunningMean((2,))
    m.add(torch.tensor([1.0, 2.0]))  # one value
    m.add(torch.tensor([3.0, 6.0]), count=3)  # the sum of three
    assert m.compute().tolist() == [1.0, 2.0]  # [4 / 4, 8 / 4]
    assert m.sum.dtype == torch.float64 and m.count.dtype == torch.long and int(m.count) == 4


def test_states_reduce_by_summation_as_under_ddp():
    ranks = [RunningMean(), RunningMean()]
    ranks[0].add(torch.tensor(3.0), count=2)
    ranks[1].add(torch.tensor(7.0), count=3)
    ranks[0].merge_state(ranks[1])  # what the all-reduce of both states does
    assert ranks[0].compute().item() == pytest.approx(10.0 / 5)


def test_mean_of_values_counts_every_value():
    class Square(MeanOfValues):
        def value(self, x):
            return x.double() ** 2

    m = Square()
    m.update(torch.tensor([1.0, 2.0]))
    m.update(torch.tensor([[3.0]]))
    assert m.compute().item() == pytest.approx((1 + 4 + 9) / 3) and int(m.count) == 3
    assert m(torch.tensor([2.0])).item() == 4.0  # forward: this batch's value, the states accumulate
    assert int(m.count) == 4


@pytest.mark.parametrize(
    "cls",
    [
        task.BinaryLogLoss,
        task.MulticlassLogLoss,
        ranking.NDCG,
        ranking.HitRate,
        ranking.MRR,
        ranking.Diversity,
        ranking.Novelty,
        conflict.PairwiseCosine,
        conflict.GateEntropy,
        conflict.TaskAffinity,
    ],
)
def test_every_mean_metric_is_a_running_mean(cls):
    assert issubclass(cls, RunningMean)
