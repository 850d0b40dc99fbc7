"""``grads.task_gradients`` from each task's own loss node (``task_loss_edges``): the same G as the per-task loop,
and each task's tower backward runs once per G, not once per task (the stack's backward feeds every input)."""

from __future__ import annotations

import pytest
import torch

from mtl_experiments import grads
from mtl_experiments.grads import _task_gradients_loop, task_gradients, task_loss_edges

pytestmark = pytest.mark.skipif(not grads.EDGE_OUTPUTS, reason="GradientEdge outputs need torch >= 2.4")


class CountedIdentity(torch.autograd.Function):
    """Identity whose backward records whether each gradient it receives is zero (``bool`` on a tensor: under the
    batched form's vmap that raises, and the per-task loop through the stack runs it for every task's row)."""

    zero_grads: list[bool] = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountedIdentity.zero_grads.append(not bool(grad.any()))
        return grad


def network(T: int, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    shared = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6)).to(dtype)
    towers = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(T)).to(dtype)
    return shared, towers, torch.randn(9, 5, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edges_give_the_per_task_gradients_on_random_networks(dtype):
    for seed in range(20):
        T = 1 + seed % 5
        shared, towers, x = network(T, dtype, seed)
        h = shared(x)
        losses = torch.stack([towers[t](h).square().mean() * (t + 1) for t in range(T)])
        params = list(shared.parameters())
        assert task_loss_edges(losses) is not None
        g = task_gradients(losses, params)
        assert g.dtype == dtype and g.shape == (T, sum(p.numel() for p in params))
        torch.testing.assert_close(g, _task_gradients_loop(losses, params))  # dtype-scaled tolerances


def test_each_tower_backward_runs_once_per_g():
    T = 3
    shared, towers, x = network(T, torch.float32, 0)
    h = shared(x)
    losses = torch.stack([CountedIdentity.apply(towers[t](h)).mean() for t in range(T)])
    CountedIdentity.zero_grads = []
    task_gradients(losses, list(shared.parameters()))
    # through the stack: T·T calls, T·(T - 1) of them with a zero gradient (every row runs every tower)
    assert CountedIdentity.zero_grads == [False] * T


def test_a_loss_without_graph_gives_a_zero_row_and_a_stacked_leaf_falls_back():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.stack([(w**2).sum(), torch.tensor(3.0)])
    assert torch.equal(task_gradients(losses, [w]), torch.tensor([[2.0, 4.0], [0.0, 0.0]]))
    leaf = torch.tensor(1.0, requires_grad=True)
    stacked = torch.stack([(w**2).sum(), leaf])
    assert task_loss_edges(stacked) is None  # the batched form: d leaf / d leaf = 1
    assert torch.equal(task_gradients(stacked, [w, leaf]), torch.tensor([[2.0, 4.0, 0.0], [0.0, 0.0, 1.0]]))
    assert task_loss_edges(torch.stack([(w**2).sum(), w.sum()]).unsqueeze(1)) is None  # not a stack of scalars


def test_a_stack_of_mixed_dtypes_gives_each_task_its_gradient():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    losses = torch.stack([(w**2).sum().float(), (3 * w).sum().half().float()])
    assert torch.equal(task_gradients(losses, [w]), torch.tensor([[2.0, 4.0], [3.0, 3.0]], dtype=torch.float64))
