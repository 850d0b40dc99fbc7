"""Entire Space Multi-Task Model (ESMM): a CTR tower and a CVR tower trained on CTR and CTCVR over all impressions.

Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion Rate",
SIGIR 2018, eq. (2)-(3): pCTCVR = pCTR × pCVR and

    L(θ_ctr, θ_cvr) = Σ_i l(y_i, f(x_i; θ_ctr)) + Σ_i l(y_i & z_i, f(x_i; θ_ctr) × f(x_i; θ_cvr))

over the entire impression space (y: click, z: conversion, l: cross entropy). pCVR never gets a loss of its
own on the clicked subset, which is what removes the sample selection bias of a CVR model trained on clicks.

In this framework the two tasks are the data's ``ctr_task`` (label y) and ``ctcvr_task`` (label y & z), both
binary. ``forward`` returns the CTR tower's output for the CTR task and the CVR tower's for the CTCVR task,
so the CTCVR task's head yields the pCVR logit b; ``combine`` then replaces it by logit(σ(a)·σ(b)) (a: the
CTR logit), and the binary task's BCE-with-logits on it is exactly the paper's CTCVR loss, with gradient
into both towers. σ(``cvr_logit``), kept after each forward, is pCVR: the score to rank conversions by.

Sharing: in the paper the towers share only the embedding layer (the feature encoder, which is never a
shared dense parameter here). The dense parameters reached by both losses are the CTR tower's, since the
CTCVR loss flows through pCTR; so ``shared_parameters()`` is the CTR tower and ``last_shared_layer`` its
last Linear. Gradient methods and conflict metrics therefore see the conflict between the CTR and CTCVR
objectives on the CTR tower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.backbone.base import Backbone, check_options, mlp
from mtl_experiments.errors import ConfigError
from mtl_experiments.tasks import Task


def product_logit(a: Tensor, b: Tensor) -> Tensor:
    """logit(σ(a)·σ(b)) without overflow or cancellation, for any finite logits a, b.

    log p = logσ(a) + logσ(b), and 1 - σ(a)σ(b) = σ(-a) + σ(a)σ(-b) is a sum of two positive terms, so
    log(1 - p) = logaddexp(logσ(-a), logσ(a) + logσ(-b)) never subtracts nearly equal numbers (a naive
    log(1 - p) is -inf once p rounds to 1, e.g. a = b = 20 in float32).
    """
    log_p = F.logsigmoid(a) + F.logsigmoid(b)
    log_1mp = torch.logaddexp(F.logsigmoid(-a), F.logsigmoid(a) + F.logsigmoid(-b))
    return log_p - log_1mp


class ESMM(Backbone):
    """Two MLP towers of ``tower_dims`` on the encoded input: CTR (its own task) and CVR (under the CTCVR task)."""

    def __init__(
        self,
        input_dim: int,
        task_names: Sequence[str],
        ctr_task: str = "ctr",
        ctcvr_task: str = "ctcvr",
        tower_dims: Sequence[int] = (128, 64, 32),
        dropout: float = 0.0,
        activation: str = "ReLU",
    ):
        super().__init__(input_dim, task_names)
        if ctr_task == ctcvr_task:
            raise ConfigError(f"backbone.ctr_task and backbone.ctcvr_task must differ, both are {ctr_task!r}.")
        self.ctr_task, self.ctcvr_task = str(ctr_task), str(ctcvr_task)
        self._check_task_names(self.task_names)
        tower_dims = checks.sizes("backbone.tower_dims", tower_dims, hint="esmm's towers, e.g. [128, 64, 32]")
        check_options(dropout, activation)
        self.ctr_tower = mlp(input_dim, tower_dims, dropout, activation)
        self.cvr_tower = mlp(input_dim, tower_dims, dropout, activation)
        self.output_dim = int(tower_dims[-1])
        linears = [name for name, m in self.ctr_tower.named_modules() if isinstance(m, nn.Linear)]
        self.last_shared_layer = f"ctr_tower.{linears[-1]}"
        self.cvr_logit: Tensor | None = None  # pCVR = σ(cvr_logit), set by each combine()

    @classmethod
    def required_tasks(cls, ctr_task: str = "ctr", ctcvr_task: str = "ctcvr", **options) -> list[str]:
        return [str(ctr_task), str(ctcvr_task)]

    def _check_task_names(self, names: Sequence[str]) -> None:
        ctr, ctcvr = self.ctr_task, self.ctcvr_task
        if sorted(names) != sorted((ctr, ctcvr)):
            raise ConfigError(
                f"backbone=esmm needs exactly two binary tasks, the CTR task {ctr!r} (label: click) and "
                f"the CTCVR task {ctcvr!r} (label: click and conversion), but the tasks are {list(names)}. "
                f"Point it at yours with backbone.ctr_task=<name> backbone.ctcvr_task=<name>, or define them with "
                f"'~data.tasks' '+data.tasks={{{ctr}: {{kind: binary}}, {ctcvr}: {{kind: binary}}}}'."
            )

    def check_tasks(self, tasks: Mapping[str, Task]) -> None:
        self._check_task_names(list(tasks))
        kinds = {name: task.kind for name, task in tasks.items() if task.kind != "binary"}
        if kinds:
            raise ConfigError(
                f"backbone=esmm multiplies click and conversion probabilities, so both tasks must be binary; "
                f"got kinds {kinds}. Set data.tasks.<name>.kind=binary."
            )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        towers = {self.ctr_task: self.ctr_tower, self.ctcvr_task: self.cvr_tower}
        return {t: towers[t](x) for t in self.task_names}

    def combine(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The CTCVR head's output is the pCVR logit; replace it by the pCTCVR logit, logit(pCTR · pCVR)."""
        self.cvr_logit = outputs[self.ctcvr_task]
        return {**outputs, self.ctcvr_task: product_logit(outputs[self.ctr_task], self.cvr_logit)}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.ctr_tower.parameters())
