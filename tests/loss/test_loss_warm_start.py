"""Warm-started aggregation solvers (issue 17): MGDA (Wolfe), UPGrad (Lawson–Hanson), CAGrad (SLSQP), Nash-MTL
(Newton) and FairGrad (least squares) start each solve from the previous step's solution, kept in a buffer.

The defining property, on sequences of slowly moving random Jacobians (as in training), float32 and float64: the
warm-started instance gives the solution a fresh (cold) instance gives, within the solver's tolerance, in fewer
iterations in total; and a copy restored from its ``state_dict`` mid-sequence continues identically (resume).
"""

from __future__ import annotations

import pytest
import torch

from tests.loss.property_testers import fresh, tolerance

WARM = ("mgda", "upgrad", "cagrad", "nash_mtl", "fairgrad")
DTYPES = (torch.float32, torch.float64)
# CAGrad's SLSQP stops when the dual objective changes by < ftol = 1e-14 (absolute, on the scale-free Gramian), where
# the objective is flat: two starts stop at objectives 3e-15 apart with w* 3e-8 apart and updates 4e-6 apart
# (relative); the worst improvement min_t g_tᵀd, CAGrad's own criterion, is compared as well
SOLVER_TOL = {"cagrad": 1e-4}


def trajectory(seed: int, dtype: torch.dtype, steps: int = 8) -> list[torch.Tensor]:
    """``steps`` Jacobians [T, P] (T = 2..5, P = T + 3) drifting by ~2% of their size per step, norms over 1e-2..1e2."""
    gen = torch.Generator().manual_seed(seed)
    t = 2 + seed % 4
    g = torch.randn(t, t + 3, generator=gen, dtype=torch.float64) + torch.randn(
        t + 3, generator=gen, dtype=torch.float64
    )
    scale = 10 ** (4 * torch.rand(t, 1, generator=gen, dtype=torch.float64) - 2)
    out = []
    for _ in range(steps):
        out.append((g / g.norm(dim=1, keepdim=True) * scale).to(dtype))
        g = g + 0.02 * g.norm(dim=1, keepdim=True) / (t + 3) ** 0.5 * torch.randn(g.shape, generator=gen, dtype=g.dtype)
    return out


def iterations(w) -> float:
    return float(w.log_values()["weighting/iterations"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", WARM)
def test_warm_start_gives_the_cold_solution_in_fewer_iterations(name, dtype):
    tol = 1e-3 if dtype == torch.float32 else SOLVER_TOL.get(name, 1e-6)
    warm_total = cold_total = 0.0
    for seed in range(4):
        path = trajectory(seed, dtype)
        warm = fresh(name, path[0].shape[0])
        for k, g in enumerate(path):
            cold = fresh(name, g.shape[0])
            u_cold, _ = cold.aggregate(g)
            u_warm, _ = warm.aggregate(g)
            scale = float(g.double().norm())
            assert float((u_warm.double() - u_cold.double()).norm()) <= tol * scale, (name, seed, k)
            worst_warm, worst_cold = (float((g.double() @ u.double()).min()) for u in (u_warm, u_cold))
            assert abs(worst_warm - worst_cold) <= tolerance(g) * scale**2  # the property tests' tolerance
            if k > 0:  # the first solve of both is cold
                warm_total, cold_total = warm_total + iterations(warm), cold_total + iterations(cold)
    assert warm_total < cold_total, (name, warm_total, cold_total)


@pytest.mark.parametrize("name", WARM)
def test_warm_start_state_resumes_exactly(name):
    """A copy loaded from the ``state_dict`` after 4 steps continues with the same updates, bit for bit."""
    path = trajectory(1, torch.float32)
    w = fresh(name, path[0].shape[0])
    for g in path[:4]:
        w.aggregate(g)
    resumed = fresh(name, path[0].shape[0])
    resumed.load_state_dict(w.state_dict())
    for g in path[4:]:
        assert torch.equal(w.aggregate(g)[0], resumed.aggregate(g)[0])
