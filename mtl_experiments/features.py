"""The shared input layer, built from a dataset's FeatureSpec (DESIGN.md §2-3).

Categorical columns are embedded through one table with per-column offsets (a single gather for all
columns), numeric columns pass through; the two are concatenated. The embedding table is *not* a
shared dense parameter: gradient-based weighting methods and conflict metrics never see it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl_experiments.data.base import FeatureSpec


class FeatureEncoder(nn.Module):
    def __init__(self, spec: FeatureSpec, embedding_dim: int = 8):
        super().__init__()
        self.spec = spec
        cards = list(spec.categorical.values())
        self.num_categorical = len(cards)
        self.embedding_dim = embedding_dim
        if cards:
            self.embedding = nn.Embedding(sum(cards), embedding_dim)
            self.register_buffer("offsets", torch.tensor([0, *cards[:-1]]).cumsum(0), persistent=False)
        self.output_dim = self.num_categorical * embedding_dim + spec.num_numeric

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        parts = []
        if self.num_categorical:
            parts.append(self.embedding(features["categorical"] + self.offsets).flatten(1))
        if self.spec.num_numeric:
            parts.append(features["numeric"])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
