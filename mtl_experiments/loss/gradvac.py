"""GradVac: Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021 (Algorithm 1).

For each model component k and each task i, starting from g'_i = g_i, visit the other tasks j in
random order and compare φ_ij = cos(g'_i, g_j) with an adaptive target φ̂_ij (an EMA, initialised at 0):

    if φ_ij < φ̂_ij:  g'_i ← g'_i + ‖g'_i‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²)) · g_j
    φ̂_ij ← (1−β) φ̂_ij + β φ_ij            (every visit, whether or not g'_i was corrected)

which sets cos(g'_i, g_j) to exactly φ̂_ij; the update is Σ_i g'_i. With φ̂ = 0 this is PCGrad.

Variant choices:
- ``granularity``: the paper applies the rule per model component θ_k and compares granularities;
  ``whole_model`` treats all shared parameters as one vector (LibMTL's and TorchJD's default),
  ``all_matrix`` treats every shared parameter tensor as its own component (each with its own φ̂ and
  random order). With ``grad_source=representation`` there is one component.
- ``beta`` defaults to 0.5, LibMTL's and TorchJD's default.
- A pair in which either gradient is zero has no cosine: it is skipped (no correction, no EMA update).
  √(1−φ̂²) is floored at 1e-6 so a target of ±1 cannot divide by zero.

Implemented natively (not through TorchJD's ``GradVac``) because TorchJD keeps φ̂ in a buffer that is
None until the first step and resets it whenever its private ``_state_key`` is unset, so a checkpoint
cannot be loaded into a fresh module (``Unexpected key(s) ... _phi_t``) and a resumed run would restart
from φ̂ = 0. Here φ̂ is a buffer of fixed shape [components, T, T] and the random order comes from the
method's own generator (seeded by ``seed``, saved with the checkpoint), never from the global RNG.
Everything is computed from the per-component T×T Gramians (g'_i = Σ_m C_im g_m).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import GradientAggregation, effective_weights, run_seed
from mtl_experiments.tasks import Task

GRANULARITIES = ("whole_model", "all_matrix")


class GradVac(GradientAggregation):
    """``update = Σ_i g'_i`` per component (see the module docstring)."""

    def __init__(
        self, beta: float = 0.5, granularity: str = "whole_model", grad_source: str = "params", seed: int | None = None
    ):
        super().__init__(grad_source=grad_source)
        self.beta = checks.fraction("loss.beta", beta, hint="the EMA rate of the cosine targets")
        self.granularity = checks.choice("loss.granularity", granularity, GRANULARITIES)
        self.seed = run_seed(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._sizes: list[int] | None = None  # sizes of the components within a row of G

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        if model is not None and self.granularity == "all_matrix" and self.grad_source == "params":
            self._sizes = [p.numel() for p in model.shared_parameters()]
        components = len(self._sizes) if self._sizes else 1
        self.register_buffer("phi_hat", torch.zeros(components, self.num_tasks, self.num_tasks, dtype=torch.float64))

    def task_grad_inputs(self, model) -> list[Tensor]:
        inputs = super().task_grad_inputs(model)
        if self.granularity == "all_matrix" and self.grad_source == "params":
            self._sizes = [t.numel() for t in inputs]
        return inputs

    def _components(self, grads: Tensor) -> list[Tensor]:
        if self._sizes and sum(self._sizes) == grads.shape[1]:
            return list(torch.split(grads, self._sizes, dim=1))
        return [grads]

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        parts = self._components(grads)
        K, T = len(parts), grads.shape[0]
        if self.phi_hat.shape[0] != K:  # only when setup() had no model to size the components
            self.phi_hat = torch.zeros(K, T, T, dtype=torch.float64, device=self.phi_hat.device)
        gram = torch.stack([(p @ p.T).detach() for p in parts]).double().cpu()  # [K, T, T]
        phi_hat = self.phi_hat.detach().cpu().clone()
        coef = vaccinate(gram, phi_hat, self.beta, self._generator)  # [K, T, T]: g'_ik = Σ_m coef[k,i,m] g_mk
        self.phi_hat.copy_(phi_hat.to(self.phi_hat.device))
        weights = coef.sum(dim=1).to(device=grads.device, dtype=grads.dtype)  # [K, T]
        update = torch.cat([w @ p for w, p in zip(weights, parts, strict=True)])
        if K == 1:
            return update, weights[0]
        return update, effective_weights(grads, update)

    def log_values(self) -> dict[str, Tensor]:
        """The cosine targets φ̂_ij (averaged over components), as ``gradvac/target/<i>-<j>``."""
        if not hasattr(self, "phi_hat"):
            return {}
        mean = self.phi_hat.mean(dim=0)
        names = self.task_names
        return {
            f"gradvac/target/{names[i]}-{names[j]}": mean[i, j].float()
            for i in range(len(names))
            for j in range(len(names))
            if i != j
        }

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])


def vaccinate(gram: Tensor, phi_hat: Tensor, beta: float, generator: torch.Generator) -> Tensor:
    """Algorithm 1 on the Gramians ``gram[K, T, T]``; updates ``phi_hat[K, T, T]`` in place.

    Returns ``coef[K, T, T]`` with g'_ik = Σ_m coef[k, i, m] g_mk. The K components are processed
    together, each with its own random order of the other tasks.
    """
    K, T, _ = gram.shape
    coef = torch.eye(T, dtype=gram.dtype).repeat(K, 1, 1)
    norms_sq = gram.diagonal(dim1=1, dim2=2)  # [K, T]: ‖g_jk‖²
    ks = torch.arange(K)
    for i in range(T):
        others = torch.tensor([j for j in range(T) if j != i], dtype=torch.long)
        order = others[torch.argsort(torch.rand(K, T - 1, generator=generator), dim=1)]  # [K, T-1]
        for s in range(T - 1):
            j = order[:, s]
            c_i = coef[:, i, :]  # [K, T]
            dots = torch.einsum("km,kmn->kn", c_i, gram)  # g'_ik · g_nk for every n
            norm_i = (dots * c_i).sum(1).clamp_min(0).sqrt()
            norm_j = norms_sq[ks, j].clamp_min(0).sqrt()
            valid = (norm_i > 0) & (norm_j > 0)
            phi = torch.where(valid, dots[ks, j] / (norm_i * norm_j).clamp_min(1e-300), torch.zeros_like(norm_i))
            phi = phi.clamp(-1.0, 1.0)
            target = phi_hat[ks, i, j]
            sin_target = (1 - target**2).clamp_min(0).sqrt().clamp_min(1e-6)
            w = norm_i * (target * (1 - phi**2).clamp_min(0).sqrt() - phi * sin_target)
            w = w / (norm_j.clamp_min(1e-300) * sin_target)
            coef[ks, i, j] += torch.where(valid & (phi < target), w, torch.zeros_like(w))
            phi_hat[ks, i, j] = torch.where(valid, (1 - beta) * target + beta * phi, target)
    return coef
