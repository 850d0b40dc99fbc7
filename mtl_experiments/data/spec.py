"""The data contract every dataset serves and every consumer (tasks, features, catalogue, model) reads (DESIGN.md §2).

A split, and every batch cut from it, is a dict ``{"features": {"numeric": FloatTensor[B, N], "categorical":
LongTensor[B, C]}, "labels": {task: Tensor[B]}}`` plus ``user_id`` / ``item_id`` / ``timestamp`` where the dataset
has them (and ``segments`` on evaluation splits). Whole splits live in memory as tensors and each batch is served
by one ``gather``, never per-sample ``__getitem__`` + collate (several times slower for tabular data).

A leaf module: it imports nothing of the project but its errors, so anything may import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple, TypedDict

import numpy as np
import torch
from torch import Tensor

from mtl_experiments.errors import DataError

ID_KEYS = ("user_id", "item_id")


class Split(TypedDict, total=False):
    """One split (or batch): tensors with one row per example."""

    features: dict[str, Tensor]  # "numeric": Float[B, N], "categorical": Long[B, C]
    labels: dict[str, Tensor]  # task name -> Tensor[B]
    user_id: Tensor  # Long[B], 1-based; 0 = unknown
    item_id: Tensor
    timestamp: Tensor
    segments: dict[str, Tensor]  # evaluation splits: segment name -> Bool[B] (data/base.py)


class Splits(NamedTuple):
    """What a dataset's ``load()`` returns: the three splits and the description of their inputs."""

    train: Split
    val: Split
    test: Split
    feature_spec: FeatureSpec


class LabelType(str, Enum):
    """What a task's label column holds: all a dataset needs to know to read and check it (``Task.label_type``)."""

    BINARY = "binary"  # 0 / 1
    REAL = "real"  # finite numbers
    CLASS = "class"  # class ids 0 .. C-1 (or class names a dataset maps to them)
    ITEM = "item"  # item ids 1 .. I of the dataset's item vocabulary, 0 = no label

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the label tensor: ids are int64, everything else float32."""
        return torch.int64 if self in (LabelType.CLASS, LabelType.ITEM) else torch.float32


def num_rows(split: Split) -> int:
    return next(iter(split["labels"].values())).shape[0]


def gather(tree, index: Tensor | slice):
    """The rows ``index`` of every tensor in a (nested) dict of tensors, e.g. a batch of a split."""
    if isinstance(tree, Tensor):
        return tree[index]
    return {k: gather(v, index) for k, v in tree.items()}


def as_labels(values: np.ndarray | Tensor, label_type: LabelType) -> Tensor:
    """A label column as the tensor ``label_type`` asks for (no copy when it has that dtype already)."""
    tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
    return tensor.to(label_type.dtype)


@dataclass(frozen=True)
class FeatureSpec:
    """What the inputs look like, so the feature layer and backbones are built from data, not constants.

    ``numeric`` names the columns of ``features["numeric"]`` and ``categorical`` those of
    ``features["categorical"]`` (in that order) with their cardinality: the number of embedding rows,
    ids ``0 .. cardinality - 1``, *including* any reserved id (real-data modules reserve id 0 for
    missing and out-of-vocabulary values). ``embedding_dims`` optionally suggests a dimension per
    categorical column; the feature layer's config (``features.embedding_dims``) overrides it.
    """

    numeric: tuple[str, ...] = ()
    categorical: Mapping[str, int] = field(default_factory=dict)  # column name -> cardinality (incl. reserved ids)
    embedding_dims: Mapping[str, int] = field(default_factory=dict)  # optional column name -> embedding dim
    # {"user_id": <categorical column>, "item_id": <categorical column>}: which columns hold the user / item id
    # (either key optional), so the feature layer can represent ids never seen in training (features.py)
    id_columns: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.embedding_dims) - set(self.categorical))
        if unknown:
            raise DataError(f"FeatureSpec.embedding_dims names non-categorical column(s) {unknown}.")
        bad = {k: c for k, c in self.id_columns.items() if k not in ID_KEYS or c not in self.categorical}
        if bad:
            raise DataError(
                f"FeatureSpec.id_columns {bad}: keys must be {list(ID_KEYS)} and values categorical columns."
            )

    @property
    def num_numeric(self) -> int:
        return len(self.numeric)

    @property
    def num_categorical(self) -> int:
        return len(self.categorical)

    def to_dict(self) -> dict:
        """Plain containers only (loadable with ``torch.load(weights_only=True)``, e.g. from a cache)."""
        return {
            "numeric": list(self.numeric),
            "categorical": dict(self.categorical),
            "embedding_dims": dict(self.embedding_dims),
            "id_columns": dict(self.id_columns),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> FeatureSpec:
        return cls(
            numeric=tuple(d.get("numeric", ())),
            categorical=dict(d.get("categorical", {})),
            embedding_dims=dict(d.get("embedding_dims", {})),
            id_columns=dict(d.get("id_columns", {})),
        )


@dataclass(frozen=True)
class ItemInfo:
    """The item catalogue a dataset knows: ids ``1 .. num_items`` (0 = unknown) and, where items have one, a
    category per id (``category[0]`` unused), for retrieval heads and beyond-accuracy metrics (diversity)."""

    num_items: int
    category: Tensor | None = None
