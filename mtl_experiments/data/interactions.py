"""Datasets of an interaction log (one row per user-item event, in time order) with per-user and per-item feature
tables, read from files and cached: what data/movielens.py and data/kuairand.py share.

A subclass parses its files into a cache entry (``pack``): the log rows (``user_id``, ``item_id``, ``timestamp``,
every signal, optionally per-row ``context`` columns), the rows of each split (data/splits.py's ``split_rows``,
``split`` / ``val_fraction`` / ``test_fraction`` / ``cold_fraction`` / ``split_seed``) and the user and item tables
(row = id, row 0 the unknown id; column 0 the id itself). All signals are cached, so the task list is not part of
the cache key: ``_unpack`` picks the tasks' labels (``labels_for``), gathers each row's features from the tables
and builds ``item_info`` and the ``catalog`` recommendations are served from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mtl_experiments.data.cache import CachedDataModule
from mtl_experiments.data.catalog import Catalog
from mtl_experiments.data.spec import FeatureSpec, ItemInfo, Split, Splits, gather
from mtl_experiments.data.splits import check_split_options, split_rows
from mtl_experiments.errors import ConfigError


def fit_vocabulary(values: np.ndarray) -> list[str]:
    """The sorted distinct values (strings; None = missing, left out)."""
    return sorted({v for v in values.tolist() if v is not None})


def encode(values: np.ndarray, vocabulary: Sequence[str]) -> np.ndarray:
    """Ids 1..K by position in ``vocabulary``; 0 for None and for values not in it."""
    return pd.Index(vocabulary, dtype=object).get_indexer(values).astype(np.int64) + 1  # -1 -> 0


def code_table(
    num_ids: int, text: Mapping[str, np.ndarray], fit_ids: np.ndarray
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Per-id categorical columns as ids: ``text[c][k - 1]`` is the value of id k (None = missing). Returns the
    int64 table ``[num_ids + 1, 1 + len(text)]`` (column 0 the id itself, then ``text``'s columns; row 0 the
    unknown id, all 0) and each column's vocabulary, fitted on the ids ``fit_ids`` only (the training rows' users
    or items), so a value only held-out rows have is id 0 too."""
    vocabularies = {c: fit_vocabulary(values[fit_ids - 1]) for c, values in text.items()}
    table = np.zeros((num_ids + 1, 1 + len(text)), np.int64)
    table[:, 0] = np.arange(num_ids + 1)
    for j, (c, values) in enumerate(text.items(), start=1):
        table[1:, j] = encode(values, vocabularies[c])
    return table, vocabularies


def standardise(values: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(values - mean) / std`` (float64) with the mean and std of ``fit``'s finite values (a missing value, NaN,
    becomes the mean, i.e. 0), and the two statistics."""
    known = fit[np.isfinite(fit)]
    mean = float(known.mean()) if len(known) else 0.0
    std = float(known.std()) if len(known) and known.std() > 0 else 1.0
    return (np.where(np.isfinite(values), values, mean) - mean) / std, mean, std


def check_tasks(tasks: Mapping, signals: Mapping[str, tuple[str, ...]], dataset: str) -> None:
    """Every task's label is a signal of the dataset, and its kind one that signal allows."""
    for name, task in tasks.items():
        if task.label not in signals:
            raise ConfigError(
                f"data.tasks.{name}: {dataset} has no signal {task.label!r}; available signals: {list(signals)} "
                f"(name the task after one, or set data.tasks.{name}.label=<signal>)."
            )
        if task.kind not in signals[task.label]:
            raise ConfigError(
                f"data.tasks.{name}: signal {task.label!r} trains a task of kind {' or '.join(signals[task.label])}, "
                f"got kind {task.kind!r}."
            )


