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

New users and new items. ``spec.id_columns`` names the user / item id columns; their ids are indexed over
every row of the dataset, so an id never seen in training has a row that training never touched. How such
an id is represented at evaluation is ``new_users`` / ``new_items``:

- ``random``: its own row (initialised like every row from the run's seed, never trained);
- ``mean``: in eval mode, the mean of the embeddings of the ids seen in training;
- ``features``: ID dropout (DropoutNet, Volkovs, Yu & Poutanen, NeurIPS 2017): in training each id is
  replaced by the reserved row 0 with probability ``id_dropout``, so row 0 learns "an id we know nothing
  about" and the model learns to predict from the other (user / item feature) columns when it sees it; in
  eval every unseen id uses row 0;
- ``pretrained`` (items only): the item's embedding is ``P q_i`` with ``q_i`` its row of a vectors file
  (e.g. a content model's output; ``.npy`` [num_items + 1, d], row = id, or Parquet keyed by ``item_id``),
  frozen (a buffer) or fine-tuned (``item_vectors_trainable``), and ``P`` a learned linear projection when
  ``d`` differs from the column's embedding dimension (identity otherwise). A new item has its vector too.

Which ids were seen comes from ``set_seen`` (the pipeline passes ``datamodule.seen_ids()``); it is kept in a
buffer, so a checkpoint carries it. An id column with a strategy other than ``random``, a pretrained one, or
any id column under ``sparse=True`` gets its own table; the other columns keep the shared one.

``sparse=True`` gives the id tables sparse gradients (``nn.Embedding(sparse=True)``): a step then costs the
rows in the batch, not the table. Their parameters carry the ``sparse_grad`` flag
(``mtl_experiments.optimizer.sparse_adam``), so ``optimizer=sparse_adam`` steps them with SparseAdam.

The embedding tables are *not* shared dense parameters: gradient-based weighting methods and conflict
metrics never see them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtl_experiments import checks
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError
from mtl_experiments.optimizer.sparse_adam import mark_sparse

STRATEGIES = {"user_id": ("random", "mean", "features"), "item_id": ("random", "mean", "features", "pretrained")}
OPTION = {"user_id": "new_users", "item_id": "new_items"}
VECTOR_ID_COLUMN = "item_id"


def load_item_vectors(path: str | Path, num_rows: int) -> Tensor:
    """``Tensor[num_rows, d]`` (float32) from ``.npy`` (row = item id) or Parquet (``item_id`` + vector columns).

    A Parquet file holds one row per item: its ``item_id`` and either one list column (the vector) or several
    numeric columns (its components, in file order). Rows are placed by id (file order does not matter); every
    id ``1 .. num_rows - 1`` must be present; row 0 (the unknown item) is zeros unless the file has id 0.
    """
    p = Path(str(path)).expanduser()
    fix = "Set features.item_vectors=<path to a .npy or .parquet file>."
    if not p.is_file():
        raise ConfigError(f"Item vectors file not found: {p.resolve()}. {fix}")
    if p.suffix == ".npy":
        vectors = np.load(p, allow_pickle=False)
        if vectors.ndim != 2 or vectors.shape[0] != num_rows:
            raise ConfigError(
                f"Item vectors {p} have shape {tuple(vectors.shape)}; expected [{num_rows}, d]: one row per item id "
                f"0..{num_rows - 1} (row 0 = the unknown item)."
            )
    elif p.suffix in (".parquet", ".pq"):
        vectors = _parquet_vectors(p, num_rows)
    else:
        raise ConfigError(f"Item vectors {p}: unsupported file type {p.suffix!r}; use .npy or .parquet. {fix}")
    if not np.issubdtype(vectors.dtype, np.number) or not np.isfinite(vectors).all():
        raise ConfigError(f"Item vectors {p} must be finite numbers.")
    return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))


def _is_list(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _parquet_vectors(p: Path, num_rows: int) -> np.ndarray:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"{p}: reading Parquet needs pyarrow; `pip install pyarrow`, or use a .npy file.") from e
    table = pq.read_table(p)
    if VECTOR_ID_COLUMN not in table.column_names:
        raise ConfigError(f"Item vectors {p} have no '{VECTOR_ID_COLUMN}' column (columns: {table.column_names}).")
    ids = table.column(VECTOR_ID_COLUMN).to_numpy().astype(np.int64)
    others = [c for c in table.column_names if c != VECTOR_ID_COLUMN]
    if not others:
        raise ConfigError(f"Item vectors {p} have no vector column besides '{VECTOR_ID_COLUMN}'.")
    try:
        if len(others) == 1 and _is_list(table.schema.field(others[0]).type):
            rows = np.stack([np.asarray(v, dtype=np.float64) for v in table.column(others[0]).to_pylist()])
        else:
            rows = np.column_stack([table.column(c).to_numpy() for c in others]).astype(np.float64)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Item vectors {p}: the vector column(s) {others} are not numeric vectors ({e}).") from e
    bad = ids[(ids < 0) | (ids >= num_rows)]
    if bad.size:
        raise ConfigError(f"Item vectors {p} name item ids {sorted(set(bad.tolist()))[:5]} outside 0..{num_rows - 1}.")
    if np.unique(ids).size != ids.size:
        raise ConfigError(f"Item vectors {p} list some item ids more than once.")
    missing = np.setdiff1d(np.arange(1, num_rows), ids)
    if missing.size:
        raise ConfigError(
            f"Item vectors {p} lack {missing.size} item id(s), e.g. {missing[:5].tolist()}; every item id "
            f"1..{num_rows - 1} needs a vector."
        )
    vectors = np.zeros((num_rows, rows.shape[1]), dtype=np.float64)
    vectors[ids] = rows
    return vectors


