"""The weighting base classes (loss/base.py): the gradient aggregation written into the shared parameters,
the two gradient sources, effective weights, the run's seed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.base import GradientAggregation, effective_weights
from tests.conftest import compose_cfg
from tests.loss.helpers import F64 as D
from tests.loss.helpers import THREE, ill_conditioned, method, toy_problem
from tests.loss.helpers import method as load


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
    weights = agg.backward(losses, g, params, lambda total, exclude=(): total.backward())
    assert weights.tolist() == [0.5, 0.5]
    flat = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(flat, g.mean(0))
    # each head gets its own task's gradient, untouched by the aggregation
    h2 = shared(x)
    expected = torch.autograd.grad(heads[1](h2).square().mean(), heads[1].weight)[0]
    assert torch.allclose(heads[1].weight.grad, expected)


def test_gradient_aggregation_without_shared_parameters_is_the_sum():
    theta, losses = toy_problem()
    weights = MeanAggregation().backward(losses, None, [], lambda total, exclude=(): total.backward())
    assert weights.tolist() == [1.0, 1.0, 1.0]
    theta2, losses2 = toy_problem()
    assert torch.allclose(theta.grad, torch.autograd.grad(losses2.sum(), theta2)[0])


def test_effective_weights_recover_a_weighted_sum():
    g = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    w = torch.tensor([0.3, 1.7], dtype=torch.float64)
    assert torch.allclose(effective_weights(g, w @ g), w)


METHODS = ["upgrad", "mgda", "imtl", "aligned_mtl"]


@pytest.mark.parametrize("name", METHODS)
def test_yaml_instantiates_with_both_gradient_sources(name):
    for source in ("params", "representation"):
        w = load(name, grad_source=source)
        assert isinstance(w, GradientAggregation) and w.needs_task_grads and w.grad_source == source


@pytest.mark.parametrize("name", METHODS)
def test_unknown_gradient_source_is_a_config_error(name):
    with pytest.raises(ConfigError, match="loss.grad_source"):
        load(name, grad_source="embeddings")


@pytest.mark.parametrize("name", METHODS)
def test_reproducible(name):
    g = ill_conditioned(0, 3, 7).float()
    first, second = load(name).aggregate(g), load(name).aggregate(g)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("name", METHODS)
def test_representation_source_backpropagates_the_weighted_losses(name):
    """MGDA-UB style: weights come from gradients of the shared representation h; backward of Σ w_t L_t."""
    torch.manual_seed(0)
    shared, heads = torch.nn.Linear(3, 4), torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(2)])
    x = torch.randn(8, 3)

    def losses():
        h = shared(x)
        return h, torch.stack([heads[0](h).square().mean(), (heads[1](h) - 3).abs().mean()])

    w = load(name, grad_source="representation")
    h, task_losses = losses()
    weights = w.backward(
        task_losses, task_gradients(task_losses, [h]), list(shared.parameters()), torch.Tensor.backward
    )
    _, again = losses()
    expected = torch.autograd.grad((weights * again).sum(), shared.weight)[0]
    assert torch.allclose(shared.weight.grad, expected)


@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "gradvac"])
def test_randomised_methods_take_the_runs_seed(name):
    cfg = compose_cfg([f"loss={name}", "seed=7"])
    GlobalHydra.instance().clear()
    assert instantiate(cfg.loss, _convert_="all").seed == 7


@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "gradvac", "cagrad", "nash_mtl"])
@pytest.mark.parametrize("grad_source", ["params", "representation"])
def test_backward_writes_the_update_into_the_shared_parameters(name, grad_source):
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 4).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1).double() for _ in range(3)])
    x = torch.randn(6, 3, dtype=D)
    rep = torch.relu(shared(x))
    losses = torch.stack([heads[i](rep).square().mean() for i in range(3)])
    model = SimpleNamespace(
        backbone=SimpleNamespace(representation=rep, has_representation=True),
        shared_parameters=lambda: list(shared.parameters()),
    )
    w = method(name, THREE, grad_source=grad_source)
    w.setup(THREE, model)
    grads = task_gradients(losses, w.task_grad_inputs(model))
    weights = w.backward(losses, grads, list(shared.parameters()), lambda total, exclude=(): total.backward())
    assert weights.shape == (3,) and torch.isfinite(weights).all() and not weights.requires_grad
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared.parameters())
    if grad_source == "params" and name != "graddrop":  # weighted-sum methods: the update is Gᵀw
        flat = torch.cat([p.grad.flatten() for p in shared.parameters()])
        assert torch.allclose(flat, weights @ grads, atol=1e-10)
