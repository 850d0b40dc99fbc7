"""Low-noise conflict estimators: cosines of each task's gradient averaged over steps, and per layer.

A single mini-batch's gradient is the task's expected gradient plus sampling noise; over tens of thousands of
shared parameters the noise terms are near-orthogonal, so cos(g_i, g_j) of one step is pulled towards 0 whatever
the tasks' relatedness (the per-step ``cosine``). Averaging each task's gradient over steps before taking the
cosine shrinks the noise (variance / n for n independent batches) while the expected gradients add up:

- ``ema_cosine``: cos(m_i, m_j) with m_t ← β m_t + (1 − β) g_t on every tracked step: an exponential moving
  average of each task's gradient (window ≈ 1 / (1 − β) tracked steps). GradVac (Wang et al., "Gradient
  Vaccine", ICLR 2021, Eq. 6) keeps an EMA of the *cosine*, which averages the noise-shrunk values; here, as in
  MoCo's tracked gradients (Fernando et al., ICLR 2023, Eq. 5), the EMA is of the gradients and the cosine is
  taken after. Adam's bias correction 1 / (1 − βⁿ) scales every row alike, so the cosine needs none.
- ``accumulated_cosine``: cos(Σ g_i, Σ g_j) over consecutive blocks of k tracked steps (the gradient of the
  loss summed over k batches, as gradient accumulation would form it); one value per block.
- ``initial_cosine``: the mean of ``ema_cosine`` over the first ``initial_steps`` tracked steps of training only.
  Once the shared parameters near a stationary point of the weighted sum Σ_t w_t L_t, the expected task
  gradients must cancel there (Σ_t w_t E[g_t] = 0), which drives the averaged cosines of any two tasks towards
  -1 late in training whatever their relatedness; at the start they still show how the tasks' descent
  directions relate (measured in docs/results.md: only this summary rose monotonically with the synthetic
  tasks' correlation).
- ``layer_cosine``: the EMA cosine restricted to each shared layer's parameters (a layer = the module owning
  the parameters; e.g. the bottom MLP's first linear layer): where in the shared model the tasks agree.

State: the EMA ``ema[T, P]``, the running block sum ``block[T, P]`` and its step count, in float32 (G's dtype):
they are in the tracker's checkpointed extra state; under DDP every rank gets the same global ``G``, so every
rank holds the same averages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def layer_gramians(grads: Tensor, layers: Sequence[tuple[str, int]]) -> Tensor:
    """``K_l = G_l G_lᵀ`` per layer, ``[L, T, T]`` float64; ``layers``: (layer name, columns) per parameter, in
    ``G``'s column order; parameters of one layer name add into one Gramian (layers in first-seen order)."""
    names = list(dict.fromkeys(name for name, _ in layers))
    out = torch.zeros(len(names), len(grads), len(grads), dtype=torch.float64, device=grads.device)
    offset = 0
    for name, width in layers:
        block = grads[:, offset : offset + width]
        out[names.index(name)] += (block @ block.T).double()
        offset += width
    return out


def batched_cosine(gram: Tensor) -> Tensor:
    """cos_ij = K_ij / (‖g_i‖‖g_j‖) for a ``[..., T, T]`` stack of Gramians; 0 where a norm is 0."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    den = norms[..., :, None] * norms[..., None, :]
    cos = torch.where(den > 0, gram / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(gram))
    return cos.clamp(-1.0, 1.0)


class GradientAverages:
    """The per-task gradient averages behind the low-noise estimators (plain tensors, checkpointed by the tracker).

    ``update(G)`` folds one tracked step's ``G[T, P]`` in and returns ``(EMA Gramian, per-layer EMA Gramians or
    None, block Gramian or None)``: the block Gramian only when a block of ``accumulate_steps`` has completed."""

    def __init__(self, beta: float, accumulate_steps: int, layers: Sequence[tuple[str, int]] | None = None):
        self.beta, self.accumulate_steps, self.layers = beta, accumulate_steps, list(layers or [])
        self.ema: Tensor | None = None
        self.block: Tensor | None = None
        self.block_steps = 0

    def update(self, grads: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        g = grads.detach() if grads.dtype in (torch.float32, torch.float64) else grads.detach().float()
        if self.ema is None:  # m_0 = 0 as in the papers (the bias correction would rescale every row alike)
            self.ema = torch.zeros_like(g)
        self.ema = self.ema.to(g).mul_(self.beta).add_(g, alpha=1.0 - self.beta)
        self.block = g.clone() if self.block is None or self.block_steps == 0 else self.block.to(g).add_(g)
        self.block_steps += 1
        layer_grams = layer_gramians(self.ema, self.layers) if self.layers else None
        block_gram = None
        if self.block_steps == self.accumulate_steps:
            block_gram, self.block_steps = (self.block @ self.block.T).double(), 0
        return (self.ema @ self.ema.T).double(), layer_grams, block_gram

    def state(self) -> dict:
        return {"ema": self.ema, "block": self.block, "block_steps": self.block_steps}

    def load(self, state: dict) -> None:
        self.ema, self.block, self.block_steps = state["ema"], state["block"], int(state["block_steps"])

    @property
    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.layers))
