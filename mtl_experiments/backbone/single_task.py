"""Single-task baseline: an independent network per task, nothing shared.

Lives in the same code and runs table as the multi-task backbones so single-task (STL) reference
numbers come from identical data, heads, training loop and tracking.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.backbone.base import Backbone, check_options, mlp, mlp_output_dim


class SingleTask(Backbone):
    def __init__(
        self,
        input_dim: int,
        task_names: Sequence[str],
        hidden_dims: Sequence[int] = (128, 64, 32),
        dropout: float = 0.0,
        activation: str = "ReLU",
    ):
        super().__init__(input_dim, task_names)
        hidden_dims = checks.sizes("backbone.hidden_dims", hidden_dims, allow_empty=True)
        check_options(dropout, activation)
        self.nets = nn.ModuleDict({t: mlp(input_dim, hidden_dims, dropout, activation) for t in self.task_names})
        self.output_dim = mlp_output_dim(input_dim, hidden_dims)
        self.last_shared_layer = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: net(x) for t, net in self.nets.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return []
