"""IMTL-G: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, §3.2 (gradient balance).

Find weights α with Σ_t α_t = 1 such that the update g = Σ_t α_t g_t has equal projections onto every
task's unit gradient u_t = g_t/‖g_t‖: gᵀu_1 = gᵀu_t for all t. The paper's closed form is
α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ_{t≥2} α_t, with rows U_t = u_1 − u_t and D_t = g_1 − g_t.
Equivalently J g = G α ∝ (‖g_t‖)_t, i.e. α ∝ G⁻¹‖g‖ (G = J Jᵀ). We solve it in cosine coordinates:
with N = diag(‖g_t‖) and K = N⁻¹GN⁻¹ (the cosine matrix), α ∝ N⁻¹ K⁺ 1, then Σα = 1.

Why not TorchJD 0.18's ``IMTLG`` (α ∝ pinv(G)‖g‖ in the Jacobian's dtype): ``pinv`` drops eigenvalues of
G below T·eps·λ_max, so in float32 (our gradients) once two tasks' gradient norms differ by ~1e4 the
smaller task is cut out and the projections are no longer equal (J = [[1, .3, 0], [0, 1e-4, .5e-4]]
gives projections 1.04 and 0.27). IMTL-G's point is invariance to loss scales; in cosine coordinates
the eigenvalues do not depend on the norms at all, and we solve in float64.

Variant: IMTL-G only (IMTL-L's learned loss scales and the hybrid IMTL are not included). The paper
computes g_t on the shared feature z (as MGDA-UB): ``loss.grad_source=representation``; the default
``params`` uses the shared parameters. With linearly dependent gradients (K singular, where the paper's
inverse does not exist) K⁺1 is the minimum-norm solution x of Kx = 1; a zero gradient gets weight 0.
If Σ_t α_t cannot be made 1 (the equal-projection direction has zero total weight), the update is 0,
as in TorchJD.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_experiments.loss.base import GramianAggregation


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G's α from the Gramian ``G = J Jᵀ`` (float64): equal projections onto the unit gradients, Σα = 1."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    weights = torch.zeros_like(norms)
    idx = (norms > 0).nonzero().flatten()
    if idx.numel() == 0:
        return weights
    n = norms[idx]
    cos = gram[idx][:, idx] / torch.outer(n, n)
    v = torch.linalg.pinv(cos, hermitian=True) @ torch.ones_like(n) / n
    total = v.sum()
    if total.abs() > 1e-12 * v.abs().sum():
        weights[idx] = v / total
    return weights


class IMTLG(GramianAggregation):
    """``update = Σ_t α_t g_t`` with equal projections onto the unit task gradients and Σα = 1."""

    def weigh(self, gram: Tensor) -> Tensor:
        return imtl_g_weights(gram)
