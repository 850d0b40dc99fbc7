"""The network: features -> backbone -> one head per task (DESIGN.md §3)."""

from __future__ import annotations

from torch import Tensor, nn

from mtl_experiments.backbone.base import Backbone
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.tasks import Task


class MultiTaskModel(nn.Module):
    """``outputs = backbone.combine({task: heads[task](backbone(encoder(features))[task])})``: one raw output
    (a logit, a value) per task; ``combine`` is the identity except for backbones that tie tasks (ESMM)."""

    def __init__(self, encoder: FeatureEncoder, backbone: Backbone, tasks: dict[str, Task]):
        super().__init__()
        backbone.check_tasks(tasks)
        self.encoder, self.backbone = encoder, backbone
        self.heads = nn.ModuleDict({name: task.head(backbone.output_dim) for name, task in tasks.items()})

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        reps = self.backbone(self.encoder(features))
        return self.backbone.combine({name: head(reps[name]) for name, head in self.heads.items()})

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.backbone.shared_parameters()
