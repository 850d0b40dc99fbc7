"""Per-task gradients of the shared parameters, against a hand-computed case."""

from __future__ import annotations

import torch

from mtl_experiments.grads import _task_gradients_loop, task_gradients


def test_task_gradients_by_hand():
    # shared w = [1, 2], b = 3; L1 = (w·x + b)^2 with x = [1, 1] -> dL1/dw = 2·6·x = [12, 12], dL1/db = 12
    # L2 = 5·w[0] (b unused by task 2 -> zeros)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor(3.0, requires_grad=True)
    x = torch.tensor([1.0, 1.0])
    losses = torch.stack([(w @ x + b) ** 2, 5 * w[0]])
    g = task_gradients(losses, [w, b])
    assert torch.equal(g, torch.tensor([[12.0, 12.0, 12.0], [5.0, 0.0, 0.0]]))
    # the graph is kept for the one real backward afterwards, and .grad is untouched
    assert w.grad is None
    losses.sum().backward()
    assert torch.equal(w.grad, torch.tensor([17.0, 12.0]))


def test_batched_and_per_task_gradients_agree_on_a_network():
    torch.manual_seed(0)
    shared = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(3)])
    h = shared(torch.randn(10, 6))
    losses = torch.stack([heads[t](h).square().mean() * (t + 1) for t in range(3)])
    params = list(shared.parameters())
    assert torch.allclose(task_gradients(losses, params), _task_gradients_loop(losses, params), atol=1e-6)
