"""Function-space conflict estimator: the cosine of the tasks' loss gradients with respect to their own outputs.

Each task's gradient on the shared parameters is g_t = J_tᵀ δ_t, with δ_t,i = ∂L_t/∂ŷ_t,i the per-sample
gradient of the task's loss with respect to its output (binary cross-entropy on logits: (σ(z_i) − y_i) / n;
mean squared error: 2 (ŷ_i − y_i) / n) and J_t = ∂ŷ_t/∂θ_shared the Jacobian of the task's outputs *through its
own tower*. g_1·g_2 = δ_1ᵀ J_1 J_2ᵀ δ_2: with independently initialised towers J_1 J_2ᵀ is close to a random
matrix early in training, so the parameter-space cosine is pulled towards 0 whatever the tasks' relatedness.
Factoring the Jacobians out leaves the function-space cosine

    output_cosine_ij = Σ_b δ_i,b δ_j,b / (‖δ_i‖ ‖δ_j‖)   over the batch rows b where both labels are observed,

the parameter-space cosine under the identity kernel (J_1 = J_2 = J with J Jᵀ = I; with J Jᵀ = K it is the
cosine in the neural tangent kernel's geometry, Jacot et al., "Neural Tangent Kernel", NeurIPS 2018, Eq. 2 and
§4: function-space gradient descent ∂_t f = −K ∇_f L). Variant: identity kernel, per mini-batch, averaged over the
tracked steps. It measures whether the two tasks want the *same samples' predictions* moved the same way: at
initialisation (σ(z) ≈ constant) it is the cosine of the labels' residuals about that constant, i.e. close to the
labels' Pearson correlation once the output bias has fitted the base rates; late in training it is the correlation
of what neither model explains (their residuals). Invariant to a positive scale of either loss (the 1/n of a mean).

Computed from the outputs alone (each task's loss re-evaluated on its detached outputs, then ``autograd.grad``
with respect to them): no backward through the model. Defined for tasks with one output per sample (binary,
regression); a pair with a multiclass or retrieval task (an output vector per sample, a different output space)
has no value and is skipped. A pair with no row labelled for both tasks in a batch gets 0 there (the conflict
metrics' zero-vector convention). Under DDP the ranks' per-row residuals are gathered (``grads.gather_batch``), so
every rank computes the global batch's cosine, the value one process computes on that batch. δ is kept per row
(the mean's 1/n multiplied back) so that rows of ranks with different labelled counts weigh alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mtl_experiments.metrics.running import RunningMean


def output_residuals(
    tasks: Mapping[str, Any],
    outputs: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    masks: Mapping[str, Tensor | None],
) -> tuple[Tensor, Tensor, list[bool]]:
    """``(D[T, B], M[T, B], scalar[T])`` in ``tasks``' order (each has ``loss(output, target)``): δ_t = ∂L_t/∂ŷ_t per
    row, the mean's 1/n multiplied back (0 on rows without task t's label), the label masks as floats, and whether
    task t has one output per sample (the rows of the others are all 0)."""
    first = next(iter(outputs.values()))
    b, device = len(first), first.device
    d = torch.zeros(len(tasks), b, dtype=torch.float64, device=device)
    m = torch.zeros(len(tasks), b, dtype=torch.float64, device=device)
    scalar = []
    for t, (name, task) in enumerate(tasks.items()):
        out = outputs[name].detach()
        scalar.append(out.reshape(b, -1).shape[1] == 1)
        mask = masks.get(name)  # None: every row is labelled (no index copies, no host sync for the count)
        if not scalar[-1] or (mask is not None and not bool(mask.any())):  # no value, or no labelled row: all 0
            continue
        # float32 at least: a bf16 output's residual keeps its precision (float64 stays float64)
        leaf = (out if out.dtype in (torch.float32, torch.float64) else out.float()).requires_grad_(True)
        output, target = (leaf, labels[name]) if mask is None else (leaf[mask], labels[name][mask])
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(task.loss(output, target), leaf)
        # × n: the per-row derivative of a mean loss, comparable across ranks whose labelled counts differ
        d[t] = grad.reshape(b).double() * (b if mask is None else int(mask.sum()))
        m[t] = 1.0 if mask is None else mask.double()
    return d, m, scalar


def output_cosine(residuals: Tensor, masks: Tensor) -> Tensor:
    """cos_ij over the rows labelled for both i and j (``[T, T]``, float64; 0 where a restricted norm is 0):
    K_ij = Σ_b D_ib D_jb (D is 0 off each task's own rows) and A_ij = Σ_b D_ib² M_jb (‖δ_i‖² on j's rows)."""
    d = residuals.double()
    inner = d @ d.T
    inner = (inner + inner.T) / 2  # exactly symmetric (a matmul's rounding need not be)
    sq = d.square() @ masks.double().T
    norms = (sq * sq.T).clamp_min(0).sqrt()
    cos = torch.where(norms > 0, inner / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(inner))
    return cos.clamp(-1.0, 1.0)


class OutputCosine(RunningMean):
    """Mean over tracked steps of the function-space cosine matrix ``[T, T]``. ``update(residuals, masks)``."""

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__((num_tasks, num_tasks), **kwargs)

    def update(self, residuals: Tensor, masks: Tensor) -> None:
        self.last = output_cosine(residuals, masks)
        self.add(self.last)
