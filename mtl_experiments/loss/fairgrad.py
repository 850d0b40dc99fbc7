"""FairGrad: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (arXiv:2402.15638), Algorithm 1.

The update d = Σ_t w_t g_t maximises the α-fair utility Σ_t u_α(g_tᵀd) of the tasks' first-order improvements
(u_α(x) = x^{1−α}/(1−α), log x at α = 1) in a ball; its optimality condition (paper eq. 4) is, with the
Gramian A = G Gᵀ,

    A w = w^{−1/α}   (element-wise),   w > 0,

i.e. every task gets g_tᵀd = w_t^{−1/α}. α = 0 is linear scalarisation, α = 1 proportional fairness, α = 2
minimum potential delay, α → ∞ max-min fairness (MGDA-like). F(w) = Aw − w^{−1/α} is strictly monotone on w > 0
(its Jacobian A + diag(w^{−1/α−1}/α) is positive definite), so a root, when it exists, is unique.

Solver (the authors' and TorchJD's choice): ``scipy.optimize.least_squares`` (trust-region reflective, bounds
w >= 0, start 1/T) on F, here with the analytic Jacobian and ``ftol = xtol = gtol = tol``. The solve is done on
A/s (s = the mean squared norm of the non-zero gradients, in float64), and w = s^{−α/(1+α)}·w' maps the root back:
the answer does not depend on the gradients' scale and float32 inputs solve like float64 ones. Logged every step
(``train/weighting/{iterations,converged,fallback,residual}``, ``loss/solver.py``): evaluations used, the worst
relative residual max_t |F_t| / w_t^{−1/α}, and whether it is below ``tol_residual``; a warning the first time it
is not (no root exists when 0 lies in the convex hull of the gradients, e.g. exactly opposite ones: the solver then
stops at a best fit).

Each solve starts from the previous step's scale-free root (a buffer, so a resumed run starts from the same point;
issue 17's warm start) instead of 1/T: the same tolerances, the same root (it is unique), fewer evaluations while
the gradients move slowly.

A task whose gradient is exactly zero has no root (w_t → ∞ with no effect on d): it is left out of the solve
and reports the mean weight of the others (1/T if every gradient is zero, the update then 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import least_squares
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GramianAggregation
from mtl_experiments.loss.solver import SolverReport
from mtl_experiments.tasks import Task


def fairgrad_root(
    gram: np.ndarray, alpha: float, tol: float, max_iters: int, start: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """The root of ``gram @ w = w**(-1/alpha)``, w > 0 (float64), by least squares from ``start`` (a previous root,
    issue 17's warm start, where it is positive and finite) or 1/T; returns (w, evaluations)."""
    num = gram.shape[0]
    x0 = np.full(num, 1.0 / num)
    if start is not None and start.shape == x0.shape and np.isfinite(start).all() and (start > 0).all():
        x0 = start

    def residual(w: np.ndarray) -> np.ndarray:
        return gram @ w - np.power(np.maximum(w, 1e-300), -1.0 / alpha)

    def jacobian(w: np.ndarray) -> np.ndarray:
        return gram + np.diag(np.power(np.maximum(w, 1e-300), -1.0 / alpha - 1.0) / alpha)

    res = least_squares(
        residual,
        x0,
        jac=jacobian,
        bounds=(0.0, np.inf),
        method="trf",
        ftol=tol,
        xtol=tol,
        gtol=tol,
        max_nfev=max_iters,
    )
    return res.x, int(res.nfev)


class FairGrad(GramianAggregation):
    """``update = Σ_t w_t g_t`` with ``G Gᵀ w = w^{−1/α}`` (see the module docstring)."""

    def __init__(
        self,
        alpha: float = 1.0,
        tol: float = 1e-12,
        tol_residual: float = 1e-6,
        max_iters: int = 1000,
        grad_source: str = "params",
    ):
        super().__init__(grad_source=grad_source)
        self.alpha = checks.positive_number("loss.alpha", alpha, hint="1: proportional fairness (the paper's default)")
        self.tol = checks.positive_number("loss.tol", tol, hint="least_squares' ftol/xtol/gtol, e.g. 1e-12")
        self.tol_residual = checks.positive_number(
            "loss.tol_residual", tol_residual, hint="relative residual counted as converged, e.g. 1e-6"
        )
        self.max_iters = checks.positive_int("loss.max_iters", max_iters, hint="function evaluations, e.g. 1000")
        self.register_buffer("iterations", torch.zeros(()))
        self.register_buffer("residual", torch.zeros(()))
        self.register_buffer("converged", torch.ones(()))
        self.report = SolverReport("FairGrad")

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        # the last scale-free root (0: none yet): the next solve starts from it (a buffer: saved in checkpoints)
        self.register_buffer("root", torch.zeros(self.num_tasks, dtype=torch.float64))

    def weigh(self, gram: Tensor) -> Tensor:
        gram = gram.numpy()
        num = gram.shape[0]
        nonzero = np.diag(gram) > 0
        weights = np.full(num, 1.0 / num)
        if nonzero.any():
            sub = gram[np.ix_(nonzero, nonzero)]
            scale = float(np.diag(sub).mean())
            start = self.root.cpu().numpy()[nonzero] if self.root.shape == (num,) else None
            w, evaluations = fairgrad_root(sub / scale, self.alpha, self.tol, self.max_iters, start)
            root = np.zeros(num)
            root[nonzero] = w  # the scale-free root: the next step's start
            self.root = torch.as_tensor(root, device=self.root.device)
            target = np.power(np.maximum(w, 1e-300), -1.0 / self.alpha)
            residual = float(np.max(np.abs(sub / scale @ w - target) / target))
            w = w * scale ** (-self.alpha / (1.0 + self.alpha))
            weights[nonzero] = w
            weights[~nonzero] = w.mean()  # reported only: a zero row adds nothing to the update
            self.record(evaluations, residual)
        return torch.as_tensor(weights, dtype=torch.float64)

    def record(self, evaluations: int, residual: float) -> None:
        """Keep the solve's evaluations and residual for logging; warn the first time it does not converge (no root
        exists when 0 lies in the convex hull of the task gradients: the least-squares best fit is used)."""
        converged = math.isfinite(residual) and residual <= self.tol_residual
        self.iterations.fill_(evaluations)
        self.residual.fill_(residual if math.isfinite(residual) else float("inf"))
        self.converged.fill_(float(converged))
        fallback = None if converged else f"no root of G Gᵀ w = w^(-1/α) (relative residual {residual:.3g}): best fit"
        self.report.record(evaluations, converged, fallback)

    def log_values(self) -> dict[str, Tensor]:
        return {**self.report.log_values(), "weighting/residual": self.residual}
