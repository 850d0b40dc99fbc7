"""DB-MTL (Dual-Balancing): Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023
(arXiv:2308.12029), Algorithm 1.

1. Loss-scale balancing: every task is trained on log(L_t + ε), whose gradient is ∇L_t / (L_t + ε), so a task's
   loss scale no longer sets its gradient's.
2. Gradient-magnitude balancing: an EMA of each task's log-loss gradient,
   m_t ← g_t + β_k·(m_t − g_t) (m_t = 0 at the start, β_k = β / k^σ at step k), and the update
   d = Σ_t (max_i ‖m_i‖ / ‖m_t‖)·m_t: every task contributes with the largest task's gradient norm.

Variant (the authors' code, as in LibMTL; β = 0.9, σ = 0 its defaults): the real backward is of Σ_t log(L_t + ε),
so towers and heads get the log-loss gradients, and the shared parameters then get d. Only ``grad_source=params``
(the EMA lives in parameter space; LibMTL also refuses representation gradients). A zero m_t contributes nothing
(the authors divide by ‖m_t‖ + 1e-8; here exactly 0, so d scales with the gradients). m and k are module state
(``get_extra_state``: m is sized at the first step), so resume continues exactly.

``train/weight/*`` are the multipliers of ∇L_t: the least-squares weights of d on the current log-loss gradients
(exact at the first step, where m = (1 − β)·g), divided by L_t + ε.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GradientAggregation, effective_weights


class DBMTL(GradientAggregation):
    grad_sources = ("params",)

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8, grad_source: str = "params"):
        super().__init__(grad_source=grad_source)
        self.beta = checks.fraction("loss.beta", beta, open_high=True, hint="the EMA factor; the authors use 0.9")
        hint = "β_k = β / k^σ; the authors use 0 (a constant β)"
        self.beta_sigma = checks.non_negative_number("loss.beta_sigma", beta_sigma, hint=hint)
        self.eps = checks.positive_number("loss.eps", eps, hint="added to each loss inside the log; default 1e-8")
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.ema: Tensor | None = None  # [T, P] in float64, sized at the first step

    def backward(self, losses, task_grads, shared_params, backward_fn):
        scale = losses.detach() + self.eps  # ∇log(L + ε) = ∇L / (L + ε)
        log_total = torch.log(losses + self.eps).sum()
        if task_grads is not None:
            task_grads = task_grads / scale.to(task_grads.dtype).unsqueeze(1)
        # the base runs the one backward and writes d into the shared parameters; its backward is of Σ log(L + ε)
        weights = super().backward(
            losses, task_grads, shared_params, lambda _, exclude=(): backward_fn(log_total, exclude=exclude)
        )
        return (weights / scale.to(weights.dtype)).detach()

    @torch.no_grad()
    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        g = grads.detach().to(torch.float64)
        if self.ema is None or self.ema.shape != g.shape:
            self.ema = torch.zeros_like(g)
            self.step.zero_()
        self.step += 1
        beta = self.beta / float(self.step) ** self.beta_sigma
        self.ema = g + beta * (self.ema.to(g.device) - g)
        norms = self.ema.norm(dim=1)
        scales = torch.where(norms > 0, norms.max() / norms.clamp_min(1e-300), 0.0)
        update = scales @ self.ema
        return update.to(grads.dtype), effective_weights(g, update).to(grads.dtype)

    def get_extra_state(self) -> dict:
        return {"ema": self.ema if self.ema is not None else torch.zeros(0, 0, dtype=torch.float64)}

    def set_extra_state(self, state: dict) -> None:
        ema = state["ema"]
        self.ema = ema.clone() if ema.numel() else None
