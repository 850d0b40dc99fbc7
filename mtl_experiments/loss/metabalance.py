"""MetaBalance: He, Feng, Lv, Wang, Liu, Zhang & Yao, "MetaBalance: Improving Multi-Task Recommendations via Adapting
Gradient Magnitudes of Auxiliary Tasks", WWW 2022, Algorithm 1.

One task is the target, the others are auxiliary. For each shared component k, with moving averages of the gradient
norms m_i ← β m_i + (1 − β)‖g_i‖ (m_0 = 0), every auxiliary gradient is pulled towards the target's magnitude:

    g_aux ← g_aux · (r · m_target / m_aux + (1 − r)),       update = g_target + Σ_aux g_aux

with the relax factor r ∈ [0, 1] (0: Σ_t g_t; 1: every auxiliary gradient at the target's average magnitude).

Variant choices:
- ``strategy``: the paper's three: ``both`` (adapt every auxiliary gradient, torch-rechub's only mode and the
  default), ``reduce`` (only those larger than the target's), ``enlarge`` (only those smaller);
- ``granularity``: ``all_matrix`` treats every shared parameter tensor as its own component with its own norms
  (torch-rechub's ``MetaBalance`` optimizer, which scales each parameter's gradient), ``whole_model`` all shared
  parameters as one vector;
- r = 0.7 and β = 0.9 (torch-rechub's defaults); ``target_task`` names the target (default: the first task);
- m_aux = 0 (an auxiliary task with no gradient yet) leaves that gradient as it is (torch-rechub divides by
  m_aux + 1e-5, which depends on the gradients' scale); the target's own gradient is never rescaled.
The norms are module state (``norms[components, T]``, saved in checkpoints). The weight logged for task t is the
factor its gradient was scaled by (with several components, their mean weighted by ‖g_kt‖²), not a least-squares
fit: a target task's weight is exactly 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GradientAggregation
from mtl_experiments.tasks import Task

STRATEGIES = ("both", "reduce", "enlarge")
GRANULARITIES = ("all_matrix", "whole_model")


class MetaBalance(GradientAggregation):
    """``update = Σ_t c_t g_t`` per component, c_target = 1 (see the module docstring)."""

    def __init__(
        self,
        relax_factor: float = 0.7,
        beta: float = 0.9,
        strategy: str = "both",
        granularity: str = "all_matrix",
        target_task: str | None = None,
        grad_source: str = "params",
    ):
        super().__init__(grad_source=grad_source)
        self.relax_factor = checks.fraction("loss.relax_factor", relax_factor, hint="0: no adaptation, 1: full")
        self.beta = checks.fraction("loss.beta", beta, open_high=True, hint="the moving average's decay")
        self.strategy = checks.choice("loss.strategy", strategy, STRATEGIES)
        self.granularity = checks.choice("loss.granularity", granularity, GRANULARITIES)
        self.target_task = target_task
        self.sizes: list[int] | None = None  # sizes of the components within a row of G

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        hint = "the task whose gradient magnitude the others follow; null: the first"
        self.target = self.task_names.index(
            checks.optional(checks.choice, "loss.target_task", self.target_task, self.task_names, hint=hint)
            or self.task_names[0]
        )
        if model is not None and self.granularity == "all_matrix" and self.grad_source == "params":
            self.sizes = [p.numel() for p in model.shared_parameters()]
        components = len(self.sizes) if self.sizes else 1
        self.register_buffer("norms", torch.zeros(components, self.num_tasks, dtype=torch.float64))

    def task_grad_inputs(self, model) -> list[Tensor]:
        inputs = super().task_grad_inputs(model)
        if self.granularity == "all_matrix" and self.grad_source == "params":
            self.sizes = [t.numel() for t in inputs]
        return inputs

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        fits = self.sizes and sum(self.sizes) == grads.shape[1]
        parts = list(torch.split(grads, self.sizes, dim=1)) if fits else [grads]
        if self.norms.shape[0] != len(parts):  # only when setup() had no model to size the components
            self.norms = torch.zeros(len(parts), grads.shape[0], dtype=torch.float64, device=self.norms.device)
        norms = torch.stack([p.detach().double().norm(dim=1) for p in parts])  # [K, T]
        self.norms.mul_(self.beta).add_((1 - self.beta) * norms.to(self.norms.device))
        coef = metabalance_coefficients(self.norms, self.target, self.relax_factor, self.strategy)
        update = torch.cat([c @ p for c, p in zip(coef.to(device=grads.device, dtype=grads.dtype), parts, strict=True)])
        return update, task_scales(coef, norms.to(coef.device)).to(device=grads.device, dtype=grads.dtype)

    def log_values(self) -> dict[str, Tensor]:
        """The norms' moving averages (summed over components), as ``metabalance/norm/<task>``."""
        if not hasattr(self, "norms"):
            return {}
        total = self.norms.sum(dim=0)
        return {f"metabalance/norm/{name}": total[i].float() for i, name in enumerate(self.task_names)}


def task_scales(coef: Tensor, norms: Tensor) -> Tensor:
    """``[T]``: the factor task t's gradient was scaled by, Σ_k c_kt‖g_kt‖² / Σ_k ‖g_kt‖² (⟨update_t, g_t⟩/‖g_t‖² for
    update_t = task t's rescaled gradient); exactly c_t with one component; the mean c_kt for a zero gradient."""
    sq = norms.square()
    total = sq.sum(dim=0)
    return torch.where(total > 0, (coef * sq).sum(dim=0) / total.clamp_min(1e-300), coef.mean(dim=0))


def metabalance_coefficients(norms: Tensor, target: int, relax: float, strategy: str) -> Tensor:
    """``c[K, T]``: r·m_target/m_t + (1 − r) where the strategy adapts task t's gradient, else 1."""
    m_target = norms[:, target : target + 1]
    ratio = torch.where(norms > 0, m_target / norms.clamp_min(1e-300), torch.ones_like(norms))
    adapt = norms > 0
    if strategy == "reduce":
        adapt &= ratio < 1
    elif strategy == "enlarge":
        adapt &= ratio > 1
    adapt[:, target] = False
    return torch.where(adapt, relax * ratio + (1 - relax), torch.ones_like(norms))
