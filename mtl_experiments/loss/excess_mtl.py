"""ExcessMTL: He, Zhou, Zhao & Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024 (arXiv:2402.02009),
Algorithm 1.

Tasks are weighted by their estimated excess risk (loss above the task's irreducible, e.g. label-noise, risk), so a
noisy task whose loss stays high but cannot improve is not up-weighted as loss-based weighting would. Per step,
with the task gradient g_t and a diagonal Hessian approximation H_t = diag(sqrt(Σ_steps g_t² + 1e-7)) (Adagrad's
accumulator, eq. 7), the excess risk estimate (eq. 6) is

    E_t = g_tᵀ H_t⁻¹ g_t,

normalised by the task's baseline E_t(0) (scale processing, §3.2), and the weights follow an exponentiated-gradient
step (eq. 9), renormalised to sum to T (as the authors' code; the paper's simplex times T):

    w_t ← T · w_t·exp(η·E_t/E_t(0)) / Σ_i w_i·exp(η·E_i/E_i(0)),      total = Σ_t w_t·L_t.

Variant and simplifications: the baseline E_t(0) is the mean estimate over the first ``warmup_steps`` steps, during
which w = 1 (``warmup_steps = 1``: the first step's, as the authors' and LibMTL's code; the paper's appendix C.1
averages 3 epochs). A task whose baseline is 0 (an exactly zero gradient throughout the warm-up) has no measurable
excess risk: its E_t/E_t(0) counts as 0. The update is done in log space (no overflow), the statistics in
float64. The per-task gradients are those of the shared parameters, not the whole model's as in the paper (only
``grad_source=params``: the Adagrad accumulator needs the same coordinates every step, which the per-row gradients
of a representation are not). Weights apply to the losses (one backward of Σ_t w_t·L_t, towers and heads
included), as in the authors' code. State (the [T, P] accumulator, sized at the first step, the baseline and the
weights) is module state, so resume continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GradientAggregation
from mtl_experiments.tasks import Task

HESSIAN_EPS = 1e-7  # inside the square root of the accumulator (the authors' code)


class ExcessMTL(GradientAggregation):
    grad_sources = ("params",)

    def __init__(self, robust_step_size: float = 0.01, warmup_steps: int = 1, grad_source: str = "params"):
        super().__init__(grad_source=grad_source)
        hint = "η of the exponentiated weight update; LibMTL's default is 0.01"
        self.robust_step_size = checks.positive_number("loss.robust_step_size", robust_step_size, hint=hint)
        hint = "steps whose estimates average into the baseline (1: the authors' code)"
        self.warmup_steps = checks.positive_int("loss.warmup_steps", warmup_steps, hint=hint)
        self.sq_grad_sum: Tensor | None = None  # [T, P] float64, sized at the first step

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        t = self.num_tasks
        self.register_buffer("log_weights", torch.zeros(t, dtype=torch.float64))  # log(w/T)+const: w = T·softmax
        self.register_buffer("baseline_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor:
        return self.num_tasks * torch.softmax(self.log_weights, dim=0)

    def backward(self, losses, task_grads, shared_params, backward_fn):
        if task_grads is not None and task_grads.shape[1] > 0:
            self.update_weights(task_grads)
        weights = self.weights().to(device=losses.device, dtype=losses.dtype)
        backward_fn((weights * losses).sum())
        return weights.detach()

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        """The weights after this step's update, and Σ_t w_t g_t (what the one backward gives the shared part)."""
        weights = self.update_weights(grads).to(grads.dtype)
        return weights @ grads.detach(), weights

    @torch.no_grad()
    def update_weights(self, grads: Tensor) -> Tensor:
        g2 = grads.detach().to(torch.float64) ** 2
        if self.sq_grad_sum is None or self.sq_grad_sum.shape != g2.shape:
            self.sq_grad_sum = torch.zeros_like(g2)
        self.sq_grad_sum = self.sq_grad_sum.to(g2.device) + g2
        excess = (g2 / torch.sqrt(self.sq_grad_sum + HESSIAN_EPS)).sum(dim=1).to(self.log_weights.device)
        self.step += 1
        if int(self.step) <= self.warmup_steps:
            self.baseline_sum += excess
            return self.weights()
        baseline = self.baseline_sum / self.warmup_steps
        ratio = torch.where(baseline > 0, excess / baseline.clamp_min(1e-300), 0.0)
        self.log_weights.copy_(torch.log_softmax(self.log_weights + self.robust_step_size * ratio, dim=0))
        return self.weights()

    def get_extra_state(self) -> dict:
        empty = torch.zeros(0, 0, dtype=torch.float64)
        return {"sq_grad_sum": self.sq_grad_sum if self.sq_grad_sum is not None else empty}

    def set_extra_state(self, state: dict) -> None:
        acc = state["sq_grad_sum"]
        self.sq_grad_sum = acc.clone() if acc.numel() else None
