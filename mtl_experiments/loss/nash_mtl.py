"""Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022.

The update is the Nash bargaining solution d = Σ_t α_t g_t, where α > 0 solves (the paper's
characterisation of the solution, used by its Algorithm 1)

    (G Gᵀ) α = 1/α      (element-wise: α_t · g_tᵀd = 1 for every task t).

How we solve it: these are exactly the stationarity conditions of the strictly convex function
F(α) = ½ αᵀ(GGᵀ)α − Σ_t log α_t on α > 0, which is self-concordant (a quadratic plus a log barrier); we
minimise it (in the rescaled form below) with damped Newton steps (step 1/(1+λ), λ the Newton
decrement, full steps once λ < 1/4), which stay inside α > 0 and converge quadratically, to
|α_t·(GGᵀα)_t − 1| < 1e-10. The authors instead
run up to 20 rounds of a convex approximation solved with cvxpy/ECOS, stopping at a residual of 1e-3;
both target the same equations, ours to machine precision and without the cvxpy dependency.

Numerics: with α_t = γ_t/‖g_t‖ the equations become γ ⊙ (Cγ) = 1 on the cosine matrix C of the
gradients, which is scale-free (the authors divide the Gramian by its norm for the same reason), so
tasks whose gradient norms differ by orders of magnitude are solved equally well. A ridge of 1e-10 is
added to C so that a solution always exists: without it the equations have no positive solution when
0 lies in the convex hull of the gradients (a Pareto-stationary point), which the paper excludes by
assumption; elsewhere it changes the solution by ~1e-10 relative. Where only the ridge makes a solution exist
(the ridge-free residual stays above 1e-6), the point is Pareto-stationary and α = 0: the update 0 that the
ridge's huge, cancelling α gave, now logged as what it is (``weighting/fallback``, with a warning). Newton's
iterations and convergence are logged as ``weighting/iterations`` and ``weighting/converged``.
A task whose gradient is exactly zero cannot satisfy α_t·0 = 1 and has no influence on the update; it gets α_t = 0.

Options as in the authors' code: ``update_weights_every`` (α is recomputed every that many steps and
reused in between; default 1) and ``max_norm`` (if ‖Σ_t α_t g_t‖ exceeds it, α is scaled down so it
does not; the authors clip the shared parameters' gradient norm to 1.0 by default; 0 disables). With
``grad_source=representation`` both α and the norm cap are computed on the representation gradients.
The step counter and the last α are buffers, so a resumed run continues the schedule exactly. Each solve after the
first starts Newton from the last solution in cosine coordinates, γ_t = α_t·‖g_t‖ (scale-free, so a step's change of
gradient norms does not move it; a buffer too; issue 17's warm start): the same solution (the equations have one
positive root and the stopping rule is unchanged), usually in fewer iterations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GramianAggregation
from mtl_experiments.loss.solver import SolverReport
from mtl_experiments.tasks import Task

RIDGE = 1e-10
TOL = 1e-10
MAX_ITER = 100
STATIONARY = 1e-6  # residual of the ridge-free equations above which no positive solution exists


def nash_weights(gram: Tensor) -> Tensor:
    """α ≥ 0 with ``(gram @ α)_t = 1/α_t`` for every task with a non-zero gradient (float64); see ``solve_nash``."""
    return solve_nash(gram)[0]


def solve_nash(gram: Tensor, start: Tensor | None = None) -> tuple[Tensor, int, bool, bool]:
    """``(α, iterations, converged, stationary)``: α ≥ 0 with ``(gram @ α)_t = 1/α_t`` for every task with a
    non-zero gradient (float64).

    Substituting α_t = γ_t/‖g_t‖ turns the equations into γ ⊙ (Cγ) = 1 on the cosine matrix C (unit
    diagonal), so tasks whose gradient norms differ by orders of magnitude are solved equally well.
    A task with a zero gradient has no solution (α_t·0 = 1) and no influence on the update: α_t = 0.
    ``stationary``: the equations without the ridge have no positive solution (0 lies in the convex hull of the
    gradients: a Pareto-stationary point, which the paper excludes); α = 0 then, the update that was applied
    (the ridge's α ~ 1e5 cancelled to an update of 0 but was logged as the weights: issue 14).
    ``start``: a previous γ (warm start, issue 17): Newton starts from it where it is positive for every
    task with a non-zero gradient (the same equations and stopping rule, so the same solution to ``TOL``).
    """
    gram = gram.double()
    sq_norms = gram.diagonal()
    live = torch.isfinite(sq_norms) & (sq_norms > 0)
    alpha = torch.zeros_like(sq_norms)
    if not bool(live.any()):
        return alpha, 0, True, False
    norms = sq_norms[live].sqrt()
    n = norms.shape[0]
    cos = gram[live][:, live] / torch.outer(norms, norms)
    gamma0 = None if start is None or start.shape != live.shape else start.to(gram)[live]
    if gamma0 is not None and not bool((torch.isfinite(gamma0) & (gamma0 > 0)).all()):
        gamma0 = None  # a task that had no gradient, or the stationary fallback's α = 0: start cold
    gamma, iterations, converged = newton(cos + RIDGE * torch.eye(n, dtype=torch.float64, device=gram.device), gamma0)
    if (gamma * (cos @ gamma) - 1).abs().max() > STATIONARY:  # only the ridge made a solution exist
        return alpha, iterations, converged, True
    alpha[live] = gamma / norms
    return alpha, iterations, converged, False


def newton(cos: Tensor, start: Tensor | None = None) -> tuple[Tensor, int, bool]:
    """``(γ, iterations, converged)``: γ > 0 with γ ⊙ (Cγ) = 1, by damped Newton on ½γᵀCγ − Σ log γ from ``start``
    (default 1: exact for orthogonal gradients; damped Newton converges from any γ > 0)."""
    gamma = torch.ones(cos.shape[0], dtype=torch.float64, device=cos.device) if start is None else start.clone()
    for iteration in range(MAX_ITER):
        c_gamma = cos @ gamma
        if (gamma * c_gamma - 1).abs().max() < TOL:
            return gamma, iteration, True
        grad = c_gamma - 1 / gamma
        step = torch.linalg.solve(cos + torch.diag(gamma.pow(-2)), grad)
        decrement = math.sqrt(abs(float(grad @ step)))
        if decrement < 1e-12:  # converged to rounding
            return gamma, iteration, True
        t = 1.0 if decrement < 0.25 else 1.0 / (1.0 + decrement)
        while bool((gamma - t * step <= 0).any()):  # never needed in exact arithmetic (Dikin ellipsoid)
            t /= 2
        gamma = gamma - t * step
    return gamma, MAX_ITER, False


class NashMTL(GramianAggregation):
    """``update = Σ_t α_t g_t`` with ``GGᵀα = 1/α`` (see the module docstring)."""

    float64_sums = False  # K and the update in G's dtype, as before issue 17: the solve is on the cosines (float64)

    def __init__(self, max_norm: float = 1.0, update_weights_every: int = 1, grad_source: str = "params"):
        super().__init__(grad_source=grad_source)
        self.max_norm = checks.non_negative_number("loss.max_norm", max_norm, hint="0 disables the cap")
        self.update_weights_every = checks.positive_int("loss.update_weights_every", update_weights_every)
        self.report = SolverReport("Nash-MTL")

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        # buffers, not parameters: saved in checkpoints, never touched by the optimizer
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("alpha", torch.ones(self.num_tasks, dtype=torch.float64))
        # the last solution in cosine coordinates, γ_t = α_t·‖g_t‖ (0: none yet), where the next solve starts
        self.register_buffer("gamma", torch.zeros(self.num_tasks, dtype=torch.float64))

    def weigh(self, gram: Tensor) -> Tensor:
        if int(self.step) % self.update_weights_every == 0:
            # warm start from the last solve's γ (a buffer: a resumed run starts from the same point)
            alpha, iterations, converged, stationary = solve_nash(gram, self.gamma.cpu())
            self.alpha.copy_(alpha.to(self.alpha.device))
            self.gamma.copy_((alpha * gram.diagonal().clamp_min(0).sqrt()).to(self.gamma.device))
            fallback = (
                "0 lies in the convex hull of the task gradients (Pareto-stationary): update 0" if stationary else None
            )
            self.report.record(iterations, converged, fallback)
        self.step += 1
        alpha = self.alpha.detach().to(device=gram.device, dtype=torch.float64).clone()
        if self.max_norm > 0:
            norm = math.sqrt(max(float(alpha @ gram @ alpha), 0.0))  # ‖Σ_t α_t g_t‖, from the Gramian
            if math.isfinite(norm) and norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha

    def log_values(self) -> dict[str, Tensor]:
        return self.report.log_values()