class IdEmbedding(nn.Module):
    """The table of one user or item id column and its strategy for ids unseen in training (module docstring)."""

    def __init__(
        self,
        num_rows: int,
        dim: int,
        strategy: str = "random",
        id_dropout: float = 0.0,
        sparse: bool = False,
        vectors: Tensor | None = None,
        trainable: bool = False,
    ):
        super().__init__()
        self.strategy, self.id_dropout, self.sparse = strategy, float(id_dropout), bool(sparse)
        if strategy == "pretrained":
            if trainable:
                self.table = nn.Embedding.from_pretrained(vectors.clone(), freeze=False, sparse=self.sparse)
            else:  # frozen: a buffer, so no optimizer ever sees it; kept in checkpoints (they load without the file)
                self.register_buffer("vectors", vectors.clone())
            d = vectors.shape[1]
            self.projection = nn.Linear(d, dim) if d != dim else nn.Identity()
        else:
            self.table = nn.Embedding(num_rows, dim, sparse=self.sparse)
        if self.sparse and hasattr(self, "table"):
            mark_sparse(self.table.weight)
        if strategy in ("mean", "features"):
            # every id counts as seen until set_seen says otherwise (an encoder used without a datamodule)
            self.register_buffer("seen", torch.ones(num_rows, dtype=torch.bool))

    def set_seen(self, ids: Tensor) -> None:
        if not hasattr(self, "seen"):
            return
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.seen.numel()):
            raise ConfigError(
                f"set_seen: ids must lie in 0..{self.seen.numel() - 1} (the id column's rows), got "
                f"{int(ids.min())}..{int(ids.max())}."
            )
        self.seen.zero_()
        self.seen[ids.to(self.seen.device)] = True

    def forward(self, ids: Tensor) -> Tensor:
        if self.strategy == "pretrained":
            if hasattr(self, "vectors"):
                return self.projection(F.embedding(ids, self.vectors))
            return self.projection(self.table(ids))
        if self.strategy == "features":
            if self.training and self.id_dropout > 0:
                # the global RNG (seeded by the run, saved in checkpoints), as nn.Dropout does
                drop = torch.rand(ids.shape, device=ids.device) < self.id_dropout
                ids = ids.masked_fill(drop, 0)
            elif not self.training:
                ids = torch.where(self.seen[ids], ids, torch.zeros_like(ids))
        out = self.table(ids)
        if self.strategy == "mean" and not self.training:
            unseen = ~self.seen[ids]
            if unseen.any():
                weight = self.table.weight
                # a mat-vec over the table, no copy of the seen rows (the table may have millions of rows)
                mean = (self.seen.to(weight.dtype) @ weight) / self.seen.sum().clamp(min=1)
                out = torch.where(unseen.unsqueeze(-1), mean, out)
        return out


