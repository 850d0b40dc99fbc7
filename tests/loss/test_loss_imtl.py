"""IMTL-G (Liu et al. 2021) against hand-computed cases and the paper's closed form.

Expected values are worked out by hand in the comments (or by an independent brute-force algorithm);
none is copied from running the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.loss.helpers import F64, ill_conditioned
from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load


def test_imtl_by_hand_orthogonal():
    """g1 = (1, 0), g2 = (0, 2): G = diag(1, 4), ‖g‖ = (1, 2), G⁻¹‖g‖ = (1, 1/2) → α = (2/3, 1/3);
    update = (2/3, 2/3), whose projections onto u1 = (1, 0) and u2 = (0, 1) are both 2/3."""
    update, weights = load("imtl").aggregate(tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(weights, tensor([2 / 3, 1 / 3])) and torch.allclose(update, tensor([2 / 3, 2 / 3]))


def test_imtl_by_hand_conflicting():
    """g1 = (1, 0), g2 = (-1, 1): G = [[1, -1], [-1, 2]], G⁻¹ = [[2, 1], [1, 1]], ‖g‖ = (1, √2);
    G⁻¹‖g‖ = (2 + √2, 1 + √2), sum (1 + √2)² → α = (2 - √2, √2 - 1), update = (3 - 2√2, √2 - 1);
    projections: ⟨update, u1⟩ = 3 - 2√2, ⟨update, u2⟩ = (-(3 - 2√2) + √2 - 1)/√2 = 3 - 2√2."""
    g = tensor([[1.0, 0.0], [-1.0, 1.0]])
    update, weights = load("imtl").aggregate(g)
    r2 = math.sqrt(2)
    assert torch.allclose(weights, tensor([2 - r2, r2 - 1]))
    assert torch.allclose(update, tensor([3 - 2 * r2, r2 - 1]))
    assert torch.allclose(g @ update / g.norm(dim=1), torch.full((2,), 3 - 2 * r2, dtype=F64))


@pytest.mark.parametrize("num_tasks", [3, 4])
def test_imtl_matches_the_papers_closed_form(num_tasks):
    """α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 - Σ α_{2:T}, U_t = u_1 - u_t, D_t = g_1 - g_t (Liu et al. 2021, §3.2)."""
    g = ill_conditioned(num_tasks, num_tasks, 9)
    u = g / g.norm(dim=1, keepdim=True)
    diff_u, diff_g = u[0] - u[1:], g[0] - g[1:]
    rest = g[0] @ diff_u.T @ torch.linalg.inv(diff_g @ diff_u.T)
    expected = torch.cat([1 - rest.sum().unsqueeze(0), rest])
    _, weights = load("imtl").aggregate(g)
    assert torch.allclose(weights, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("ratio", [1e2, 1e4, 1e6])
def test_imtl_equal_projections_in_float32_whatever_the_norm_ratio(ratio):
    """TorchJD 0.18's IMTLG loses the small task here from ratio 1e4 on (projections 1.04 vs 0.27)."""
    g = torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0 / ratio, 0.5 / ratio]])
    update, _ = load("imtl").aggregate(g)
    proj = g.double() @ update.double() / g.double().norm(dim=1)
    assert proj[0].item() == pytest.approx(proj[1].item(), rel=1e-5)


def test_imtl_direction_does_not_depend_on_loss_scales():
    g = ill_conditioned(3, 3, 6)
    scaled = g * tensor([1.0, 1e3, 1e-2]).unsqueeze(1)  # losses multiplied by 1, 1000, 0.01
    a, b = load("imtl").aggregate(g)[0], load("imtl").aggregate(scaled)[0]
    assert torch.allclose(a / a.norm(), b / b.norm(), atol=1e-10)
