"""The shared input layer, built from a dataset's FeatureSpec (DESIGN.md §2-3).

Each categorical column is embedded, numeric columns pass through (real-data modules standardise them
with training-split statistics before they get here); the two are concatenated, embeddings first in
``spec.categorical`` order, then the numeric columns.

Embedding dimension per column: ``embedding_dims[column]`` (config) if given, else the dataset's
suggestion ``spec.embedding_dims[column]``, else the global ``embedding_dim``. When every column has
the same dimension, all columns share one table with per-column offsets (a single gather for the whole
batch); otherwise each column gets its own ``nn.Embedding``.

Id 0 of a real-data column is its missing / out-of-vocabulary id (see ``FeatureSpec``); here it is an
ordinary learned row, so missing and unseen values get a trained "unknown" vector.

The embedding tables are *not* shared dense parameters: gradient-based weighting methods and conflict
metrics never see them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mtl_experiments.data.base import FeatureSpec
from mtl_experiments.errors import ConfigError


class FeatureEncoder(nn.Module):
    def __init__(self, spec: FeatureSpec, embedding_dim: int = 8, embedding_dims: Mapping[str, int] | None = None):
        super().__init__()
        self.spec = spec
        overrides = dict(embedding_dims or {})
        unknown = sorted(set(overrides) - set(spec.categorical))
        if unknown:
            raise ConfigError(
                f"features.embedding_dims names {unknown}, which are not categorical columns of this dataset; "
                f"its categorical columns are {sorted(spec.categorical)}."
            )
        dims = {c: int(overrides.get(c, spec.embedding_dims.get(c, embedding_dim))) for c in spec.categorical}
        bad = {c: d for c, d in dims.items() if d <= 0}
        if int(embedding_dim) <= 0 or bad:
            raise ConfigError(
                f"Embedding dimensions must be positive integers, got features.embedding_dim={embedding_dim}"
                + (f" and {bad}" if bad else "")
                + "."
            )
        cards = list(spec.categorical.values())
        self.num_categorical = len(cards)
        self.embedding_dims = dims
        self.shared_table = len(set(dims.values())) <= 1
        # the common dimension when there is one (kept for callers that read it), else None
        self.embedding_dim = next(iter(dims.values()), int(embedding_dim)) if self.shared_table else None
        if cards and self.shared_table:
            self.embedding = nn.Embedding(sum(cards), self.embedding_dim)
            self.register_buffer("offsets", torch.tensor([0, *cards[:-1]]).cumsum(0), persistent=False)
        elif cards:
            self.embeddings = nn.ModuleList(nn.Embedding(card, dims[c]) for c, card in spec.categorical.items())
        self.output_dim = sum(dims.values()) + spec.num_numeric

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        parts = []
        if self.num_categorical:
            ids = features["categorical"]
            if self.shared_table:
                parts.append(self.embedding(ids + self.offsets).flatten(1))
            else:
                parts.extend(emb(ids[:, i]) for i, emb in enumerate(self.embeddings))
        if self.spec.num_numeric:
            parts.append(features["numeric"])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
