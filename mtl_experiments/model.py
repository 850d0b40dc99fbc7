"""The network: features -> backbone -> one head per task (DESIGN.md §3)."""

from __future__ import annotations

from torch import Tensor, nn

from mtl_experiments.backbone.base import Backbone
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.tasks import Task


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: FeatureEncoder, backbone: Backbone, tasks: dict[str, Task]):
        super().__init__()
        self.encoder, self.backbone = encoder, backbone
        self.heads = nn.ModuleDict({name: task.head(backbone.output_dim) for name, task in tasks.items()})

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        reps = self.backbone(self.encoder(features))
        return {name: head(reps[name]) for name, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.backbone.shared_parameters()
