"""The one streaming pass over a log's shards (data/stream): vocabularies, numeric statistics, rows per split and
row group, labels checked; cached next to the data; and the encoding of a row group into the batch contract's
arrays with what it found.

Preprocessing is ``data=tabular``'s (data/tabular.py), fitted on the training rows only: categorical values get
ids 1..K in sorted order (0 = missing or unseen in training), or ``1 + hash(value) mod n`` with ``hash_buckets``
(unbounded id spaces: no vocabulary at all); the id columns' vocabularies span every split's rows, so a cold
user or item keeps an id of its own; numeric columns are standardised with the training mean and population std
(a missing value becomes the mean).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from mtl_experiments.data.stream.shards import RowSplit, Shard, stable_hash
from mtl_experiments.errors import DataError

log = logging.getLogger(__name__)
STATS_VERSION = 1
MERGE_EVERY = 64  # row groups' distinct values gathered before they are merged (bounds the pass's memory)


@dataclass(frozen=True)
class Columns:
    """Which columns of the shards are what (the ``data.*`` column keys of conf/data/stream.yaml)."""

    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    labels: Mapping[str, str]  # task -> its label column
    id_columns: Mapping[str, str] = field(default_factory=dict)  # user_id / item_id -> a categorical column
    timestamp: str | None = None
    hash_buckets: Mapping[str, int] = field(default_factory=dict)  # categorical column -> buckets
    row_id: str | None = None  # carried as `row_id` (exactly-once checks) when set

    @property
    def read(self) -> list[str]:
        extra = [c for c in (self.timestamp, self.row_id) if c]
        names = [*self.categorical, *self.numeric, *self.labels.values(), *extra]
        return list(dict.fromkeys(names))


def cache_key(shards: list[Shard], columns: Columns, split: RowSplit) -> str:
    """Changes with any shard's name, size or mtime and with every setting the pass depends on."""
    blob = {
        "version": STATS_VERSION,
        "shards": [(s.name, s.size, s.mtime_ns) for s in shards],
        "columns": asdict(columns),
        "split": asdict(split),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=list).encode()).hexdigest()[:20]


def load_or_build(cache_dir: Path | None, key: str, build) -> dict:
    """``build()``'s result, kept as ``<cache_dir>/stats-<key>.pt`` (plain containers: ``weights_only`` loads)."""
    path = cache_dir / f"stats-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    stats = build()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            torch.save(stats, tmp)
            os.replace(tmp, path)
        except OSError as e:  # a read-only data folder: the pass is redone next time, nothing is lost
            log.warning("data=stream: statistics not cached (%s); set data.cache_dir to a writable folder.", e)
    return stats


class Pass:
    """Accumulates what one pass over the rows finds (see the module docstring)."""

    def __init__(self, columns: Columns, tasks: Mapping):
        self.columns, self.tasks = columns, tasks
        self.ids = set(columns.id_columns.values())
        self.distinct: dict[str, list[pa.Array]] = {c: [] for c in columns.categorical if c not in columns.hash_buckets}
        self.seen: dict[str, list[pa.Array]] = {c: [] for c in self.ids}
        self.moments = {c: np.zeros(3) for c in columns.numeric}  # count, sum, sum of squares (finite, training)
        self.counts: dict[str, list[list[int]]] = {}
        self.skipped: dict[str, int] = {}

    def add(self, shard: Shard, table: pa.Table, codes: np.ndarray, first_row: int) -> None:
        check_labels(shard, table, first_row, self.columns, self.tasks)
        self.counts.setdefault(shard.name, []).append(np.bincount(codes, minlength=3).tolist())
        train = pa.array(codes == 0)
        for c, found in self.distinct.items():
            values = table.column(c) if c in self.ids else table.column(c).filter(train)
            found.append(pc.unique(values.combine_chunks()))
            if c in self.ids:
                self.seen[c].append(pc.unique(table.column(c).filter(train).combine_chunks()))
        for c, m in self.moments.items():
            x = table.column(c).filter(train).to_numpy(zero_copy_only=False).astype(np.float64)
            x = x[np.isfinite(x)]
            m += (len(x), x.sum(), (x * x).sum())
        for lists in (self.distinct, self.seen):
            for c, found in lists.items():
                if len(found) >= MERGE_EVERY:
                    lists[c] = [pc.unique(pa.concat_arrays(found))]

    def result(self) -> dict:
        vocab = {c: sorted_values(found) for c, found in self.distinct.items()}
        numeric = {}
        for c, (n, s, ss) in self.moments.items():
            mean = s / n if n else 0.0
            std = float(np.sqrt(max(ss / n - mean * mean, 0.0))) if n else 1.0
            numeric[c] = [float(mean), std if std > 0 else 1.0]
        seen = {role: sorted_values(self.seen[c]) for role, c in self.columns.id_columns.items()}
        return {"vocab": vocab, "numeric": numeric, "counts": self.counts, "skipped": self.skipped, "seen": seen}


def sorted_values(found: list[pa.Array]) -> list | torch.Tensor:
    """The distinct non-missing values of ``found``, sorted: an int64 tensor for integers (quick to cache), else a
    list of plain Python values."""
    if not found:
        return []
    values = pc.unique(pa.concat_arrays(found)).drop_null()
    values = values.take(pc.sort_indices(values))
    return (
        torch.from_numpy(values.to_numpy().astype(np.int64)) if pa.types.is_integer(values.type) else values.to_pylist()
    )


