"""Aligned-MTL (Senushkin et al. 2023, through TorchJD) against hand-computed cases.

Expected values are worked out by hand in the comments (or by an independent brute-force algorithm);
none is copied from running the code under test.
"""

from __future__ import annotations

import math

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
