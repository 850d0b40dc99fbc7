"""Equal weighting: total = Σ_t L_t (every weight 1, so Σ w_t = T as in GradNorm's normalisation)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_experiments.loss.base import LossWeighting


class Equal(LossWeighting):
    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        return losses.sum(), torch.ones_like(losses)
