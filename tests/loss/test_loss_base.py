"""Loss weighting contract, parametrized over every conf/loss/*.yaml, plus hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.base import GradientAggregation, Weighting, effective_weights
from mtl_experiments.tasks import build_tasks
from tests.conftest import CONF, load_weighting, options

TASKS = build_tasks({"ctr": {"kind": "binary"}, "cvr": {"kind": "binary"}, "watch": {"kind": "regression"}})


def weighting(name: str, **overrides) -> Weighting:
    return load_weighting(name, TASKS, **overrides)


def toy_problem():
    """Three losses that share the parameter ``theta``."""
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    losses = torch.stack([(theta**2).sum(), (theta - 1).abs().sum(), (theta * 3).sin().sum() + 2])
    return theta, losses


@pytest.mark.parametrize("name", options("loss"))
def test_yaml_points_at_the_file_of_the_same_name(name):
    target = OmegaConf.load(CONF / "loss" / f"{name}.yaml")._target_
    # our own methods live in loss/<name>.py; TorchJD's aggregators come through its one adapter file
    assert target.startswith((f"mtl_experiments.loss.{name}.", "mtl_experiments.loss.torchjd."))


@pytest.mark.parametrize("name", options("loss"))
def test_contract_one_backward_and_weights_per_task(name):
    w = weighting(name)
    theta, losses = toy_problem()
    calls = []

    def backward_fn(total):
        calls.append(total)
        total.backward()

    grads = task_gradients(losses, [theta]) if w.needs_task_grads else None
    weights = w.backward(losses, grads, [theta], backward_fn)
    assert len(calls) == 1, "exactly one real backward per step"
    assert weights.shape == (3,) and torch.isfinite(weights).all() and not weights.requires_grad
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


def test_equal_is_the_sum_of_losses():
    theta, losses = toy_problem()
    total, weights = weighting("equal")(losses)
    assert torch.equal(weights, torch.ones(3))
    assert total.item() == pytest.approx(losses.sum().item())


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


class MeanAggregation(GradientAggregation):
    """The simplest aggregator, to test the base class: the mean of the task gradients."""

    def aggregate(self, grads):
        return grads.mean(0), torch.full((grads.shape[0],), 1.0 / grads.shape[0])


def test_gradient_aggregation_writes_the_update_into_shared_grads_only():
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 2)
    heads = torch.nn.ModuleList([torch.nn.Linear(2, 1) for _ in range(2)])
    x = torch.randn(5, 3)
    h = shared(x)
    losses = torch.stack([heads[t](h).square().mean() for t in range(2)])
    params = list(shared.parameters())
    g = task_gradients(losses, params)
    agg = MeanAggregation()
    agg.setup({"a": None, "b": None})
    weights = agg.backward(losses, g, params, lambda total: total.backward())
    assert weights.tolist() == [0.5, 0.5]
    flat = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(flat, g.mean(0))
    # each head gets its own task's gradient, untouched by the aggregation
    h2 = shared(x)
    expected = torch.autograd.grad(heads[1](h2).square().mean(), heads[1].weight)[0]
    assert torch.allclose(heads[1].weight.grad, expected)


def test_gradient_aggregation_without_shared_parameters_is_the_sum():
    theta, losses = toy_problem()
    weights = MeanAggregation().backward(losses, None, [], lambda total: total.backward())
    assert weights.tolist() == [1.0, 1.0, 1.0]
    theta2, losses2 = toy_problem()
    assert torch.allclose(theta.grad, torch.autograd.grad(losses2.sum(), theta2)[0])


def test_effective_weights_recover_a_weighted_sum():
    g = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    w = torch.tensor([0.3, 1.7], dtype=torch.float64)
    assert torch.allclose(effective_weights(g, w @ g), w)
