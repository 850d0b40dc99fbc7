"""ConFIG: Liu, Chen & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
ICLR 2025 (arXiv:2408.11104), Eq. 2.

With the unit task gradients ĝ_i = g_i/‖g_i‖ stacked in U[T, P], the direction with the same cosine to every
task gradient and its length are

    d = U⁺·1,   d_u = d/‖d‖,   update = (Σ_i g_iᵀd_u)·d_u.

When the gradients are linearly independent, U·d = 1: every task gets the same positive cosine, so the update
conflicts with none. With more tasks than dimensions (or dependent gradients) U·d is the projection of 1 onto
U's range and some cosine may be negative (no conflict-free direction exists when 0 is inside the hull).

Computed on the T×T cosine matrix K = UUᵀ in float64 (U⁺ = UᵀK⁺, so d = Uᵀ·K⁺1 and ‖d‖² = 1ᵀK⁺1): the update
is Σ_t w_t g_t with the exact weights w = (Σ_i g_iᵀd_u)·D⁻¹K⁺1/‖d‖, D = diag(‖g_t‖). Variant choices:
- preference vector 1 (the paper's and TorchJD's default);
- eigenvalues of K below 1e-12 of the largest count as zero (singular values of U below 1e-6): float64 rounding
  of an exactly singular K (T > P) would otherwise be inverted;
- a task whose gradient is exactly zero has no direction: its row of U is 0 (as TorchJD's ``nan_to_num``);
- when d vanishes (exactly opposite gradients: 1 ⟂ range(U)) there is no direction and the update is 0.
Matches TorchJD 0.18's ``ConFIG`` (tests/loss/test_loss_config.py) on random inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_experiments.loss.base import GradientAggregation

RTOL = 1e-12  # relative eigenvalue cut-off of the pseudo-inverse of K (see the module docstring)


def config_weights(gram: Tensor) -> Tensor:
    """ConFIG's weights ``w`` (update = wᵀG) from the Gramian ``G Gᵀ`` (float64)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    cos = gram * torch.outer(inv, inv)
    coef = torch.linalg.pinv(cos, rtol=RTOL, hermitian=True) @ torch.ones_like(norms)  # K⁺1
    sq_norm = float(coef @ cos @ coef)  # ‖d‖² = 1ᵀK⁺KK⁺1
    if not sq_norm > 1e-24:
        return torch.zeros_like(norms)
    direction = inv * coef / sq_norm**0.5  # d_u = Gᵀ·direction
    length = (gram @ direction).sum()  # Σ_i g_iᵀd_u
    return length * direction


class ConFIG(GradientAggregation):
    """``update = (Σ_i g_iᵀd_u)·d_u`` with ``d_u`` the unit vector of ``U⁺1`` (see the module docstring)."""

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        g = grads.detach().to(torch.float64)
        weights = config_weights(g @ g.T)
        return (weights @ g).to(grads.dtype), weights.to(grads.dtype)