class FeatureEncoder(nn.Module):
    def __init__(
        self,
        spec: FeatureSpec,
        embedding_dim: int = 8,
        embedding_dims: Mapping[str, int] | None = None,
        new_users: str = "random",
        new_items: str = "random",
        id_dropout: float = 0.1,
        item_vectors: str | None = None,
        item_vectors_trainable: bool = False,
        sparse: bool = False,
        default_item_vectors: str | Path | None = None,
    ):
        super().__init__()
        self.spec = spec
        dims = self._dims(spec, embedding_dim, embedding_dims)
        columns = list(spec.categorical)
        self.num_categorical = len(columns)
        self.embedding_dims = dims
        # the common dimension when there is one (kept for callers that read it), else None
        same = len(set(dims.values())) <= 1
        self.embedding_dim = next(iter(dims.values()), int(embedding_dim)) if same else None

        id_columns = dict(spec.id_columns)  # {"user_id": column, "item_id": column}
        strategies = {"user_id": new_users, "item_id": new_items}
        tables = self._check_options(id_columns, strategies, id_dropout, sparse, columns)
        self.id_tables = nn.ModuleDict()
        self.id_index: dict[str, int] = {}
        for key in tables:
            column = id_columns[key]
            vectors = None
            if strategies[key] == "pretrained":
                path = item_vectors if item_vectors is not None else default_item_vectors
                if path is None:
                    raise ConfigError(
                        "features.new_items=pretrained needs item vectors: set features.item_vectors=<.npy or "
                        ".parquet file>; this dataset provides no default (content_vectors_path)."
                    )
                vectors = load_item_vectors(path, spec.categorical[column])
            self.id_tables[key] = IdEmbedding(
                spec.categorical[column],
                dims[column],
                strategies[key],
                id_dropout=id_dropout,
                sparse=sparse,
                vectors=vectors,
                trainable=bool(item_vectors_trainable),
            )
            self.id_index[key] = columns.index(column)
        self._build_rest(columns, dims)
        self.output_dim = sum(dims.values()) + spec.num_numeric

    @staticmethod
    def _dims(spec: FeatureSpec, embedding_dim, embedding_dims: Mapping[str, int] | None) -> dict[str, int]:
        """The embedding dimension of every categorical column: the config's ``embedding_dims``, else the
        dataset's suggestion, else ``embedding_dim``."""
        overrides = dict(embedding_dims or {})
        unknown = sorted(set(overrides) - set(spec.categorical))
        if unknown:
            raise ConfigError(
                f"features.embedding_dims names {unknown}, which are not categorical columns of this dataset; "
                f"its categorical columns are {sorted(spec.categorical)}."
            )
        embedding_dim = checks.positive_int("features.embedding_dim", embedding_dim)
        return {
            c: checks.positive_int(
                f"features.embedding_dims.{c}", overrides.get(c, spec.embedding_dims.get(c, embedding_dim))
            )
            for c in spec.categorical
        }

    def _build_rest(self, columns: list[str], dims: Mapping[str, int]) -> None:
        """Every column without an id table: one shared table when their dimensions agree (a single gather),
        else one each."""
        own = {self.id_index[k] for k in self.id_index}
        rest = [i for i in range(len(columns)) if i not in own]
        cards = [self.spec.categorical[columns[i]] for i in rest]
        self.shared_table = len({dims[columns[i]] for i in rest}) <= 1
        self._rest = rest
        if cards and self.shared_table:
            self.embedding = nn.Embedding(sum(cards), dims[columns[rest[0]]])
            self.register_buffer("offsets", torch.tensor([0, *cards[:-1]]).cumsum(0), persistent=False)
            self.register_buffer("rest_index", torch.tensor(rest, dtype=torch.long), persistent=False)
        elif cards:
            self.embeddings = nn.ModuleList(
                nn.Embedding(self.spec.categorical[columns[i]], dims[columns[i]]) for i in rest
            )

    @staticmethod
    def _check_options(id_columns, strategies, id_dropout, sparse, columns) -> list[str]:
        """Validates the new-user / new-item options; returns the id keys that get their own table."""
        stray = {k: c for k, c in id_columns.items() if k not in STRATEGIES or c not in columns}
        if stray:
            raise ConfigError(
                f"FeatureSpec.id_columns {stray} must map 'user_id' / 'item_id' to categorical columns "
                f"(the dataset's are {columns})."
            )
        for key, strategy in strategies.items():
            extra = "pretrained vectors exist for items only" if strategy == "pretrained" else None
            checks.choice(f"features.{OPTION[key]}", strategy, STRATEGIES[key], hint=extra)
            if strategy != "random" and key not in id_columns:
                raise ConfigError(
                    f"features.{OPTION[key]}={strategy} needs {'a user' if key == 'user_id' else 'an item'} id column, "
                    f"and this dataset has none (its id columns: {id_columns or 'none'}); leave "
                    f"features.{OPTION[key]}=random."
                )
        checks.fraction("features.id_dropout", id_dropout, open_high=True)
        for key, strategy in strategies.items():
            if strategy == "features" and float(id_dropout) == 0.0:
                raise ConfigError(
                    f"features.{OPTION[key]}=features trains the shared unknown-id row by ID dropout, so it needs "
                    "features.id_dropout > 0 (e.g. 0.1)."
                )
        if sparse and not id_columns:
            raise ConfigError(
                "features.sparse=true gives the user/item id tables sparse gradients, and this dataset has no id "
                "columns; leave features.sparse=false."
            )
        return [k for k in id_columns if sparse or strategies[k] != "random"]

    def set_seen(self, seen_ids: Mapping[str, Tensor]) -> None:
        """``{"user_id": ids, "item_id": ids}`` seen in training (``datamodule.seen_ids()``); other ids are new."""
        for key, ids in seen_ids.items():
            if key in self.id_tables:
                self.id_tables[key].set_seen(ids)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        parts = []
        if self.num_categorical:
            ids = features["categorical"]
            if not self.id_tables:  # the fast path: every column in the one shared table
                if self.shared_table:
                    parts.append(self.embedding(ids + self.offsets).flatten(1))
                else:
                    parts.extend(emb(ids[:, i]) for i, emb in enumerate(self.embeddings))
            else:
                cols: list[Tensor | None] = [None] * self.num_categorical
                if self._rest and self.shared_table:
                    shared = self.embedding(ids.index_select(1, self.rest_index) + self.offsets)
                    for j, i in enumerate(self._rest):
                        cols[i] = shared[:, j]
                elif self._rest:
                    for i, emb in zip(self._rest, self.embeddings, strict=True):
                        cols[i] = emb(ids[:, i])
                for key, i in self.id_index.items():
                    cols[i] = self.id_tables[key](ids[:, i])
                parts.append(torch.cat(cols, dim=1))
        if self.spec.num_numeric:
            parts.append(features["numeric"])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
