"""UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv:2406.16232), §3.

Each task gradient is projected onto the dual cone of all task gradients, C = {x : ⟨x, g_t⟩ ≥ 0 ∀t},
and the projections are averaged (the paper's A_UPGrad, uniform preference):

    update = (1/T) Σ_i π_C(g_i),    π_C(Jᵀu) = Jᵀλ  with  λ = argmin_{λ ≥ u} λᵀGλ,  G = J Jᵀ   (Prop. 1)

so ``weights = (1/T) Σ_i λ^(i)`` with ``λ^(i) = argmin_{λ ≥ e_i} λᵀGλ`` and ``update = weightsᵀ J``.
Every projection lies in C, so their mean does: ⟨update, g_t⟩ ≥ 0 for every task (the step raises no
task's loss to first order). That guarantee is the method; this file exists to keep it.

Why not TorchJD 0.18's ``UPGrad`` (its default ``QuadprogProjector``):
- it solves min λᵀ(G/tr G + 1e-4·I)λ: the ridge turns the KKT condition Gλ = μ ≥ 0 into Gλ = μ − ελ,
  so ⟨update, g_t⟩ goes negative when one task's share of tr G is comparable to 1e-4. J = [[1, 0],
  [-100, 1]] gives update (-25.0, 0.505), ⟨update, g_1⟩ = -25; with random norm ratios in 1e-3..1e3 two
  thirds of the cases raise some task's loss;
- it replaces G by 0 when tr G < 1e-4 (``norm_eps``), turning UPGrad into the mean for small gradients
  (J = 1e-3·[[1, 0], [-2, 1]] gives the mean, which conflicts with g_1);
- with ``reg_eps=0`` quadprog rejects the singular Gramians of dependent gradients (duplicates, T > P);
- it needs the optional ``quadprog``/``qpsolvers`` dependencies.

Our solver is exact up to rounding and does not depend on gradient scales: with D = diag(‖g_t‖) and the
cosine matrix K = D⁻¹GD⁻¹, ``λ^(i) = ‖g_i‖·D⁻¹y`` where ``y = argmin_{y ≥ e_i} yᵀKy`` is the same
projection for the unit gradient ĝ_i (π_C is positively homogeneous and C does not change when rows are
rescaled). Each T×T problem is solved in float64 by Lawson–Hanson's active-set method, which terminates
with the exact KKT point (K_FF y_F = −K_FA e_A on the free set F, multipliers Ky ≥ 0 on the bound set A).
A task whose gradient is exactly zero constrains nothing; its weight is its lower bound 1/T.
Each projection's active-set walk starts from the previous step's final free set (a warm start, issue 17: the same
KKT point, one linear solve when the free set has not changed; the free sets are a buffer, so a resumed run starts
where it stopped). The linear solves and convergence are logged as ``weighting/iterations`` and ``weighting/converged``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.linalg import lstsq
from torch import Tensor

from mtl_experiments.loss.base import GramianAggregation
from mtl_experiments.loss.solver import SolverReport
from mtl_experiments.tasks import Task

# KKT tolerance on the multipliers Ky (cosine units, |K_ij| ≤ 1): a bound is released only if its
# multiplier is below -_TOL, so rounding noise cannot make the active set cycle.
_TOL = 1e-13
_MAX_STEPS_PER_TASK = 50  # Lawson–Hanson needs at most a few steps per task; a safety cap


def _min_over_bounds(
    cos: np.ndarray, lower: np.ndarray, free: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """``(y, free, solves, converged)``: ``y = argmin_{y ≥ lower} yᵀ K y`` for a PSD ``K`` (float64), by
    Lawson–Hanson's active-set method, its final free set, the linear solves it took and whether it met the KKT
    conditions within its step cap.

    ``y`` stays feasible throughout; ``free`` marks the coordinates above their bound. A ``free`` given (the last
    step's, issue 17's warm start) is where the active-set walk starts from ``y = lower`` unless ``lower`` is optimal
    itself: the same KKT point is reached (the same stopping rule), in one solve when the free set has not changed.
    """
    n = lower.shape[0]
    y = lower.copy()
    if free is None or (cos @ y >= -_TOL).all():  # y = lower is optimal already (no conflict): no solve
        free = np.zeros(n, dtype=bool)
    free = free.copy()
    solves = 0
    for _ in range(_MAX_STEPS_PER_TASK * n):
        y, free, walked = _walk(cos, lower, y, free)
        solves += walked
        multipliers = cos @ y  # gradient of ½yᵀKy: the KKT multipliers of the bounds y ≥ lower
        release = ~free & (multipliers < -_TOL)
        if not release.any():  # optimal: every bound still held has a non-negative multiplier
            return y, free, solves, True
        free[np.argmin(np.where(release, multipliers, np.inf))] = True
    return y, free, solves, False


def _walk(cos: np.ndarray, lower: np.ndarray, y: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """From a feasible ``y`` to the minimiser over the free coordinates (the bound ones held at their bounds),
    binding the free coordinates that reach their bound on the way; ``(y, free, solves)``."""
    solves = 0
    while free.any():
        solves += 1
        target = y.copy()
        rhs = -(cos[np.ix_(free, ~free)] @ lower[~free])
        # LAPACK's gelsy, torch's CPU default: the same basic solution where the free block is singular
        target[free] = lstsq(cos[np.ix_(free, free)], rhs, lapack_driver="gelsy", check_finite=False)[0]
        if (target[free] > lower[free]).all():
            return target, free, solves
        # walk towards it until the first free coordinate reaches its bound; that one becomes bound
        hits = np.flatnonzero(free & (target <= lower))
        gap, drop = y[hits] - lower[hits], y[hits] - target[hits]  # drop ≥ gap ≥ 0
        ratios = np.where(drop > 0, gap / np.maximum(drop, 1e-300), 0.0)
        y = y + ratios.min() * (target - y)
        free[hits[np.argmin(ratios)]] = False
        free &= y > lower
        y[~free] = lower[~free]
    return y, free, solves


def upgrad_weights(gram: np.ndarray, free_sets: np.ndarray | None = None) -> tuple[np.ndarray, int, bool]:
    """``(weights, solves, converged)``: UPGrad's weights ``(1/T) Σ_i argmin_{λ ≥ e_i} λᵀGλ`` from the Gramian
    ``G = J Jᵀ`` (float64), the linear solves they took and whether every projection converged.
    ``free_sets`` (bool ``[T, T]``, row i: the free set of task i's projection), when given, is where each projection
    starts and is overwritten with where it ended. In NumPy: a few µs per operation on these T×T arrays, where torch's
    small-tensor calls cost ~0.5 ms per solve."""
    num_tasks = gram.shape[0]
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    nonzero = norms > 0
    weights = np.where(nonzero, 0.0, 1.0 / num_tasks)
    idx = np.flatnonzero(nonzero)
    if idx.size == 0:
        return weights, 0, True
    n = norms[idx]
    cos = gram[np.ix_(idx, idx)] / np.outer(n, n)
    eye = np.eye(idx.size)
    solves, converged = 0, True
    for k in range(idx.size):
        start = None if free_sets is None else free_sets[idx[k], idx]
        y, free, walked, done = _min_over_bounds(cos, eye[k], start)  # projection of ĝ_k, in cosine coordinates
        solves, converged = solves + walked, converged and done
        weights[idx] += (n[k] / num_tasks) * y / n  # back to λ for g_k/T
        if free_sets is not None:
            free_sets[idx[k]] = False
            free_sets[idx[k], idx] = free
    return weights, solves, converged


class UPGrad(GramianAggregation):
    """``update = (1/T) Σ_i π_C(g_i)``; ⟨update, g_t⟩ ≥ 0 for every task (see the module docstring)."""

    def __init__(self, grad_source: str = "params"):
        super().__init__(grad_source=grad_source)
        self.report = SolverReport("UPGrad")

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        # each projection's last free set: the next step's starts from it (a buffer: saved in checkpoints)
        self.register_buffer("free_sets", torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.bool))

    def weigh(self, gram: Tensor) -> Tensor:
        # float64 throughout (K and the update's sum, loss.base.gramian/combine): the guarantee is a sign, and with
        # norm ratios of 1e3 float32 rounding of the weights alone moves ⟨update, g_t⟩ by ~1% of its value
        fits = self.free_sets.shape == gram.shape
        free_sets = self.free_sets.cpu().numpy().copy() if fits else np.zeros(gram.shape, dtype=bool)
        weights, solves, converged = upgrad_weights(gram.numpy(), free_sets)
        self.free_sets = torch.from_numpy(free_sets).to(self.free_sets.device)
        self.report.record(solves, converged)
        return torch.from_numpy(weights)

    def log_values(self) -> dict[str, Tensor]:
        return self.report.log_values()
