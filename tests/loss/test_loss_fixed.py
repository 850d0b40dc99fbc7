"""Fixed weights per task name: by hand, and the config errors."""

from __future__ import annotations

import functools

import pytest
import torch

from mtl_experiments.errors import ConfigError
from tests.loss.helpers import CTR_CVR_WATCH, method, toy_problem

weighting = functools.partial(method, tasks=CTR_CVR_WATCH)


def test_fixed_by_hand():
    theta, losses = toy_problem()
    w = weighting("fixed", weights={"ctr": 2.0, "watch": 0.5})  # cvr unset -> 1
    total, weights = w(losses)
    assert weights.tolist() == [2.0, 1.0, 0.5]
    assert total.item() == pytest.approx(2 * losses[0].item() + losses[1].item() + 0.5 * losses[2].item())
    w.backward(losses, None, [theta], lambda t: t.backward())
    theta2, losses2 = toy_problem()
    expected = torch.autograd.grad(2 * losses2[0] + losses2[1] + 0.5 * losses2[2], theta2)[0]
    assert torch.allclose(theta.grad, expected)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"ctr": 1.0, "clicks": 1.0}, r"unknown task\(s\) \['clicks'\]; the tasks are \['ctr', 'cvr', 'watch'\]"),
        ({"ctr": -0.5}, r"loss.weights.ctr must be a finite number >= 0"),
        ({"ctr": float("nan")}, r"loss.weights.ctr must be a finite number >= 0"),
        ({"ctr": "high"}, r"loss.weights.ctr must be a finite number >= 0"),
        ({"ctr": 0.0, "cvr": 0.0, "watch": 0.0}, "all zero"),
    ],
)
def test_fixed_rejects_bad_weights(weights, message):
    with pytest.raises(ConfigError, match=message):
        weighting("fixed", weights=weights)
