"""SDMGrad: Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms", NeurIPS 2023 (arXiv:2305.18409), Algorithm 1.

Direction-oriented MGDA: the update stays near the average gradient g_0 = (1/T) Σ_t g_t. Its dual is

    w* = argmin_{w ∈ simplex} ½‖G ᵀw + λ g_0‖²,      update ∝ (Gᵀw* + λ g_0)/(1 + λ)

(λ = 0: MGDA's min-norm point; λ → ∞: the mean gradient). The weights on the simplex are found as in the
authors' code: ``iterations`` steps of SGD with momentum on the dual, each followed by the Euclidean projection
onto the simplex, warm-started from the previous step's w (kept as module state, saved in checkpoints), with
the Gramian divided by the squared mean gradient norm so that ``lr`` does not depend on the gradients' scale.

Variant choices:
- the full-gradient version: the dual uses the Gramian G Gᵀ of this batch's gradients and the update uses the
  same G (the paper's stochastic version draws three independent batches ξ, ξ', ζ; objective sampling,
  SDMGrad-OS, is not implemented);
- ``lamda`` 0.3, ``lr`` 10, ``momentum`` 0.5, ``iterations`` 20: the authors' experiments and TorchJD's
  ``SDMGradWeighting`` defaults (LibMTL uses lr 5); preference w̃ = 1/T (the average gradient);
- scale normalisation without the reference's ``+ 1e-8`` (which makes tiny gradients take smaller inner steps);
  all gradients zero: w stays and the update is 0;
- the weights are multiplied by T, so the update is on the scale of Σ_t L_t like every other parameter's
  gradient in our step (λ → ∞ gives exactly ``equal``): weights = T·(w* + λ/T)/(1 + λ).
Matches TorchJD 0.18's ``SDMGradWeighting`` on G Gᵀ (up to the factor T; tests/loss/test_loss_sdmgrad.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GramianAggregation
from mtl_experiments.tasks import Task


def project_onto_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of ``v`` onto {w >= 0, Σw = 1} (sort-based; Duchi et al., ICML 2008)."""
    u, _ = torch.sort(v, descending=True)
    cumulative = u.cumsum(0) - 1.0
    ks = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int((u - cumulative / ks > 0).nonzero().max())
    return (v - cumulative[rho] / (rho + 1)).clamp_min(0)


class SDMGrad(GramianAggregation):
    """``update = T·(Gᵀw* + λ g_0)/(1 + λ)`` (see the module docstring)."""

    def __init__(
        self,
        lamda: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        iterations: int = 20,
        grad_source: str = "params",
    ):
        super().__init__(grad_source=grad_source)
        self.lamda = checks.non_negative_number("loss.lamda", lamda, hint="0: MGDA; large: the mean gradient")
        self.lr = checks.positive_number("loss.lr", lr, hint="the inner SGD's step on the simplex weights")
        self.momentum = checks.fraction("loss.momentum", momentum, open_high=True)
        self.iterations = checks.positive_int("loss.iterations", iterations, hint="inner SGD steps per training step")

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        self.register_buffer("w", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))

    def solve(self, gram: Tensor) -> Tensor:
        """``iterations`` projected SGD steps on the dual from the stored w (float64); stores and returns w."""
        T = gram.shape[0]
        scale = gram.diagonal().clamp_min(0).sqrt().mean() ** 2
        a = gram / scale if scale > 0 else torch.zeros_like(gram)
        target = torch.full((T,), self.lamda / T, dtype=gram.dtype)
        w = self.w.detach().to(device="cpu", dtype=gram.dtype)
        velocity = torch.zeros_like(w)
        for _ in range(self.iterations):
            velocity = self.momentum * velocity + a @ (w + target)
            w = project_onto_simplex(w - self.lr * velocity)
        self.w.copy_(w)
        return w

    def weigh(self, gram: Tensor) -> Tensor:
        T = gram.shape[0]
        w = self.solve(gram)
        return T * (w + self.lamda / T) / (1 + self.lamda)

    def log_values(self) -> dict[str, Tensor]:
        """The dual weights w* on the simplex, as ``sdmgrad/w/<task>``."""
        if not hasattr(self, "w"):
            return {}
        return {f"sdmgrad/w/{name}": self.w[i].float() for i, name in enumerate(self.task_names)}
