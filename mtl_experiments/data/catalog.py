"""What a dataset knows about its users and items, so a trained model can score any user against every item.

Serving (``scripts/recommend.py``) needs more than the training rows: the features of a user and of every
candidate item, assembled into the model's input layout (``FeatureSpec`` column order). A dataset that can
serve recommendations builds a ``Catalog`` in ``load()``: one table per side, column -> tensor indexed by id
(row 0 = the unknown id), for every input column that belongs to the user or to the item, plus the training
interactions (to exclude items a user already saw).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError, DataError


@dataclass
class Catalog:
    """``users[col]`` is ``Tensor[U + 1]`` and ``items[col]`` ``Tensor[I + 1]``, indexed by id (row 0 unknown);
    every categorical and numeric column of ``spec`` is in exactly one of them. ``train_user_id`` /
    ``train_item_id``: the training interactions. ``vocabularies`` (optional): ``{col: {raw value: id}}`` for
    categorical user columns, so a new user's features can be given as raw values ("F", "25") rather than ids."""

    users: dict[str, Tensor]
    items: dict[str, Tensor]
    spec: FeatureSpec
    train_user_id: Tensor
    train_item_id: Tensor
    vocabularies: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        columns = [*self.spec.categorical, *self.spec.numeric]
        missing = [c for c in columns if c not in self.users and c not in self.items]
        both = [c for c in columns if c in self.users and c in self.items]
        if missing or both:
            raise DataError(
                "Catalog tables must hold every input column exactly once: "
                + (f"missing {missing}" if missing else "")
                + (f"; in both tables {both}" if both else "")
            )

    @property
    def num_users(self) -> int:
        return len(next(iter(self.users.values()))) - 1

    @property
    def num_items(self) -> int:
        return len(next(iter(self.items.values()))) - 1

    @property
    def user_columns(self) -> list[str]:
        """The user-side input columns other than the id (what a new user must describe)."""
        id_column = self.spec.id_columns.get("user_id")
        return [c for c in self.users if c != id_column]

    def knows_user(self, user_id: int) -> bool:
        return 1 <= user_id <= self.num_users

    def encode_user(self, values: Mapping[str, str | float]) -> dict[str, float | int]:
        """A new user's feature values (raw strings where a vocabulary exists, else ids / numbers) -> table values."""
        unknown = sorted(set(values) - set(self.user_columns))
        if unknown:
            raise ConfigError(
                f"Unknown user feature(s) {unknown}; this dataset's user features are {self.user_columns}."
            )
        missing = [c for c in self.user_columns if c not in values]
        if missing:
            raise ConfigError(
                f"A user unknown to the model needs every user feature; missing {missing} "
                f"(give them as --user-features {','.join(f'{c}=...' for c in self.user_columns)})."
            )
        out: dict[str, float | int] = {}
        for col, raw in values.items():
            if col in self.spec.numeric:
                try:
                    out[col] = float(raw)
                except ValueError:
                    raise ConfigError(f"User feature {col} is numeric, got {raw!r}.") from None
                continue
            vocab = self.vocabularies.get(col)
            if vocab is not None and str(raw) in vocab:
                out[col] = int(vocab[str(raw)])
                continue
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(
                    f"User feature {col}={raw!r} is not a known value"
                    + (f"; known values: {sorted(vocab)[:20]}" if vocab else "")
                    + "."
                ) from None
            if not 0 <= value < self.spec.categorical[col]:
                raise ConfigError(f"User feature {col}={value} is out of range [0, {self.spec.categorical[col]}).")
            out[col] = value
        return out

    def features(self, user_id: int, item_ids: Tensor, user_values: Mapping[str, float | int] | None = None) -> dict:
        """The model input for one user against ``item_ids``: ``{"categorical": [N, C], "numeric": [N, M]}``.
        ``user_values`` (from ``encode_user``) replace the table's user row (a new user: ``user_id`` 0)."""
        n = len(item_ids)

        def column(col: str, dtype: torch.dtype) -> Tensor:
            if col in self.items:
                return self.items[col][item_ids].to(dtype)
            known = user_values is not None and col in user_values
            value = user_values[col] if known else self.users[col][user_id]
            return torch.full((n,), value, dtype=dtype) if not isinstance(value, Tensor) else value.expand(n).to(dtype)

        out = {}
        if self.spec.categorical:
            out["categorical"] = torch.stack([column(c, torch.long) for c in self.spec.categorical], dim=1)
        if self.spec.numeric:
            out["numeric"] = torch.stack([column(c, torch.float32) for c in self.spec.numeric], dim=1)
        return out

    def seen_items(self, user_id: int) -> Tensor:
        """The items ``user_id`` interacted with in training (to exclude from its recommendations)."""
        return torch.unique(self.train_item_id[self.train_user_id == user_id])
