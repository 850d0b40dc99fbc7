"""Aligned-MTL (Senushkin et al. 2023, through TorchJD) against hand-computed cases.

Expected values are worked out by hand in the comments (or by an independent brute-force algorithm);
none is copied from running the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.loss.helpers import F64
from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load


def test_aligned_mtl_orthogonal_gradients_are_scaled_to_the_smallest_singular_value():
    """g1 = (3, 0), g2 = (0, 1): singular values 3 and 1. Aligned: both rescaled to σ_min = 1, i.e.
    ĝ1 = (1, 0), ĝ2 = (0, 1); B = σ_min·diag(1/3, 1); with w = 1/2 each: α = Bw = (1/6, 1/2),
    update = (ĝ1 + ĝ2)/2 = (0.5, 0.5)."""
    update, weights = load("aligned_mtl").aggregate(tensor([[3.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(weights, tensor([1 / 6, 1 / 2])) and torch.allclose(update, tensor([0.5, 0.5]))


def test_aligned_mtl_aligned_gramian_is_lambda_min_times_identity():
    """g1 = (1, 0), g2 = (1, 1): G = [[1, 1], [1, 2]], eigenvalues (3 ± √5)/2. The aligned Jacobian BJ has
    every singular value σ_min, i.e. B G Bᵀ = λ_min·I with λ_min = (3 - √5)/2; columns of B via w = e_i."""
    g = tensor([[1.0, 0.0], [1.0, 1.0]])
    w = load("aligned_mtl")
    columns = []
    for i in range(2):
        w.aggregator.pref_vector = torch.eye(2, dtype=F64)[i]
        columns.append(w.aggregate(g)[1])
    b = torch.stack(columns, dim=1)
    assert torch.allclose(b @ g @ g.T @ b.T, (3 - math.sqrt(5)) / 2 * torch.eye(2, dtype=F64))
    w.aggregator.pref_vector = None  # back to 1/T: the update is the mean of the aligned gradients
    assert torch.allclose(w.aggregate(g)[0], (b @ g).mean(0))


def aligned_by_svd(g: torch.Tensor) -> torch.Tensor:
    """An independent Aligned-MTL update in float64: with J = U Σ Wᵀ, BJ = σ_min·U Wᵀ (every singular value set to
    the smallest), and the update is the mean of its rows (w = 1/T)."""
    u, s, wt = torch.linalg.svd(g.double(), full_matrices=False)
    return (s.min() * u @ wt).mean(0)


def test_aligned_mtl_on_float32_gradients_keeps_every_component():
    """Issue 14: in float32 TorchJD's rank cut-off (T·eps·λ_max) dropped the smaller principal component.
    J = [[1, 0], [-1000, 1]]: the old code gave d = (-499.5, 0.4995), J·d = (-499.5, 4.995e5); the exact update is
    d ≈ (-0.000499, 0.000501). J = [[1, 0], [0, 3000]]: orthogonal rows, U Wᵀ = I and σ_min = 1, so d = (0.5, 0.5)
    (the old code gave (0, 1500))."""
    g = torch.tensor([[1.0, 0.0], [-1000.0, 1.0]])
    update, _ = load("aligned_mtl").aggregate(g)
    assert update.dtype == torch.float32
    assert update.tolist() == pytest.approx([-0.000499, 0.000501], abs=1e-6)
    assert torch.allclose(update.double(), aligned_by_svd(g), rtol=1e-5, atol=1e-9)
    update, _ = load("aligned_mtl").aggregate(torch.tensor([[1.0, 0.0], [0.0, 3000.0]]))
    assert update.tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
