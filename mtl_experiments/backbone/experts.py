"""Building blocks of mixture-of-experts backbones (OMoE / MMoE, CGC / PLE): a batch of expert MLPs and a gate.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018:
expert ``f_e(x)`` (an MLP), gate ``g(x) = softmax(W_g x)`` over the E experts, mixture ``Σ_e g_e(x) f_e(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.backbone.base import Backbone, check_options, mlp, mlp_output_dim


class Experts(nn.Module):
    """E expert MLPs with the same layer sizes, evaluated together: ``x[B, D] -> Tensor[B, E, hidden_dims[-1]]``.

    Each layer is ONE ``nn.Linear(in, E * out)`` whose weight, viewed as ``[E, out, in]``, holds every
    expert's weight for that layer; expert ``e`` only reads its own block (the layer is applied
    block-diagonally, not as a dense ``E*in -> E*out`` map), so the experts stay independent as in the
    paper. Each layer is Linear -> activation -> dropout, like :func:`mtl_experiments.backbone.base.mlp`.

    ``last_layer_path`` (relative to this module) names the final ``nn.Linear``: its weight spans all
    experts, which makes it the natural "last shared layer" W for GradNorm (the last layer of expert 0
    alone would see only that expert's share of the gradient).
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        hidden_dims: Sequence[int],
        dropout: float = 0.0,
        activation: str = "ReLU",
    ):
        super().__init__()
        self.num_experts = checks.positive_int("backbone.num_experts", num_experts)
        self.hidden_dims = checks.sizes("backbone.expert_dims", hidden_dims)
        check_options(dropout, activation)
        self.output_dim = self.hidden_dims[-1]
        dims = [in_dim, *self.hidden_dims]
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, self.num_experts * b) for a, b in pairs)
        self.act = getattr(nn, activation)()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_layer_path = f"layers.{len(self.layers) - 1}"

    def forward(self, x: Tensor) -> Tensor:
        E = self.num_experts
        first = self.layers[0]
        h = first(x).view(x.shape[0], E, -1)  # every expert reads the same input: one dense matmul
        h = self.dropout(self.act(h))
        for layer in self.layers[1:]:
            w = layer.weight.view(E, -1, layer.in_features)  # [E, out, in]
            h = torch.einsum("bei,eoi->beo", h, w) + layer.bias.view(E, -1)
            h = self.dropout(self.act(h))
        return h


def gate(in_dim: int, num_experts: int) -> nn.Sequential:
    """A softmax gate ``g(x) = softmax(W_g x + b)``: ``x[B, in_dim] -> Tensor[B, num_experts]``, rows sum to 1."""
    return nn.Sequential(nn.Linear(in_dim, num_experts), nn.Softmax(dim=-1))


def mix(gates: Tensor, experts: Tensor) -> Tensor:
    """``Σ_e g[b, e] · experts[b, e, :]``: gates ``[B, E]``, experts ``[B, E, D]`` -> ``[B, D]``."""
    return torch.einsum("be,bed->bd", gates, experts)


class ExpertsBackbone(Backbone):
    """The part OMoE and MMoE share: checked options, one ``Experts`` block shared by all tasks, the gate(s) a
    subclass adds in ``add_gates``, then a tower MLP per task over the gated mixture.

    ``last_shared_layer`` is the experts' last layer (one ``nn.Linear`` spanning all experts);
    ``gate_weights`` holds ``{task: softmax gate [B, E]}`` after each forward.
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
        tower_dims = check_options(dropout, activation, tower_dims)
        self.experts = Experts(input_dim, num_experts, expert_dims, dropout, activation)
        # the gates between the experts and the towers: a seed initialises the same parameters as it always did
        self.add_gates(input_dim, self.experts.num_experts)
        d = self.experts.output_dim
        self.towers = nn.ModuleDict({t: mlp(d, tower_dims, dropout, activation) for t in self.task_names})
        self.output_dim = mlp_output_dim(d, tower_dims)
        self.last_shared_layer = f"experts.{self.experts.last_layer_path}"
        self.gate_weights: dict[str, Tensor] = {}

    def add_gates(self, input_dim: int, num_experts: int) -> None:
        """Create the gate module(s) as attributes (made between the experts and the towers)."""
        raise NotImplementedError
