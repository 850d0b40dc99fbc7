"""Smooth Tchebycheff scalarisation (STCH): Lin, Zhang, Chen, Zhang & Zhang, "Smooth Tchebycheff Scalarization for
Multi-Objective Optimization", ICML 2024 (arXiv:2402.19078), eq. 9, with uniform preference λ_t = 1:

    total = T · μ · log Σ_t exp(f_t / μ)

a smooth upper bound of T·max_t f_t (within T·μ·log T) whose gradient is T·Σ_t softmax(f/μ)_t ∇f_t. What f_t is,
``reference`` chooses:

- ``warmup`` (default; the authors' multi-task code, as in LibMTL): f_t = log(L_t / z_t + ε), with z_t (their
  "nadir vector") the mean training loss of task t over the last warm-up epoch. For the first ``warmup_epochs``
  epochs the total is Σ_t log(L_t + ε) (equal weights on the log-losses), and z is fixed when they end.
- ``running_min``: the paper's eq. 9 on the raw losses, f_t = L_t − z_t with the ideal point z_t estimated as the
  smallest loss of task t seen so far (this step's included, so f_t >= 0); no warm-up.

ε = ``eps`` (1e-20 in the authors' code) keeps a zero loss finite; a z_t of 0 (a task with no labelled row in the
warm-up epoch) is replaced by ε. Weights reported are the multipliers of ∇L_t in ∇total:
warm-up 1/(L_t + ε); ``warmup`` T·p_t/(L_t + ε·z_t); ``running_min`` T·p_t, with p = softmax(f/μ).
State (epochs seen, the warm-up sums, z) is in buffers, so resume continues exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import LossWeighting
from mtl_experiments.tasks import Task

REFERENCES = ("warmup", "running_min")


class STCH(LossWeighting):
    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4, reference: str = "warmup", eps: float = 1e-20):
        super().__init__()
        self.mu = checks.positive_number("loss.mu", mu, hint="the smoothing μ; the authors' default is 1.0")
        hint = "epochs of log-loss training that estimate z (the authors use 4)"
        self.warmup_epochs = checks.positive_int("loss.warmup_epochs", warmup_epochs, hint=hint)
        hint = "warmup: the authors' log(L/z) after warm-up epochs; running_min: L − min L (the paper's eq. 9)"
        self.reference = checks.choice("loss.reference", reference, REFERENCES, hint=hint)
        self.eps = checks.positive_number("loss.eps", eps, hint="added inside the log; the authors use 1e-20")

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        t = self.num_tasks
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("loss_sum", torch.zeros(t, dtype=torch.float64))  # the current warm-up epoch's losses
        self.register_buffer("loss_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("reference_point", torch.zeros(t, dtype=torch.float64))  # z
        self.register_buffer("has_reference", torch.zeros((), dtype=torch.bool))

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if self.reference == "running_min":
            return self.smooth_max(losses - self.running_min(losses).to(losses.dtype), losses)
        if not bool(self.has_reference):
            with torch.no_grad():
                self.loss_sum += losses.detach().to(self.loss_sum.dtype)
                self.loss_count += 1
            total = torch.log(losses + self.eps).sum()
            return total, (1.0 / (losses + self.eps)).detach()
        z = self.reference_point.to(losses.dtype)
        return self.smooth_max(torch.log(losses / z + self.eps), losses, z)

    def smooth_max(self, f: Tensor, losses: Tensor, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``T·μ·logsumexp(f/μ)`` and the multipliers of ∇L_t in its gradient."""
        total = self.num_tasks * self.mu * torch.logsumexp(f / self.mu, dim=0)
        p = torch.softmax(f.detach() / self.mu, dim=0)
        weights = self.num_tasks * p
        if z is not None:  # f_t = log(L_t/z_t + ε): ∂f_t/∂L_t = 1/(L_t + ε·z_t)
            weights = weights / (losses.detach() + self.eps * z)
        return total, weights

    @torch.no_grad()
    def running_min(self, losses: Tensor) -> Tensor:
        """The ideal point z: the smallest loss per task seen so far, this step's included."""
        current = losses.detach().to(self.reference_point.dtype)
        if bool(self.has_reference):
            current = torch.minimum(self.reference_point, current)
        self.reference_point.copy_(current)
        self.has_reference.fill_(True)
        return current

    def on_train_epoch_end(self, epoch: int) -> None:
        if self.reference == "running_min" or bool(self.has_reference) or int(self.loss_count) == 0:
            return
        self.epochs_seen += 1
        if int(self.epochs_seen) >= self.warmup_epochs:  # z: the mean loss of the last warm-up epoch
            mean = self.loss_sum / self.loss_count
            self.reference_point.copy_(torch.where(mean > 0, mean, torch.full_like(mean, self.eps)))
            self.has_reference.fill_(True)
        self.loss_sum.zero_()
        self.loss_count.zero_()

    def log_values(self) -> dict[str, Tensor]:
        # z (0 until it is known)
        return {f"weighting/stch/z/{name}": self.reference_point[i] for i, name in enumerate(self.task_names)}
