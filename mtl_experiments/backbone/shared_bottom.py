"""Shared-bottom (hard parameter sharing): one MLP shared by all tasks, one MLP tower per task.

Caruana, "Multitask Learning", Machine Learning 28, 1997; the Shared-Bottom baseline of Ma et al. 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.backbone.base import Backbone, check_options, mlp, mlp_output_dim


class SharedBottom(Backbone):
    def __init__(
        self,
        input_dim: int,
        task_names: Sequence[str],
        bottom_dims: Sequence[int] = (128, 64),
        tower_dims: Sequence[int] = (32,),
        dropout: float = 0.0,
        activation: str = "ReLU",
    ):
        super().__init__(input_dim, task_names)
        bottom_dims = checks.sizes("backbone.bottom_dims", bottom_dims, hint="the shared MLP's layer sizes")
        tower_dims = check_options(dropout, activation, tower_dims)
        self.bottom = mlp(input_dim, bottom_dims, dropout, activation)
        bottom_out = mlp_output_dim(input_dim, bottom_dims)
        self.towers = nn.ModuleDict({t: mlp(bottom_out, tower_dims, dropout, activation) for t in self.task_names})
        self.output_dim = mlp_output_dim(bottom_out, tower_dims)
        linears = [name for name, m in self.bottom.named_modules() if isinstance(m, nn.Linear)]
        self.last_shared_layer = f"bottom.{linears[-1]}"

    has_representation = True

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.representation = self.bottom(x)
        return {t: tower(h) for t, tower in self.towers.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())
