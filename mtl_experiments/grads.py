"""Per-task gradients of the shared dense parameters, computed once per step (DESIGN.md §5).

Weighting methods that need them and the conflict metrics receive the same ``G[T, P]`` matrix:
row t is the flattened gradient ∂L_t/∂θ_shared. Computed with ``torch.autograd.grad`` (not
``backward``) so ``.grad`` buffers and DDP's gradient hooks are untouched until the one real backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def task_gradients(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``G[T, P]`` with ``G[t] = flatten(∂ losses[t] / ∂ params)``; the graph is kept for the real backward.

    One batched backward (``is_grads_batched``: vmap over the T unit vectors) instead of T backwards:
    1.2x faster for 2 tasks and 1.8x for 8 on the default model. Ops without a batching rule fall back
    to one ``autograd.grad`` per task. A parameter a task does not reach contributes zeros to its row.
    """
    params = list(params)
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    try:
        grads = torch.autograd.grad(
            losses, params, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an op in the graph has no vmap rule
        return _task_gradients_loop(losses, params)
    return torch.cat(
        [
            torch.zeros(len(eye), p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(len(eye), -1)
            for p, g in zip(params, grads, strict=True)
        ],
        dim=1,
    )


def _task_gradients_loop(losses: Tensor, params: list[Tensor]) -> Tensor:
    rows = []
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
            )
        )
    return torch.stack(rows)
