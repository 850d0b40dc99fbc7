"""Fast Adaptive Multitask Optimization (FAMO): Liu, Liu, Jin, Stone & Liu, NeurIPS 2023
(arXiv 2306.03792), Algorithm 1 (and its practical form, Algorithm 2 in Appendix C / the authors' code).

Task logits ξ ∈ R^T (init 0), z = softmax(ξ). The model step descends Σ_t c·z_t·log(L_t + ε) with
c = (Σ_t z_t / (L_t + ε))⁻¹ held constant, i.e. it applies the per-task weights

    w_t = c · z_t / (L_t + ε)        (Σ_t w_t = 1: a convex combination of the task gradients)

which are what this module backpropagates (Σ_t w_t·L_t, the same gradient) and reports as
``train/weight/*``. After the optimizer step the logits follow the change of the log-losses,

    δ_t = log(L_t(before) + ε) − log(L_t(after) + ε),   g = J_zᵀ δ + γ ξ = z ⊙ (δ − zᵀδ) + γ ξ,

with J_z = diag(z) − z zᵀ the softmax Jacobian, and ``optimizer`` applies g:
- ``adam`` (default): one Adam step (β₁ 0.9, β₂ 0.999, eps 1e-8) on g with learning rate β, as in the
  paper's Algorithm 2 and the authors' code (``torch.optim.Adam(lr=β, weight_decay=γ)``), where the
  defaults β = 0.025, γ = 1e-3 come from (the official repository's example uses γ = 1e-5);
- ``sgd``: Algorithm 1 literally, ξ ← ξ − β·g. δ is tiny per step (~1e-3), so with β = 0.025 the
  logits barely move: raise ``lr`` by orders of magnitude with this variant.

"Before" and "after": the authors run a second forward pass on the same batch after the step. Our
step has no second forward (it would cost one more forward per step), so we use the losses the step
already computed: the ``after_optimizer_step`` hook of step k receives L(θ_k; batch_k), the loss
*before* step k; it is the "after" of step k−1. So after step k we update ξ with
δ = log L(θ_{k−1}; batch_{k−1}) − log L(θ_k; batch_k): the change made by step k−1, measured on
consecutive batches (unbiased in expectation, noisier per step), one step late, with J_z taken at the
current ξ. The first step only records its losses.

Losses must be >= 0 (log(L + ε) is taken; BCE, cross-entropy and MSE are); ε = ``eps`` keeps a zero
loss finite (that task then gets w ≈ 1) and is the ``1e-8`` of the authors' code. A negative loss
raises. ξ, the previous losses and the Adam moments are buffers (resume continues exactly) and ξ is
never seen by the main optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import LossWeighting
from mtl_experiments.tasks import Task

OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the authors' code uses
ADAM_EPS = 1e-8


class FAMO(LossWeighting):
    def __init__(self, lr: float = 0.025, gamma: float = 0.001, eps: float = 1e-8, optimizer: str = "adam"):
        super().__init__()
        self.lr = checks.non_negative_number("loss.lr", lr, hint="the logits' step size β; the paper uses 0.025")
        self.gamma = checks.non_negative_number(
            "loss.gamma", gamma, hint="the logits' weight decay γ; the paper uses 1e-3"
        )
        self.eps = checks.positive_number("loss.eps", eps, hint="added to each loss inside the log; default 1e-8")
        hint = "adam: the paper's practical update; sgd: Algorithm 1's plain gradient step"
        self.optimizer = checks.choice("loss.optimizer", optimizer, OPTIMIZERS, hint=hint)

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        t = self.num_tasks
        self.register_buffer("logits", torch.zeros(t))
        self.register_buffer("prev_losses", torch.zeros(t))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("exp_avg", torch.zeros(t))
        self.register_buffer("exp_avg_sq", torch.zeros(t))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))

    def _check_losses(self, losses: Tensor) -> None:
        if (losses < 0).any():
            raise ValueError(
                f"FAMO takes log(L + eps) and needs every task loss >= 0, got {losses.detach().tolist()}; "
                "use a non-negative loss for every task (or another loss weighting)."
            )

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        self._check_losses(losses)
        z = torch.softmax(self.logits, dim=0).to(losses.dtype)
        w = famo_weights(z, losses.detach(), self.eps)
        return (w * losses).sum(), w

    @torch.no_grad()
    def after_optimizer_step(self, losses: Tensor) -> None:
        losses = losses.detach().to(self.logits.dtype)
        self._check_losses(losses)
        if bool(self.has_prev):
            delta = torch.log(self.prev_losses + self.eps) - torch.log(losses + self.eps)
            z = torch.softmax(self.logits, dim=0)
            grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # J_zᵀδ + γξ (J_z is symmetric)
            self.logits -= self._step(grad)
        self.prev_losses.copy_(losses)
        self.has_prev.fill_(True)

    def _step(self, grad: Tensor) -> Tensor:
        """The change of ξ for gradient ``grad``: β·g (sgd) or one Adam step (bias-corrected moments)."""
        if self.optimizer == "sgd":
            return self.lr * grad
        beta1, beta2 = ADAM_BETAS
        self.adam_step += 1
        step = int(self.adam_step)
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = self.exp_avg / (1 - beta1**step)
        v_hat = self.exp_avg_sq / (1 - beta2**step)
        return self.lr * m_hat / (v_hat.sqrt() + ADAM_EPS)

    def log_values(self) -> dict[str, Tensor]:
        return {f"famo/logit/{name}": self.logits[i] for i, name in enumerate(self.task_names)}


def famo_weights(z: Tensor, losses: Tensor, eps: float) -> Tensor:
    """w_t = c·z_t/(L_t + ε), c = (Σ_i z_i/(L_i + ε))⁻¹: the multipliers of ∇L_t in ∇ Σ_t c·z_t·log(L_t + ε)."""
    scaled = z / (losses + eps)
    return scaled / scaled.sum()
