"""Equal weighting: the plain sum of the task losses."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.loss.helpers import CTR_CVR_WATCH, method, toy_problem

weighting = functools.partial(method, tasks=CTR_CVR_WATCH)


def test_equal_is_the_sum_of_losses():
    theta, losses = toy_problem()
    total, weights = weighting("equal")(losses)
    assert torch.equal(weights, torch.ones(3))
    assert total.item() == pytest.approx(losses.sum().item())
