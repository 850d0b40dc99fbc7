"""Multi-gate Mixture-of-Experts (MMoE): shared experts, one softmax gate per task, one tower per task.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018:
``f_t(x) = Σ_e g_{t,e}(x) · expert_e(x)`` with ``g_t(x) = softmax(W_{g,t} x)``, then ``y_t = tower_t(f_t(x))``.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtl_experiments.backbone.experts import ExpertsBackbone, gate, mix


class MMoE(ExpertsBackbone):
    """Experts are shared by all tasks; each task's gate and tower are its own (options: ``ExpertsBackbone``).

    ``shared_parameters()`` is the experts only: a task's gate receives gradient from that task alone, so
    it is task-specific, not shared. ``last_shared_layer`` is the experts' last layer, one ``nn.Linear``
    spanning all experts. ``gate_weights`` holds ``{task: softmax gate [B, E]}`` after each forward.
    """

    def add_gates(self, input_dim: int, num_experts: int) -> None:
        self.gates = nn.ModuleDict({t: gate(input_dim, num_experts) for t in self.task_names})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.experts(x)  # [B, E, D]
        self.gate_weights = {t: g(x) for t, g in self.gates.items()}
        return {t: self.towers[t](mix(self.gate_weights[t], h)) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())
