"""CAGrad: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.

With the task gradients g_t and their average g_0 = (1/T) Σ_t g_t, CAGrad takes the update d that
maximises the worst task's first-order improvement inside a ball around g_0:

    max_d min_t g_tᵀd   s.t.  ‖d − g_0‖ ≤ c‖g_0‖.

Its dual (Algorithm 1) is T-dimensional, with g_w = Σ_t w_t g_t:

    w* = argmin_{w ∈ simplex} g_wᵀg_0 + c‖g_0‖·‖g_w‖,      d = g_0 + (c‖g_0‖ / ‖g_w*‖)·g_w*.

Everything is computed on the T×T Gramian A = G Gᵀ in float64 (``loss.base.GramianAggregation``; g_wᵀg_0 = wᵀA1/T,
‖g_w‖² = wᵀAw, ‖g_0‖² = 1ᵀA1/T²)
and the dual is solved with SLSQP, as in the authors' code (here with the analytic gradient and a
tight tolerance). Variant choices:

- ``rescale`` follows the authors' code: 0 = d as in Algorithm 1; 1 = d/(1+c²) (what every experiment
  script of the authors runs, hence the default); 2 = d/(1+c).
- The update is multiplied by T so that it is on the scale of Σ_t L_t, like every other parameter's
  gradient in our step (the authors do the same: ``newgrad * 3  # to match the sum loss``). With
  c = 0 CAGrad is then exactly ``equal`` weighting (weights 1).
- ``c`` = 0.4 is the value of the authors' NYU-v2 and Cityscapes runs (and Nash-MTL's CAGrad default).
  The paper's convergence result to a stationary point of the average loss needs 0 ≤ c < 1; larger c
  moves towards MGDA.
- A task whose gradient is exactly zero (no label this step) adds the constant 0 to min_t g_tᵀd, so
  max_d min(min_{live t} g_tᵀd, 0) is attained by the maximiser of the live tasks' worst value: the dual is
  solved over the tasks with a non-zero gradient only (g_0 and the ball stay those of all T tasks). Solving it
  over all T tasks made w* = e_zero (g_w* = 0) a dual optimum whose primal direction is undefined, and d fell back
  to g_0 (issue 14: J = [[1, 0], [0, 0], [-1.2, 1]] gave worst value -0.0667 where d = (0, 1/3) reaches 0).
- Fallback: if g_w* still vanishes (0 in the convex hull of the non-zero gradients, possible at the optimum only
  when the optimum is 0), d = (1 − min(c, 1))·g_0, the ball's point nearest 0 (d = 0, optimal, for c ≥ 1); it is
  logged (``weighting/fallback``) with a warning. All gradients zero: d = 0. SLSQP's iterations and success are
  logged as ``weighting/iterations`` and ``weighting/converged``.
- SLSQP starts from the previous step's w* (a buffer, so a resumed run starts from the same point; issue 17's warm
  start), not from 1/T: the same tolerance, the same optimum to it, fewer iterations while the gradients move
  slowly.

The weights reported are exact: update = Σ_t w_t g_t with w = T·(1/T + (c‖g_0‖/‖g_w*‖)·w*)/rescale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GramianAggregation
from mtl_experiments.loss.solver import SolverReport
from mtl_experiments.tasks import Task

RESCALE = (0, 1, 2)


def cagrad_dual(
    gram: np.ndarray, c: float, live: np.ndarray | None = None, start: np.ndarray | None = None
) -> tuple[np.ndarray, int, bool]:
    """``(w*, iterations, success)``: the dual solution on the simplex of the tasks ``live`` (default all) for the
    Gramian ``gram`` of all T tasks (float64, T×T); w* is 0 off ``live``. SLSQP starts from ``start`` (a previous
    w*, issue 17's warm start) where it has weight on the live tasks, else from 1/T."""
    live = np.ones(gram.shape[0], dtype=bool) if live is None else live
    x0 = np.full(int(live.sum()), 1.0 / int(live.sum()))
    if start is not None and np.isfinite(start).all() and start[live].sum() > 0:
        x0 = np.clip(start[live], 0.0, None) / np.clip(start[live], 0.0, None).sum()
    b = gram.mean(axis=1)[live]  # A·1/T: b_t = g_tᵀg_0 (g_0 the mean of all T gradients)
    k = c * math.sqrt(max(float(gram.mean()), 0.0))  # c‖g_0‖
    gram = gram[np.ix_(live, live)]
    T = gram.shape[0]
    tiny = 1e-20 * max(float(np.trace(gram)), 1e-300)  # keeps sqrt differentiable where g_w = 0

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        aw = gram @ w
        gw_norm = math.sqrt(max(float(w @ aw), 0.0) + tiny)
        return float(w @ b) + k * gw_norm, b + k * aw / gw_norm

    res = minimize(
        objective,
        x0,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * T,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-14, "maxiter": 200},
    )
    w = np.clip(res.x, 0.0, None)  # SLSQP may overshoot the bounds by rounding
    out = np.zeros(live.shape[0])
    out[live] = w / w.sum()
    return out, int(res.nit), bool(res.success)


class CAGrad(GramianAggregation):
    """``update = T·(g_0 + (c‖g_0‖/‖g_w*‖)·g_w*)/rescale`` (see the module docstring)."""

    float64_sums = False  # K and the update in G's dtype, as before issue 17: the scale-free SLSQP solve stops at 1e-14

    def __init__(self, c: float = 0.4, rescale: int = 1, grad_source: str = "params"):
        super().__init__(grad_source=grad_source)
        self.c = checks.non_negative_number("loss.c", c, hint="the paper uses c in [0, 1)")
        hint = "0: none, 1: divide by 1+c², 2: divide by 1+c"
        self.rescale = checks.integer("loss.rescale", rescale, low=min(RESCALE), high=max(RESCALE), hint=hint)
        self.report = SolverReport("CAGrad")

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        # the last dual solution w*: the next solve starts from it (a buffer: saved in checkpoints)
        self.register_buffer("w", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))

    def _scale(self) -> float:
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]

    def weigh(self, gram: Tensor) -> Tensor:
        T = gram.shape[0]
        mean_sq_norm = float(gram.diagonal().mean())
        if mean_sq_norm <= 0:  # every task gradient is zero: nothing to move
            self.report.record(0, True)
            return torch.ones(T, dtype=torch.float64)
        gram = (gram / mean_sq_norm).numpy()  # scale-free solve; w* does not depend on the scale of G
        live = np.diagonal(gram) > 0  # a zero gradient only adds the constant 0 to the worst value
        start = self.w.cpu().numpy() if self.w.shape == (T,) else None
        w, iterations, success = cagrad_dual(gram, self.c, live, start)
        self.w = torch.as_tensor(w, device=self.w.device)
        g0_norm = math.sqrt(max(float(gram.mean()), 0.0))
        gw_norm = math.sqrt(max(float(w @ gram @ w), 0.0))
        weights, fallback = np.full(T, 1.0 / T), None
        if self.c > 0 and gw_norm > 1e-9 * g0_norm:
            weights = weights + (self.c * g0_norm / gw_norm) * w
        elif self.c > 0 and g0_norm > 0:
            fallback = "0 lies in the convex hull of the task gradients: d = (1 - min(c, 1))·g_0"
            weights = weights * (1.0 - min(self.c, 1.0))
        self.report.record(iterations, success, fallback)
        return torch.as_tensor(T * weights / self._scale(), dtype=torch.float64)

    def log_values(self) -> dict[str, Tensor]:
        return self.report.log_values()
