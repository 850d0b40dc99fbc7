"""GLS (Chennupati et al. 2019) against hand-computed cases."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mtl_experiments.errors import NonFiniteLossError
from tests.loss.helpers import CTR_CVR_WATCH, method

weighting = functools.partial(method, tasks=CTR_CVR_WATCH)


def test_gls_total_and_weights_by_hand():
    losses = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    total, weights = weighting("gls")(losses)
    assert total.item() == pytest.approx(2.0, abs=1e-12)  # (1 * 4 * 2)^(1/3)
    # total / (T * L_t) = 2/3, 2/12, 2/6
    assert weights.tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 3], abs=1e-12)
    assert not weights.requires_grad


def test_gls_gradient_is_the_weighted_sum_of_task_gradients():
    def problem():
        torch.manual_seed(0)
        theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
        losses = torch.stack([(theta**2).sum(), (theta - 1).abs().sum(), (theta * 3).sin().sum() + 6])
        return theta, losses

    theta, losses = problem()
    weights = weighting("gls").backward(losses, None, [theta], lambda total: total.backward())
    # the weights by the product formula (not the log-space code): (Π L)^(1/T) / (T·L_t)
    values = [v.item() for v in losses]
    geo = math.prod(values) ** (1 / 3)
    expected_w = [geo / (3 * v) for v in values]
    assert weights.tolist() == pytest.approx(expected_w, rel=1e-12)
    theta2, losses2 = problem()
    task_grads = [torch.autograd.grad(loss, theta2, retain_graph=True)[0] for loss in losses2]
    expected = sum(w * g for w, g in zip(expected_w, task_grads, strict=True))
    assert torch.allclose(theta.grad, expected, rtol=1e-10, atol=1e-12)


def test_gls_is_computed_in_log_space():
    # the float32 product of 20 losses of 1e-30 underflows to 0; their geometric mean is 1e-30
    losses = torch.full((20,), 1e-30)
    assert torch.prod(losses).item() == 0.0
    gls = weighting("gls")
    total, weights = gls(losses)
    assert total.item() == pytest.approx(1e-30, rel=1e-4)
    assert weights.tolist() == pytest.approx([1 / 20] * 20, rel=1e-4)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_gls_rejects_a_loss_that_is_not_positive(bad):
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \{'cvr': " + str(bad) + r"\} have a loss <= 0"):
        weighting("gls")(torch.tensor([1.0, bad, 2.0]))
