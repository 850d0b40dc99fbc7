"""Random Loss Weighting (RLW): Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", TMLR 2022.

Every training step draws fresh weights

    λ = softmax(z),  z ~ N(0, I_T),   total = Σ_t λ_t·L_t

(the paper's default distribution; its weights sum to 1). ``scale``:

- ``sum_to_one`` (default, the paper): Σ λ_t = 1.
- ``num_tasks``: λ·T, so Σ λ_t = T and the loss scale (hence the effective learning rate) matches
  ``loss=equal``, whose weights are all 1. Not in the paper.

The draws come from this weighting's own ``torch.Generator`` (never the global RNG, so RLW neither
disturbs nor depends on dropout and shuffling), seeded by ``seed``; its state is saved in checkpoints
(``get_extra_state``) so a resumed run continues the same sequence. ``seed: null`` takes the seed the
run seeded torch with (``torch.initial_seed()``; ``pipeline.train`` calls ``seed_everything(cfg.seed)``
before building the loss), so a run is reproducible for its ``seed`` and every DDP rank draws the same λ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.loss.base import LossWeighting, run_seed

SCALES = ("sum_to_one", "num_tasks")


class RLW(LossWeighting):
    def __init__(self, scale: str = "sum_to_one", seed: int | None = None):
        super().__init__()
        self.scale, self.seed = checks.choice("loss.scale", scale, SCALES), run_seed(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        num_tasks = losses.shape[0]
        # drawn on the CPU generator (same stream on every device), then moved next to the losses
        z = torch.randn(num_tasks, generator=self._generator)
        weights = torch.softmax(z, dim=0)
        if self.scale == "num_tasks":
            weights = weights * num_tasks
        weights = weights.to(device=losses.device, dtype=losses.dtype)
        return (weights * losses).sum(), weights

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
