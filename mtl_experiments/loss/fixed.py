"""Fixed (static) weights: total = Σ_t w_t·L_t with w given per task name.

Tuned static weights are the baseline adaptive methods must beat (Xin et al., "Do Current Multi-Task
Optimization Methods in Deep Learning Even Help?", NeurIPS 2022). Unset weights default to 1.
``weights`` may also be an object with ``for_tasks(task_names) -> {task: w}`` (``loss/simplex.py``'s
``SimplexPoint``: a sweep's point on the simplex, resolved once the tasks are known).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.base import LossWeighting
from mtl_experiments.tasks import Task


class Fixed(LossWeighting):
    def __init__(self, weights: Mapping[str, float] | None = None):
        super().__init__()
        self.weights_source = weights if hasattr(weights, "for_tasks") else None
        self.weights_cfg = {} if self.weights_source is not None else dict(weights or {})

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        if self.weights_source is not None:  # a sweep's point: the task names are known only now
            self.weights_cfg = self.weights_source.for_tasks(self.task_names)
        unknown = sorted(set(self.weights_cfg) - set(self.task_names))
        if unknown:
            raise ConfigError(
                f"loss.weights names unknown task(s) {unknown}; the tasks are {self.task_names} "
                "(e.g. loss.weights={" + ",".join(f"{t}:1.0" for t in self.task_names) + "})."
            )
        values = {
            t: checks.non_negative_number(f"loss.weights.{t}", self.weights_cfg.get(t, 1.0)) for t in self.task_names
        }
        if sum(values.values()) == 0:
            raise ConfigError(
                "loss.weights are all zero: nothing would be trained; give at least one task a positive weight."
            )
        self.register_buffer("w", torch.tensor([values[t] for t in self.task_names]))

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        w = self.w.to(losses.dtype)
        return (w * losses).sum(), w
