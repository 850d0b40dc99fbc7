"""One-gate Mixture-of-Experts (OMoE): shared experts and ONE softmax gate shared by all tasks, a tower per task.

The OMoE baseline of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018: ``f(x) = Σ_e g_e(x) · expert_e(x)`` with ``g(x) = softmax(W_g x)``, then
``y_t = tower_t(f(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtl_experiments.backbone.base import Backbone, mlp, mlp_output_dim
from mtl_experiments.backbone.experts import Experts, check_common, gate, mix


class OMoE(Backbone):
    """Experts and the gate are shared by all tasks (``shared_parameters()``); each task has its own tower.

    ``last_shared_layer`` is the experts' last layer, one ``nn.Linear`` spanning all experts (not the
    mixture: the gate multiplies outputs, it has no weight of its own after them). Unlike MMoE, every
    task reads the same mixture ``f(x)``, so it is stored as ``representation`` (grad_source=representation,
    MGDA-UB). ``gate_weights`` maps every task to the one gate's ``[B, E]`` softmax.
    """

    has_representation = True

    def __init__(
        self,
        input_dim: int,
        task_names: Sequence[str],
        num_experts: int = 8,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        dropout: float = 0.0,
        activation: str = "ReLU",
    ):
        super().__init__(input_dim, task_names)
        check_common(dropout, activation, tower_dims)
        self.experts = Experts(input_dim, num_experts, expert_dims, dropout, activation)
        self.gate = gate(input_dim, self.experts.num_experts)
        d = self.experts.output_dim
        self.towers = nn.ModuleDict({t: mlp(d, tower_dims, dropout, activation) for t in self.task_names})
        self.output_dim = mlp_output_dim(d, tower_dims)
        self.last_shared_layer = f"experts.{self.experts.last_layer_path}"
        self.gate_weights: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        g = self.gate(x)  # [B, E]
        f = self.representation = mix(g, self.experts(x))
        self.gate_weights = dict.fromkeys(self.task_names, g)
        return {t: tower(f) for t, tower in self.towers.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.experts.parameters(), *self.gate.parameters()]
