"""MGDA: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.

The update is the minimum-norm point of the convex hull of the task gradients (the paper's Eq. 3):

    d = Σ_t w_t g_t,   w = argmin_{w ≥ 0, Σw = 1} ‖Σ_t w_t g_t‖² = argmin wᵀAw,   A = G Gᵀ.

Its promise: g_tᵀd ≥ ‖d‖² > 0 for every task (a common descent direction), or d = 0 at a Pareto-stationary
point. The paper solves the problem with Frank-Wolfe (its Algorithm 2); Frank-Wolfe converges sublinearly and,
stopped by a step-size tolerance (TorchJD's ``epsilon`` 1e-3, ``max_iters`` 100, what this project shipped
before), returned updates that conflicted with a task (issue 14: J·d = (-1.92, 15.19, 0.37) where the min-norm
point has J·d* = 0.1183 for every task).

Variant chosen: the same min-norm point, solved exactly by Wolfe's minimum-norm-point algorithm (P. Wolfe,
"Finding the nearest point in a polytope", Math. Programming 11, 1976), an active-set method that terminates
after finitely many steps, on the T×T Gramian in float64. It stops on the Frank-Wolfe duality gap
``‖d‖² − min_t g_tᵀd ≤ epsilon·‖d‖²`` (plus float64 rounding of the Gramian), which certifies
g_tᵀd ≥ (1 − epsilon)‖d‖² for every task. Gradients are not normalised (the paper's method; the authors' code
offers l2/loss normalisation as an extra). Iterations, convergence and a stall are logged (``weighting/*``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GradientAggregation
from mtl_experiments.loss.solver import SolverReport

ROUNDING = 1e-13  # float64 rounding of ‖d‖² = wᵀAw, relative to the largest ‖g_t‖²


def affine_minimum(gram: Tensor, active: Tensor) -> Tensor:
    """``argmin vᵀAv`` over ``Σv = 1``, ``v = 0`` off ``active`` (the bordered KKT system; Wolfe keeps the active
    points affinely independent, so it is regular)."""
    idx = active.nonzero().flatten()
    n = idx.numel()
    scale = float(gram.diagonal().max())
    kkt = torch.zeros(n + 1, n + 1, dtype=gram.dtype)
    kkt[:n, :n] = gram[idx][:, idx] / scale
    kkt[:n, n] = kkt[n, :n] = 1.0
    rhs = torch.zeros(n + 1, 1, dtype=gram.dtype)
    rhs[n] = 1.0
    v = torch.zeros(gram.shape[0], dtype=gram.dtype)
    v[idx] = torch.linalg.lstsq(kkt, rhs).solution[:n, 0]
    return v


def min_norm_weights(gram: Tensor, epsilon: float, max_iters: int) -> tuple[Tensor, int, bool]:
    """``(w, iterations, converged)``: the min-norm point's weights on the simplex, by Wolfe's algorithm (float64)."""
    num_tasks = gram.shape[0]
    floor = ROUNDING * float(gram.diagonal().max())
    if floor <= 0:  # every gradient is zero: any w gives d = 0
        return torch.full((num_tasks,), 1.0 / num_tasks, dtype=gram.dtype), 0, True
    w = torch.zeros(num_tasks, dtype=gram.dtype)
    w[gram.diagonal().argmin()] = 1.0
    active = w > 0
    for iteration in range(1, max_iters + 1):
        products = gram @ w  # g_tᵀd
        sq_norm = float(w @ products)
        j = int(products.argmin())
        if sq_norm - float(products[j]) <= epsilon * sq_norm + floor:  # the duality gap: optimal
            return w, iteration, True
        if bool(active[j]):  # the best vertex is already in use: rounding stalls the method
            return w, iteration, False
        active[j] = True
        while True:  # Wolfe's minor cycle: move to the affine minimum, dropping points that leave the hull
            v = affine_minimum(gram, active)
            if bool((v[active] > 0).all()):
                w = v
                break
            leaving = active & (v <= 0)
            ratios = w[leaving] / (w[leaving] - v[leaving])
            w = w + ratios.min() * (v - w)
            drop = leaving.nonzero().flatten()[ratios.argmin()]
            active &= w > 0
            active[drop] = False
            w = torch.where(active, w, torch.zeros_like(w))
            w = w / w.sum()
    return w, max_iters, False


class MGDA(GradientAggregation):
    """``update = Σ_t w_t g_t``, the min-norm point of the gradients' convex hull (see the module docstring)."""

    def __init__(self, epsilon: float = 1e-8, max_iters: int = 100, grad_source: str = "params"):
        super().__init__(grad_source=grad_source)
        hint = "the relative duality gap at which the solve stops; 1e-8 is exact to float32"
        self.epsilon = checks.number("loss.epsilon", epsilon, low=0.0, high=1.0, high_open=True, hint=hint)
        self.max_iters = checks.positive_int("loss.max_iters", max_iters, hint="Wolfe's method needs a few per task")
        self.report = SolverReport("MGDA")

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        g = grads.detach().to(torch.float64)  # the promise is a sign: float32 rounding of A could flip it
        weights, iterations, converged = min_norm_weights((g @ g.T).cpu(), self.epsilon, self.max_iters)
        self.report.record(iterations, converged)
        weights = weights.to(g.device)
        return (weights @ g).to(grads.dtype), weights.to(grads.dtype)

    def log_values(self) -> dict[str, Tensor]:
        return self.report.log_values()
