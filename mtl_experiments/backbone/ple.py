"""Progressive Layered Extraction (PLE): stacked extraction levels of task-specific and shared experts.

Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
Personalized Recommendations", RecSys 2020, §4.3. Level ``j = 1..L`` holds, for each task ``k``, ``m_k``
task-specific experts ``E_{k,j}`` and ``m_s`` shared experts ``E_{s,j}``. With ``g_{k,0} = g_{s,0} = x``:

- task path: ``g_{k,j} = w_{k,j}(g_{k,j-1}) · S_{k,j}``, ``S_{k,j} = [E_{k,j}(g_{k,j-1}) ; E_{s,j}(g_{s,j-1})]``
  (the task's own ``m_k`` experts then the ``m_s`` shared ones), ``w_{k,j}(h) = softmax(W_{k,j} h)``;
- shared path (every level but the last): ``g_{s,j} = w_{s,j}(g_{s,j-1}) · S_{s,j}`` with ``S_{s,j}`` ALL the
  level's experts ``[E_{1,j} ; ... ; E_{T,j} ; E_{s,j}]``;
- ``y_k = t_k(g_{k,L})`` (one MLP tower per task).

With ``L = 1`` this is CGC (§4.2), which :class:`mtl_experiments.backbone.cgc.CGC` is: the same module tree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.backbone.base import Backbone, check_options, mlp, mlp_output_dim
from mtl_experiments.backbone.experts import Experts, gate, mix


class ExtractionLevel(nn.Module):
    """One extraction network: per-task experts and gates, shared experts and (optionally) the shared gate.

    ``forward(task_inputs, shared_input) -> (task_outputs, shared_output, task_gates)``: ``task_gates[k]`` is
    ``[B, m_k + m_s]`` (task ``k``'s own experts first, then the shared ones; never another task's experts);
    ``shared_output`` is None when the level has no shared gate (the last level).
    """

    def __init__(
        self,
        in_dim: int,
        task_names: Sequence[str],
        num_shared_experts: int,
        num_task_experts: int,
        expert_dims: Sequence[int],
        dropout: float,
        activation: str,
        shared_gate: bool,
    ):
        super().__init__()
        self.task_names = list(task_names)
        self.task_experts = nn.ModuleDict(
            {t: Experts(in_dim, num_task_experts, expert_dims, dropout, activation) for t in self.task_names}
        )
        self.shared_experts = Experts(in_dim, num_shared_experts, expert_dims, dropout, activation)
        self.task_gates = nn.ModuleDict(
            {t: gate(in_dim, num_task_experts + num_shared_experts) for t in self.task_names}
        )
        total = len(self.task_names) * num_task_experts + num_shared_experts
        self.shared_gate = gate(in_dim, total) if shared_gate else None
        self.output_dim = self.shared_experts.output_dim

    def forward(
        self, task_inputs: dict[str, Tensor], shared_input: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        shared = self.shared_experts(shared_input)  # [B, m_s, D]
        specific = {t: self.task_experts[t](task_inputs[t]) for t in self.task_names}  # [B, m_k, D] each
        gates = {t: self.task_gates[t](task_inputs[t]) for t in self.task_names}
        outputs = {t: mix(gates[t], torch.cat([specific[t], shared], dim=1)) for t in self.task_names}
        shared_output = None
        if self.shared_gate is not None:
            every = torch.cat([*(specific[t] for t in self.task_names), shared], dim=1)
            shared_output = mix(self.shared_gate(shared_input), every)
        return outputs, shared_output, gates


class PLE(Backbone):
    """``num_levels`` extraction levels, then one tower per task (see the module docstring for the formulas).

    ``shared_parameters()`` is exactly what more than one task reaches (with two or more tasks):

    - every level's shared experts (read by every task's gate of that level) and every shared gate
      (levels below the last; its output feeds the next level's shared experts);
    - the task-specific experts of every level but the last: the level's shared gate mixes them into the
      shared path, which reaches every task;
    - task ``k``'s gate at level ``j`` only when ``j <= L - 2``: its output feeds task ``k``'s experts at level
      ``j + 1``, which are shared in the sense above when ``j + 1`` is not the last level.

    The towers, the last level's task experts and gates (and the level below's task gates) are task-specific.
    With one task nothing is shared. ``last_shared_layer`` is the last level's shared experts' last layer
    (one ``nn.Linear`` spanning all shared experts). ``gate_weights`` = the last level's task gates,
    ``{task: [B, m_k + m_s]}``. Gates are ``softmax(W h + b)`` (the ``experts.gate`` block, as MMoE here).
    """

    def __init__(
        self,
        input_dim: int,
        task_names: Sequence[str],
        num_levels: int = 2,
        num_shared_experts: int = 4,
        num_task_experts: int = 2,
        expert_dims: Sequence[int] = (64,),
        tower_dims: Sequence[int] = (32,),
        dropout: float = 0.0,
        activation: str = "ReLU",
    ):
        super().__init__(input_dim, task_names)
        self.num_levels = checks.positive_int("backbone.num_levels", num_levels)
        self.num_shared_experts = checks.positive_int("backbone.num_shared_experts", num_shared_experts)
        self.num_task_experts = checks.positive_int("backbone.num_task_experts", num_task_experts)
        tower_dims = check_options(dropout, activation, tower_dims)
        expert_dims = checks.sizes("backbone.expert_dims", expert_dims)
        levels = []
        in_dim = input_dim
        for j in range(self.num_levels):
            has_shared_gate = j < self.num_levels - 1  # every level but the last
            level = ExtractionLevel(
                in_dim,
                self.task_names,
                self.num_shared_experts,
                self.num_task_experts,
                expert_dims,
                dropout,
                activation,
                has_shared_gate,
            )
            levels.append(level)
            in_dim = level.output_dim
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleDict({t: mlp(in_dim, tower_dims, dropout, activation) for t in self.task_names})
        self.output_dim = mlp_output_dim(in_dim, tower_dims)
        last_level = self.num_levels - 1
        self.last_shared_layer = (
            f"levels.{last_level}.shared_experts.{self.levels[-1].shared_experts.last_layer_path}"
            if len(self.task_names) > 1
            else None
        )
        self.gate_weights: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        task_inputs = {t: x for t in self.task_names}
        shared = x
        gates: dict[str, Tensor] = {}
        for level in self.levels:
            task_inputs, shared, gates = level(task_inputs, shared)
        self.gate_weights = gates
        return {t: self.towers[t](task_inputs[t]) for t in self.task_names}

    def shared_parameters(self) -> list[nn.Parameter]:
        if len(self.task_names) < 2:
            return []
        params: list[nn.Parameter] = []
        L = self.num_levels
        for j, level in enumerate(self.levels):
            params += level.shared_experts.parameters()
            if level.shared_gate is not None:  # every level but the last
                params += level.shared_gate.parameters()
                for t in self.task_names:
                    params += level.task_experts[t].parameters()
            if j < L - 2:
                for t in self.task_names:
                    params += level.task_gates[t].parameters()
        return params
