"""Per-task gradients of the shared dense parameters, computed once per step (DESIGN.md §5).

Weighting methods that need them and the conflict metrics receive the same ``G[T, P]`` matrix:
row t is the flattened gradient ∂L_t/∂θ_shared. Computed with ``torch.autograd.grad`` (not
``backward``) so ``.grad`` buffers and DDP's gradient hooks are untouched until the one real backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def task_gradients(losses: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """``G[T, P]`` with ``G[t] = flatten(∂ losses[t] / ∂ params)``; the graph is kept for the real backward.

    A parameter a task does not reach contributes zeros to that task's row.
    """
    params = list(params)
    rows = []
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
            )
        )
    return torch.stack(rows)