def as_arrow(values: list | torch.Tensor) -> pa.Array:
    return pa.array(values.numpy() if isinstance(values, torch.Tensor) else values)


def check_labels(shard: Shard, table: pa.Table, first_row: int, columns: Columns, tasks: Mapping) -> None:
    """A DataError naming the shard and the column for a missing label or a value the task cannot train on."""
    for name, column in columns.labels.items():
        values = table.column(column)
        if values.null_count:
            first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(
                f"Shard {shard.name}: label column {column!r} (task {name}) is missing in row {first_row + first} "
                f"(and {values.null_count - 1} more of its row group); labels must be complete (fill or drop those "
                "rows first)."
            )
        # the checks are on values, so the distinct values stand for the column (and cost a fraction of it)
        labels = tasks[name].encode_labels(np.unique(values.to_numpy(zero_copy_only=False).astype(np.float64)))
        try:
            tasks[name].validate_labels(labels, split="streamed")
        except DataError as e:
            raise DataError(f"Shard {shard.name}, column {column!r}: {e}") from None


def run_pass(fs: pafs.FileSystem, shards: list[Shard], columns: Columns, split: RowSplit, tasks, skip: bool) -> dict:
    """Read every shard once, a row group at a time; ``skip``: a shard that cannot be read is left out and its rows
    counted as skipped, else a DataError names it."""
    acc = Pass(columns, tasks)
    for shard in shards:
        try:
            for _, first, table in row_groups(fs, shard, columns.read):
                acc.add(shard, table, split.codes(table, shard, first, columns.timestamp), first)
        except (OSError, pa.ArrowException) as e:
            if not skip:
                raise DataError(
                    f"Shard {shard.name} is corrupt ({e}); remove or rewrite it, or set "
                    "data.on_bad_shard=skip to train without its rows (counted as data/rows_skipped)."
                ) from e
            log.warning("data=stream: shard %s skipped (%s): %d rows", shard.name, e, shard.rows)
            acc.counts[shard.name] = [[0, 0, 0] for _ in shard.row_groups]
            acc.skipped[shard.name] = shard.rows
    return acc.result()


def row_groups(fs: pafs.FileSystem, shard: Shard, names: list[str], groups=None):
    """``(row group, its first row in the shard, its table of ``names``)`` for ``groups`` (all by default)."""
    with fs.open_input_file(shard.path) as f:
        pf = pq.ParquetFile(f)
        starts = np.concatenate([[0], np.cumsum(shard.row_groups)])
        for g in range(len(shard.row_groups)) if groups is None else groups:
            yield g, int(starts[g]), pf.read_row_group(g, columns=names)


class Encoder:
    """A row group's table -> the batch contract's arrays (numpy), with the pass's vocabularies and statistics."""

    def __init__(self, columns: Columns, stats: dict, tasks: Mapping):
        self.columns, self.tasks = columns, tasks
        self.vocab = {c: as_arrow(v) for c, v in stats["vocab"].items()}
        self.numeric = stats["numeric"]

    def cardinality(self, column: str) -> int:
        if column in self.columns.hash_buckets:
            return int(self.columns.hash_buckets[column]) + 1
        return len(self.vocab[column]) + 1

    def ids(self, values: pa.ChunkedArray, column: str) -> np.ndarray:
        """Ids 1..K (0: missing, or not in the vocabulary)."""
        values = values.combine_chunks()
        missing = values.is_null().to_numpy(zero_copy_only=False)
        if column in self.columns.hash_buckets:
            out = (stable_hash(values) % np.uint64(self.columns.hash_buckets[column])).astype(np.int64) + 1
        else:
            out = pc.index_in(values, value_set=self.vocab[column]).fill_null(-1).to_numpy().astype(np.int64) + 1
        out[missing] = 0
        return out

    def __call__(self, table: pa.Table) -> dict:
        c = self.columns
        cat = np.stack([self.ids(table.column(k), k) for k in c.categorical], 1) if c.categorical else None
        block = {"features": {}, "labels": {}}
        if cat is not None:
            block["features"]["categorical"] = cat
        if c.numeric:
            cols = []
            for k in c.numeric:
                x = table.column(k).to_numpy(zero_copy_only=False).astype(np.float64)
                mean, std = self.numeric[k]
                cols.append((np.where(np.isfinite(x), x, mean) - mean) / std)
            block["features"]["numeric"] = np.stack(cols, 1).astype(np.float32)
        for name, column in c.labels.items():
            values = table.column(column).to_numpy(zero_copy_only=False)
            block["labels"][name] = self.tasks[name].encode_labels(values.astype(np.float64)).numpy()
        for role, column in c.id_columns.items():
            block[role] = cat[:, c.categorical.index(column)]
        if c.timestamp:
            block["timestamp"] = table.column(c.timestamp).to_numpy(zero_copy_only=False).astype(np.int64)
        if c.row_id:
            block["row_id"] = table.column(c.row_id).to_numpy(zero_copy_only=False).astype(np.int64)
        return block
