"""Uncertainty weighting: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
for Scene Geometry and Semantics", CVPR 2018.

Each task t has a learned log-variance s_t = log σ_t² (an ``nn.Parameter``, so the main optimizer trains
it, in MTLModule's no-weight-decay group; it is never clamped). The task's ``loss_type`` picks the form
its likelihood gives (paper eq. 7 and 10, with the log-variance parametrisation of its §3.2):

    regression:      0.5·exp(-s_t)·L_t + r(s_t)     (Gaussian likelihood, 1/(2σ²))
    classification:  exp(-s_t)·L_t     + r(s_t)     (scaled softmax / sigmoid likelihood, 1/σ²)

Two regularisers r, chosen by ``positive_regularizer``:

- ``false`` (default, the paper): r(s) = 0.5·s = log σ. Stationary point on a fixed loss L: s* = log L
  (regression), s* = log 2L (classification). The total can go negative once σ < 1.
- ``true`` (Liebel & Körner, "Auxiliary Tasks in Multi-task Learning", 2018): r(s) = log(1 + σ²) =
  log(1 + exp(s)) >= 0, so the total stays non-negative. With c = 0.5 (regression) or 1
  (classification) the stationary point solves σ⁴ = c·L·(1 + σ²): σ*² = (cL + sqrt(c²L² + 4cL)) / 2.

Reported weights are the multipliers of L_t: 0.5·exp(-s_t) or exp(-s_t).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.base import LossWeighting
from mtl_experiments.tasks import Task

# multiplier of exp(-s_t)·L_t per task loss_type (1/(2σ²) for a Gaussian, 1/σ² for a softmax likelihood)
SCALES = {"regression": 0.5, "classification": 1.0}


class Uncertainty(LossWeighting):
    def __init__(self, init_log_var: float = 0.0, positive_regularizer: bool = False):
        super().__init__()
        self.init_log_var = init_log_var
        self.positive_regularizer = positive_regularizer

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        init = checks.number("loss.init_log_var", self.init_log_var, hint="log σ², e.g. 0.0")
        checks.boolean("loss.positive_regularizer", self.positive_regularizer)
        scales = []
        for name, task in tasks.items():
            loss_type = getattr(task, "loss_type", None)
            if loss_type not in SCALES:
                raise ConfigError(
                    f"loss=uncertainty needs each task's loss_type in {sorted(SCALES)}; task '{name}' has "
                    f"{loss_type!r}. Give its task kind a loss_type, or use another loss (e.g. loss=equal)."
                )
            scales.append(SCALES[loss_type])
        self.log_var = nn.Parameter(torch.full((self.num_tasks,), float(init)))
        self.register_buffer("scale", torch.tensor(scales))

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        s = self.log_var.to(losses.dtype)
        weights = self.scale.to(losses.dtype) * torch.exp(-s)
        # softplus(s) = log(1 + exp(s)) without overflow for large s
        reg = F.softplus(s) if self.positive_regularizer else 0.5 * s
        return (weights * losses + reg).sum(), weights.detach()

    def log_values(self) -> dict[str, Tensor]:
        s = self.log_var.detach()
        return {f"uncertainty/log_var/{name}": s[i] for i, name in enumerate(self.task_names)}
