"""Per-task gradients of the shared parameters, against a hand-computed case."""

from __future__ import annotations

import torch

from mtl_experiments.grads import task_gradients


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
