"""MoCo: Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective Learning:
A Provably Convergent Approach", ICLR 2023, Algorithm 1.

MGDA's weights computed from stochastic gradients are biased; MoCo tracks each task's gradient with a moving
estimate y_t (a bias correction) and moves the weights λ by one projected gradient step per training step on the
regularised min-norm objective ½‖Yᵀλ‖² + ½ρ‖λ‖²:

    Y ← Y − β_k (Y − G)                      (β_k = β / k^σβ)
    λ ← Π_simplex(λ − γ_k (YYᵀ + ρI) λ)      (γ_k = γ / k^σγ, λ_0 = 1/T)
    update = T · Yᵀλ

at training step k = 1, 2, ... . Y (T × P), λ and k are module state (buffers, saved in checkpoints).

Variant choices:
- λ is projected onto the simplex (the paper); LibMTL's port of the authors' code uses a softmax instead, and
  also replaces g_i by g_i/‖g_i‖·L_i before tracking: neither is done here (the paper's algorithm, on the raw G);
- the paper's projection of y_i onto a ball of radius L_i (a bound on the gradient) is not applied (no bound is
  known in practice; LibMTL does not apply it either);
- defaults β = 0.5, σβ = 0.5, γ = 0.1, σγ = 0.5, ρ = 0 (LibMTL's defaults for the authors' code), Y_0 = 0;
- the update is multiplied by T so it is on the scale of Σ_t L_t like every other parameter's gradient in our
  step; the weights logged are T·λ (the weights of the tracked gradients y_t, not of this step's g_t);
- ``grad_source=params`` only: the representation's gradient belongs to this batch's rows, so it cannot be
  tracked across steps (LibMTL refuses ``rep_grad`` too).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GradientAggregation
from mtl_experiments.loss.sdmgrad import project_onto_simplex
from mtl_experiments.tasks import Task


class MoCo(GradientAggregation):
    """``update = T·Yᵀλ`` with tracked gradients Y and projected-gradient weights λ (see the module docstring)."""

    grad_sources = ("params",)

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        grad_source: str = "params",
    ):
        super().__init__(grad_source=grad_source)
        self.beta = checks.fraction("loss.beta", beta, open_low=True, hint="the tracking rate of y")
        self.beta_sigma = checks.non_negative_number("loss.beta_sigma", beta_sigma, hint="beta decays as k^-sigma")
        self.gamma = checks.positive_number("loss.gamma", gamma, hint="the step of the weights lambda")
        self.gamma_sigma = checks.non_negative_number("loss.gamma_sigma", gamma_sigma, hint="gamma decays as k^-sigma")
        self.rho = checks.non_negative_number("loss.rho", rho, hint="the l2 regulariser of lambda")
        self.register_load_state_dict_pre_hook(self.resize_tracked)

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        dim = sum(p.numel() for p in model.shared_parameters()) if model is not None else 0
        self.register_buffer("y", torch.zeros(self.num_tasks, dim, dtype=torch.float64))
        self.register_buffer("lam", torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def resize_tracked(self, module, state_dict, prefix, *args) -> None:
        """Before a checkpoint loads: take its Y's shape (Y is sized at the first step when setup saw no model)."""
        saved = state_dict.get(prefix + "y")
        if saved is not None and hasattr(self, "y") and saved.shape != self.y.shape:
            self.y = torch.zeros(saved.shape, dtype=self.y.dtype, device=self.y.device)

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        g = grads.detach().to(torch.float64)
        if self.y.shape != g.shape:  # setup had no model to size Y
            self.y = torch.zeros_like(g)
        self.steps += 1
        k = float(self.steps)
        beta, gamma = self.beta / k**self.beta_sigma, self.gamma / k**self.gamma_sigma
        self.y -= beta * (self.y - g)
        gram = (self.y @ self.y.T).cpu()
        lam = self.lam.detach().cpu()
        lam = project_onto_simplex(lam - gamma * (gram @ lam + self.rho * lam))
        self.lam.copy_(lam)
        weights = g.shape[0] * self.lam
        return (weights @ self.y).to(grads.dtype), weights.to(grads.dtype)

    def log_values(self) -> dict[str, Tensor]:
        """λ on the simplex, as ``moco/lambda/<task>``."""
        if not hasattr(self, "lam"):
            return {}
        return {f"moco/lambda/{name}": self.lam[i].float() for i, name in enumerate(self.task_names)}
