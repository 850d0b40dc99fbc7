"""Multi-gate Mixture-of-Experts (MMoE): shared experts, one softmax gate per task, one tower per task.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018:
``f_t(x) = Σ_e g_{t,e}(x) · expert_e(x)`` with ``g_t(x) = softmax(W_{g,t} x)``, then ``y_t = tower_t(f_t(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mtl_experiments.backbone.base import Backbone, mlp, mlp_output_dim
from mtl_experiments.backbone.experts import Experts, check_common, gate, mix


class MMoE(Backbone):
    """Experts are shared by all tasks; each task's gate and tower are its own.

    ``shared_parameters()`` is the experts only: a task's gate receives gradient from that task alone, so
    it is task-specific, not shared. ``last_shared_layer`` is the experts' last layer, one ``nn.Linear``
    spanning all experts. ``gate_weights`` holds ``{task: softmax gate [B, E]}`` after each forward.
    """

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
        self.gates = nn.ModuleDict({t: gate(input_dim, self.experts.num_experts) for t in self.task_names})
        d = self.experts.output_dim
        self.towers = nn.ModuleDict({t: mlp(d, tower_dims, dropout, activation) for t in self.task_names})
        self.output_dim = mlp_output_dim(d, tower_dims)
        self.last_shared_layer = f"experts.{self.experts.last_layer_path}"
        self.gate_weights: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.experts(x)  # [B, E, D]
        self.gate_weights = {t: g(x) for t, g in self.gates.items()}
        return {t: self.towers[t](mix(self.gate_weights[t], h)) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())
