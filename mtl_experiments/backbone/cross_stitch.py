"""Cross-stitch network: one MLP column per task, with learnable linear mixing of the columns after each layer.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016. After
hidden layer ``l`` the activations ``x_j^l`` of the T columns are mixed by a cross-stitch unit
``x̃_i^l = Σ_j α^l_{ij} x_j^l`` (the paper's Eq. 1 for two tasks, generalised to T), and column ``i``'s next
layer reads ``x̃_i^l``; after the last stitch each task has its own tower. ``α^l`` is a learnable ``T × T``
matrix initialised as in the paper's initialisation study (§5.1): ``α_ii = alpha_self`` and
``α_ij = (1 − alpha_self) / (T − 1)`` for ``j ≠ i``, so every row is a convex combination (sums to 1).
(The paper also trains α with a larger learning rate; here α uses the run's optimizer like every parameter.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.backbone.base import Backbone, check_options, mlp, mlp_output_dim


class CrossStitch(Backbone):
    """Columns ``columns[task][l]`` (Linear -> activation -> dropout), stitches ``alphas[l]`` ([T, T]), towers.

    ``shared_parameters()`` is exactly what more than one task reaches: every column layer (its output goes
    through the next stitch into every task's path as soon as the off-diagonal α are non-zero) and every α
    matrix (``α^l`` for ``l`` below the last feeds the next column layers, which reach every task; row ``i``
    of the LAST ``α`` only reaches task ``i``, but the contract is per parameter tensor and that tensor is
    reached by every task). The towers are task-specific. With one task, or ``alpha_self = 1`` (identity
    stitches: independent columns until α moves), the columns are structurally still listed as shared, except
    that one task shares nothing at all (``[]``).

    ``last_shared_layer`` is the first task's last column ``nn.Linear`` (the last layer before the last
    stitch): its output reaches every task through that stitch. No backbone-wide tensor is read by all
    tasks, so ``has_representation`` is False.
    """

    def __init__(
        self,
        input_dim: int,
        task_names: Sequence[str],
        column_dims: Sequence[int] = (128, 64),
        tower_dims: Sequence[int] = (32,),
        alpha_self: float = 0.9,
        dropout: float = 0.0,
        activation: str = "ReLU",
    ):
        super().__init__(input_dim, task_names)
        column_dims = checks.sizes("backbone.column_dims", column_dims, hint="one cross-stitch unit after each")
        tower_dims = check_options(dropout, activation, tower_dims)
        alpha_self = checks.fraction("backbone.alpha_self", alpha_self)
        T = len(self.task_names)
        dims = [input_dim, *column_dims]
        self.columns = nn.ModuleDict(
            {
                t: nn.ModuleList(mlp(a, [b], dropout, activation) for a, b in zip(dims[:-1], dims[1:], strict=True))
                for t in self.task_names
            }
        )
        self.alphas = nn.ParameterList(nn.Parameter(self.initial_alpha(T, alpha_self)) for _ in column_dims)
        out = column_dims[-1]
        self.towers = nn.ModuleDict({t: mlp(out, tower_dims, dropout, activation) for t in self.task_names})
        self.output_dim = mlp_output_dim(out, tower_dims)
        self.last_shared_layer = f"columns.{self.task_names[0]}.{len(column_dims) - 1}.0" if T > 1 else None

    @staticmethod
    def initial_alpha(num_tasks: int, alpha_self: float) -> Tensor:
        """``α_ii = alpha_self``, ``α_ij = (1 − alpha_self) / (T − 1)``; ``[[1]]`` for a single task."""
        if num_tasks == 1:
            return torch.ones(1, 1)
        off = (1.0 - alpha_self) / (num_tasks - 1)
        return torch.full((num_tasks, num_tasks), off) + (alpha_self - off) * torch.eye(num_tasks)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hs = [x] * len(self.task_names)
        for layer, alpha in enumerate(self.alphas):
            h = torch.stack([self.columns[t][layer](hs[i]) for i, t in enumerate(self.task_names)])  # [T, B, D]
            hs = list(torch.einsum("ij,jbd->ibd", alpha, h).unbind(0))
        return {t: self.towers[t](hs[i]) for i, t in enumerate(self.task_names)}

    def shared_parameters(self) -> list[nn.Parameter]:
        if len(self.task_names) < 2:
            return []
        return [*self.columns.parameters(), *self.alphas]