def labels_for(tasks: Mapping, signals: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{task: its signal}``, as the task stores labels (``Task.encode_labels``)."""
    return {name: task.encode_labels(signals[task.label]) for name, task in tasks.items()}


def next_positive_item(user_id: np.ndarray, item_id: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """For each row (rows in time order), the item of the same user's next positive row after it; 0 if none."""
    order = np.lexsort((np.arange(len(user_id)), user_id))  # by user, then time
    users, items, pos = user_id[order], item_id[order], np.flatnonzero(positive[order])
    nxt = np.searchsorted(pos, np.arange(len(order)), side="right")
    found = nxt < len(pos)
    target = pos[np.minimum(nxt, max(len(pos) - 1, 0))] if len(pos) else np.zeros(len(order), np.int64)
    found &= users[target] == users
    result = np.zeros(len(order), dtype=np.int64)
    result[order] = np.where(found, items[target], 0)
    return result


def log_splits(
    categorical: torch.Tensor,
    numeric: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    rows: Mapping[str, torch.Tensor],
    parts: Mapping[str, torch.Tensor],
) -> dict[str, Split]:
    """``{split: its rows}`` of a log: inputs, labels and the rows' ``user_id`` / ``item_id`` / ``timestamp``;
    ``parts``: ``{split: row indices}`` (sorted, so a log in time order stays in time order)."""
    table = {
        "features": {"categorical": categorical, "numeric": numeric},
        "labels": dict(labels),
        "user_id": rows["user_id"],
        "item_id": rows["item_id"],
        "timestamp": rows["timestamp"],
    }
    return {k: gather(table, idx) for k, idx in parts.items()}


def _tensors(tree):
    """numpy arrays (at any depth of dicts) -> tensors; tensors and None stay as they are."""
    if isinstance(tree, dict):
        return {k: _tensors(v) for k, v in tree.items()}
    return torch.from_numpy(np.ascontiguousarray(tree)) if isinstance(tree, np.ndarray) else tree


class InteractionDataModule(CachedDataModule):
    """The shared part of a cached interaction-log dataset: tasks checked against ``SIGNALS`` (``{signal: the
    task kinds it can train}``; ``DEFAULT_TASKS`` when ``tasks`` is None), the split options, the cache entry's
    layout (``pack``) and its unpacking into splits, ``item_info`` and ``catalog``."""

    SIGNALS: Mapping[str, tuple[str, ...]] = {}
    DEFAULT_TASKS: Mapping = {}

    def __init__(
        self,
        tasks: Mapping | None,
        root: str,
        split: str = "random",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        cold_fraction: float = 0.1,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(tasks=self.DEFAULT_TASKS if tasks is None else tasks, root=root, **kwargs)
        check_tasks(self.tasks, self.SIGNALS, self.NAME)
        check_split_options(split, cold_fraction, val_fraction, test_fraction)
        self.split = split
        self.fractions = {"val_fraction": float(val_fraction), "test_fraction": float(test_fraction),
                          "cold_fraction": float(cold_fraction)}  # fmt: skip
        self.split_seed = int(split_seed)

    def split_config(self) -> dict:
        """The split options, for ``preprocessing_config``."""
        return {"split": self.split, **self.fractions, "split_seed": self.split_seed}

    def split_parts(self, user: np.ndarray, item: np.ndarray, timestamp: np.ndarray) -> dict[str, np.ndarray]:
        """``{"train"|"val"|"test": sorted row indices}`` of the log rows (ids 1..)."""
        return split_rows(
            self.split,
            len(user),
            user_id=user,
            item_id=item,
            timestamp=timestamp,
            seed=self.split_seed,
            **self.fractions,
        )

    def pack(
        self,
        *,
        rows: Mapping,
        parts: Mapping[str, np.ndarray],
        users: np.ndarray,
        items: np.ndarray,
        item_numeric: np.ndarray,
        category: np.ndarray | torch.Tensor | None,
        spec: FeatureSpec,
        vocabularies: dict[str, list[str]],
        numeric_stats: dict[str, list[float]],
        raw_ids: Mapping[str, np.ndarray],
    ) -> dict:
        """The cache entry, plain containers and tensors only. ``rows``: per log row ``user_id``, ``item_id``,
        ``timestamp``, ``signals`` (``{signal: values}``) and optionally ``context`` (``[N, K]`` categorical ids,
        after the user's and the item's columns). ``users`` / ``items``: the categorical tables ``[U + 1, ...]`` /
        ``[I + 1, ...]`` (``spec.categorical`` lists the user's columns, the item's, then the context's);
        ``item_numeric``: ``[I + 1, len(spec.numeric)]``; ``category``: per item id (``item_info``), or None;
        ``raw_ids``: ``{id column: the files' raw id of ids 1..}``."""
        return {
            "rows": _tensors(dict(rows)),
            "parts": {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in parts.items()},
            "user_categorical": _tensors(users),
            "item_categorical": _tensors(items),
            "item_numeric": _tensors(item_numeric),
            "category": _tensors(category),
            "feature_spec": spec.to_dict(),
            "vocabularies": vocabularies,
            "numeric_stats": numeric_stats,
            "raw_ids": _tensors(dict(raw_ids)),
            "config": self.preprocessing_config(),
        }

    def _unpack(self, data: dict) -> Splits:
        self.vocabularies, self.numeric_stats = data["vocabularies"], data["numeric_stats"]
        self.raw_ids = data["raw_ids"]  # id k is raw id raw_ids[...][k - 1] of the files
        spec = FeatureSpec.from_dict(data["feature_spec"])
        user_cat, item_cat, item_num = data["user_categorical"], data["item_categorical"], data["item_numeric"]
        rows = data["rows"]
        context = rows.get("context")
        columns = [user_cat[rows["user_id"]], item_cat[rows["item_id"]], *([] if context is None else [context])]
        labels = labels_for(self.tasks, rows["signals"])
        splits = log_splits(torch.cat(columns, dim=1), item_num[rows["item_id"]], labels, rows, data["parts"])
        self.item_info = ItemInfo(num_items=item_cat.shape[0] - 1, category=data["category"])
        self.catalog = None
        if context is None or context.shape[1] == 0:  # context columns belong to neither table: nothing to serve from
            names = list(spec.categorical)
            user_columns, item_columns = names[: user_cat.shape[1]], names[user_cat.shape[1] :]
            self.catalog = Catalog(
                users={c: user_cat[:, j] for j, c in enumerate(user_columns)},
                items={
                    **{c: item_cat[:, j] for j, c in enumerate(item_columns)},
                    **{c: item_num[:, j] for j, c in enumerate(spec.numeric)},
                },
                spec=spec,
                train_user_id=splits["train"]["user_id"],
                train_item_id=splits["train"]["item_id"],
                vocabularies={c: {v: k for k, v in enumerate(self.vocabularies[c], 1)} for c in user_columns[1:]},
            )
        return Splits(splits["train"], splits["val"], splits["test"], spec)
