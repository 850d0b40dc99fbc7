"""MGDA (Sener & Koltun 2018; Wolfe's exact min-norm-point solver) against hand-computed min-norm points.

Expected values are worked out by hand in the comments (or by an independent brute-force algorithm);
none is copied from running the code under test.
"""

from __future__ import annotations

import pytest
import torch

from mtl_experiments.tasks import build_tasks
from tests.loss.helpers import THREE, ill_conditioned
from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load

TASKS = {t: build_tasks({f"t{i}": {"kind": "binary"} for i in range(t)}) for t in range(2, 6)}


@pytest.mark.parametrize(
    ("g", "weights", "update"),
    [
        # symmetric pair: the midpoint (0.5, 0.5) is the closest point of the segment to the origin
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], [0.5, 0.5]),
        # ‖γ(1,0) + (1-γ)(1,1)‖² = 1 + (1-γ)² is smallest at γ = 1: g1 itself
        ([[1.0, 0.0], [1.0, 1.0]], [1.0, 0.0], [1.0, 0.0]),
        # γ² + 4(1-γ)² is smallest where 2γ = 8(1-γ): γ = 0.8 → (0.8, 0.4)
        ([[1.0, 0.0], [0.0, 2.0]], [0.8, 0.2], [0.8, 0.4]),
    ],
)
def test_mgda_min_norm_point_of_a_pair(g, weights, update):
    got_update, got_weights = load("mgda").aggregate(tensor(g))
    assert torch.allclose(got_weights, tensor(weights), atol=1e-12)
    assert torch.allclose(got_update, tensor(update), atol=1e-12)


def test_mgda_three_tasks_within_frank_wolfe_tolerance():
    """(1,1) is dominated: the min-norm point of the hull of (1,0), (0,1), (1,1) is (0.5, 0.5). (Written for the
    Frank-Wolfe solver stopped at epsilon=1e-3; Wolfe's exact solver meets the same bounds.) The min-norm
    optimality condition ⟨d, g_t⟩ ≥ ‖d‖² holds to the same accuracy."""
    g = tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    update, weights = load("mgda").aggregate(g)
    assert torch.allclose(update, tensor([0.5, 0.5]), atol=1e-2)
    assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0).all()
    assert (g @ update >= update.dot(update) - 1e-2).all()


def interior_min_norm_weights(g: torch.Tensor) -> torch.Tensor:
    """The min-norm point when every weight is positive: A w = μ1 with Σw = 1, so w ∝ A⁻¹1 (float64)."""
    a = g.double() @ g.double().T
    x = torch.linalg.solve(a, torch.ones(a.shape[0], dtype=torch.float64))
    return x / x.sum()


def test_mgda_issue_14_float32_reaches_the_min_norm_point():
    """Issue 14: Frank-Wolfe stopped at epsilon 1e-3 gave weights (0.8495, 0.1312, 0.0193) and J·d = (-1.92, 15.19,
    0.37), raising task 1's loss. The min-norm point is interior (A⁻¹1 > 0), so J·d* = ‖d*‖² for every task:
    0.1183 each."""
    g = torch.tensor([[-4.0, 4.0, -5.0], [30.0, 20.0, -40.0], [0.0, -300.0, 500.0]])
    w = load("mgda", THREE)
    update, weights = w.aggregate(g)
    expected = interior_min_norm_weights(g)
    assert (expected > 0).all()
    assert torch.allclose(weights.double(), expected, rtol=1e-4)
    assert (g.double() @ update.double()).tolist() == pytest.approx([0.1183] * 3, abs=1e-4)
    logged = w.log_values()
    assert logged["weighting/converged"] == 1 and logged["weighting/fallback"] == 0
    assert 1 <= logged["weighting/iterations"] <= 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mgda_never_conflicts_on_1000_random_jacobians(dtype):
    """MGDA's promise: g_tᵀd ≥ ‖d‖² ≥ 0 for every task (the issue found 7 of 200 conflicting, cosine down to -0.55).
    Norms spread over six decades: solved on the Gramian, seed 186 missed by 1.4e-4·‖d‖² on CI's CPU and seeds up
    to 4000 by as much as 50·‖d‖²; on the QR coordinates the worst of 20,000 seeds is 1e-6·‖d‖²; on the coordinates
    of the norm-scaled Gramian (issue 17: the norms divided out before the factorisation) no seed of 20,000 falls
    short of ‖d‖² by more than the slack below, float32 or float64, and every solve converges."""
    w = {t: load("mgda", TASKS[t]) for t in TASKS}
    for seed in range(1000):
        t = 2 + seed % 4
        g = ill_conditioned(seed, t, 3 + seed % 5).to(dtype)
        update, weights = w[t].aggregate(g)
        g64, u64 = g.double(), update.double()
        assert (weights >= 0).all() and float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
        assert w[t].log_values()["weighting/converged"] == 1, seed
        if u64.norm() <= 1e-6 * g64.norm(dim=1).max():  # 0 in the hull (T > P): d = 0 up to rounding, no direction
            continue
        slack = (1e-4 if dtype == torch.float32 else 1e-9) * g64.norm(dim=1) * u64.norm()
        assert (g64 @ u64 >= u64 @ u64 - slack - 1e-4 * (u64 @ u64)).all(), (seed, (g64 @ u64).tolist())
