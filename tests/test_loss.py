"""Loss weighting contract, parametrized over every conf/loss/*.yaml, plus hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.base import Weighting
from mtl_experiments.tasks import build_tasks
from tests.conftest import CONF, options

TASKS = build_tasks({"ctr": {"kind": "binary"}, "cvr": {"kind": "binary"}, "watch": {"kind": "regression"}})


def weighting(name: str, **overrides) -> Weighting:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "loss" / f"{name}.yaml"), overrides)
    w = instantiate(cfg, _convert_="all")
    w.setup(TASKS)
    return w


def toy_problem():
    """Three losses that share the parameter ``theta``."""
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    losses = torch.stack([(theta**2).sum(), (theta - 1).abs().sum(), (theta * 3).sin().sum() + 2])
    return theta, losses


@pytest.mark.parametrize("name", options("loss"))
def test_yaml_points_at_the_file_of_the_same_name(name):
    target = OmegaConf.load(CONF / "loss" / f"{name}.yaml")._target_
    assert target.startswith(f"mtl_experiments.loss.{name}.")


@pytest.mark.parametrize("name", options("loss"))
def test_contract_one_backward_and_weights_per_task(name):
    w = weighting(name)
    theta, losses = toy_problem()
    calls = []

    def backward_fn(total):
        calls.append(total)
        total.backward()

    grads = None
    if w.needs_task_grads:
        from mtl_experiments.grads import task_gradients

        grads = task_gradients(losses, [theta])
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
