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
after finitely many steps, in float64 on the gradients' coordinates in an orthonormal basis of their span, taken
from the Gramian G Gᵀ (``loss.base.GramianAggregation``: no P-sized factorisation) after dividing out the norms, so
that only the cosines are factored (the unscaled Gramian's squared conditioning let the solve drift into conflict
when gradient norms spread over six decades). It stops on the Frank-Wolfe duality gap
``‖d‖² − min_t g_tᵀd ≤ epsilon·‖d‖²`` (plus float64 rounding of the products), which certifies
g_tᵀd ≥ (1 − epsilon)‖d‖² for every task. Gradients are not normalised (the paper's method; the authors' code
offers l2/loss normalisation as an extra). Iterations, convergence and a stall are logged (``weighting/*``).
Each solve after the first starts from the previous step's weights (Wolfe's minor cycle on their support; a buffer,
so a resumed run starts from the same point): issue 17's warm start, the same stopping rule and min-norm point.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.linalg import lstsq
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GramianAggregation
from mtl_experiments.loss.solver import SolverReport
from mtl_experiments.tasks import Task

EPS = float(np.finfo(np.float64).eps)


def coordinates(gram: np.ndarray) -> np.ndarray:
    """Rows ``L`` with ``L Lᵀ = K = G Gᵀ``: the task gradients in an orthonormal basis of their span (float64), from
    the Gramian alone.

    The norms are taken out first, ``K = D C D`` with ``D = diag(‖g_t‖)`` and ``C`` the cosine matrix, and only C is
    factored (``C = V Λ Vᵀ``, rows of ``V Λ^½`` rescaled to unit length): each g_t keeps its own norm exactly however
    far the norms spread. (An unscaled factor of K buries a small gradient under a large one's rounding: a weight of
    6e-7 on a gradient of norm 673 must be exact to 1e-5 for the promise to hold.) A zero gradient is a zero row.
    """
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    live = np.flatnonzero(norms > 0)
    points = np.zeros_like(gram)
    if live.size == 0:
        return points
    n = norms[live]
    eigenvalues, vectors = np.linalg.eigh(gram[np.ix_(live, live)] / np.outer(n, n))
    rows = vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))
    points[live, : live.size] = n[:, None] * rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return points


def affine_minimum(points: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``v`` minimising ‖vᵀL‖ over ``Σv = 1``, ``v = 0`` off ``active``: the affine hull's nearest point to 0, as the
    least-squares problem min_c ‖L_b + Σ_i c_i (L_i − L_b)‖ in the points themselves (Wolfe keeps the active points
    affinely independent, so the differences have full column rank)."""
    idx = np.flatnonzero(active)
    idx = idx[np.argsort(np.linalg.norm(points[idx], axis=1), kind="stable")]  # the shortest as base: least cancelling
    base, rest = idx[0], idx[1:]
    v = np.zeros(points.shape[0])
    v[base] = 1.0
    if rest.size:
        diffs = (points[rest] - points[base]).T
        c = lstsq(diffs, -points[base], lapack_driver="gelsy", check_finite=False)[0]
        v[rest] = c
        v[base] = 1.0 - c.sum()
    return v


def vertex(norms: np.ndarray) -> np.ndarray:
    """Wolfe's cold start: all weight on the shortest point."""
    w = np.zeros(norms.shape[0])
    w[np.argmin(norms)] = 1.0
    return w


def min_norm_weights(
    points: np.ndarray, epsilon: float, max_iters: int, start: np.ndarray | None = None
) -> tuple[np.ndarray, int, bool]:
    """``(w, iterations, converged)``: the min-norm point of the rows' convex hull, by Wolfe's algorithm (float64).

    ``start`` (a previous step's w, issue 17's warm start): Wolfe starts from the minor cycle on its support instead
    of the shortest vertex; the same stopping rule, so the same point; if that run stalls, the cold start runs too.
    """
    num_tasks = points.shape[0]
    norms = np.linalg.norm(points, axis=1)
    if norms.max() == 0.0:  # every gradient is zero: any w gives d = 0
        return np.full(num_tasks, 1.0 / num_tasks), 0, True
    warm = start is not None and np.isfinite(start).all() and (start >= 0).all() and start.sum() > 0
    if warm and (norms[start > 0] > 0).all():
        w, active = minor_cycle(points, start / start.sum(), start > 0)
        w, iterations, converged = wolfe(points, norms, w, active, epsilon, max_iters)
        if converged:
            return w, iterations, True
        w = vertex(norms)
        cold, more, converged = wolfe(points, norms, w, w > 0, epsilon, max_iters)
        return cold, iterations + more, converged
    w = vertex(norms)
    return wolfe(points, norms, w, w > 0, epsilon, max_iters)


def wolfe(
    points: np.ndarray, norms: np.ndarray, w: np.ndarray, active: np.ndarray, epsilon: float, max_iters: int
) -> tuple[np.ndarray, int, bool]:
    """Wolfe's major cycles from ``w`` (in the simplex, support ``active``): ``(w, iterations, converged)``."""
    num_tasks = points.shape[0]
    for iteration in range(1, max_iters + 1):
        d = w @ points
        products = points @ d
        sq_norm = float(d @ d)
        j = int(np.argmin(products))
        # d = wᵀL carries rounding of about eps·Σ w_t‖g_t‖, so g_jᵀd and ‖d‖² are known to that times ‖g_j‖ + ‖d‖
        rounding = 4 * num_tasks * EPS * float((w @ norms) * (norms[j] + np.sqrt(sq_norm)))
        if sq_norm - float(products[j]) <= epsilon * sq_norm + rounding:  # the duality gap: optimal
            return w, iteration, True
        if active[j]:  # the best vertex is already in use: rounding stalls the method
            return w, iteration, False
        active[j] = True
        w, active = minor_cycle(points, w, active)
    return w, max_iters, False


def minor_cycle(points: np.ndarray, w: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wolfe's minor cycle: move towards the affine minimum, dropping points that leave the hull, until it is
    inside the simplex of the points still active."""
    while True:
        v = affine_minimum(points, active)
        if (v[active] > 0).all():
            return v, active
        leaving = active & (v <= 0)
        ratios = w[leaving] / (w[leaving] - v[leaving])
        w = w + ratios.min() * (v - w)
        drop = np.flatnonzero(leaving)[np.argmin(ratios)]
        active = active & (w > 0)
        active[drop] = False
        w = np.where(active, w, 0.0)
        w = w / w.sum()


class MGDA(GramianAggregation):
    """``update = Σ_t w_t g_t``, the min-norm point of the gradients' convex hull (see the module docstring)."""

    def __init__(self, epsilon: float = 1e-8, max_iters: int = 100, grad_source: str = "params"):
        super().__init__(grad_source=grad_source)
        hint = "the relative duality gap at which the solve stops; 1e-8 is exact to float32"
        self.epsilon = checks.number("loss.epsilon", epsilon, low=0.0, high=1.0, high_open=True, hint=hint)
        self.max_iters = checks.positive_int("loss.max_iters", max_iters, hint="Wolfe's method needs a few per task")
        self.report = SolverReport("MGDA")

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        # the last solve's weights (0: none yet): the next solve starts from them (a buffer: saved in checkpoints)
        self.register_buffer("w", torch.zeros(self.num_tasks, dtype=torch.float64))

    def weigh(self, gram: Tensor) -> Tensor:
        # float64 (loss.base.gramian): the promise is a sign, float32 rounding of K could flip it
        # the T×T solve in NumPy: a few µs per operation, where torch's small-tensor calls cost ~0.5 ms per solve
        start = self.w.cpu().numpy() if self.w.shape == gram.shape[:1] and bool(self.w.any()) else None
        weights, iterations, converged = min_norm_weights(
            coordinates(gram.numpy()), self.epsilon, self.max_iters, start
        )
        self.w = torch.from_numpy(weights).to(self.w.device)
        self.report.record(iterations, converged)
        return torch.from_numpy(weights.copy())

    def log_values(self) -> dict[str, Tensor]:
        return self.report.log_values()
