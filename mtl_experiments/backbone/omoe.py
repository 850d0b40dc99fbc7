"""One-gate Mixture-of-Experts (OMoE): shared experts and ONE softmax gate shared by all tasks, a tower per task.

The OMoE baseline of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018: ``f(x) = Σ_e g_e(x) · expert_e(x)`` with ``g(x) = softmax(W_g x)``, then
``y_t = tower_t(f(x))``.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtl_experiments.backbone.experts import ExpertsBackbone, gate, mix


class OMoE(ExpertsBackbone):
    """Experts and the gate are shared by all tasks (``shared_parameters()``); each task has its own tower
    (options: ``ExpertsBackbone``).

    ``last_shared_layer`` is the experts' last layer, one ``nn.Linear`` spanning all experts (not the
    mixture: the gate multiplies outputs, it has no weight of its own after them). Unlike MMoE, every
    task reads the same mixture ``f(x)``, so it is stored as ``representation`` (grad_source=representation,
    MGDA-UB). ``gate_weights`` maps every task to the one gate's ``[B, E]`` softmax.
    """

    has_representation = True

    def add_gates(self, input_dim: int, num_experts: int) -> None:
        self.gate = gate(input_dim, num_experts)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        g = self.gate(x)  # [B, E]
        f = self.representation = mix(g, self.experts(x))
        self.gate_weights = dict.fromkeys(self.task_names, g)
        return {t: tower(f) for t, tower in self.towers.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.experts.parameters(), *self.gate.parameters()]
