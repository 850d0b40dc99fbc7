"""The shards of a streamed log: listing (a directory, a glob or a pyarrow filesystem URI), their schemas checked
before training, and which split each row belongs to, decided row by row without an index (data/stream)."""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mtl_experiments.errors import DataError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
PARQUET_SUFFIXES = (".parquet", ".pq")
_TWO64 = float(2**64)


@dataclass(frozen=True)
class Shard:
    """One Parquet file: where it is, what identifies its content for the statistics cache, and its row groups."""

    path: str
    name: str
    size: int
    mtime_ns: int
    row_groups: tuple[int, ...]  # rows per row group

    @property
    def rows(self) -> int:
        return sum(self.row_groups)


def list_shards(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files a ``data.path`` names, sorted: a directory (its ``*.parquet`` / ``*.pq`` files, not those
    whose name starts with ``.`` or ``_``), a glob, or a URI pyarrow reads (``s3://bucket/log/``, ``gs://...``)."""
    if "://" in str(path):
        fs, root = pafs.FileSystem.from_uri(str(path))
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File]
    else:
        fs = pafs.LocalFileSystem()
        p = Path(str(path)).expanduser()
        files = [str(f) for f in p.iterdir() if f.is_file()] if p.is_dir() else glob.glob(str(p))
    files = sorted(f for f in files if f.lower().endswith(PARQUET_SUFFIXES) and not Path(f).name.startswith((".", "_")))
    if not files:
        raise DataError(
            f"data.path={path} holds no Parquet shards (*.parquet, *.pq); point it at a directory or glob of them, "
            "e.g. the output of `python scripts/make_log.py --rows 1000000 --shards 10 --out log`."
        )
    return fs, files


def open_shards(fs: pafs.FileSystem, files: Sequence[str], types: Mapping[str, str]) -> list[Shard]:
    """Each file's footer (sizes, row groups) and the columns ``types`` names checked (``{column: "number" | "any"}``):
    a DataError naming the shard and the column for an unreadable footer, a missing column, a label that is not a
    number, or a column whose type differs from the first shard's."""
    shards, first = [], {}
    for path in files:
        info = fs.get_file_info(path)
        name = Path(path).name
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"Shard {name} cannot be read ({e}); replace or remove the file ({path}).") from e
        for column, kind in types.items():
            if column not in schema.names:
                raise DataError(
                    f"Shard {name} has no column {column!r} (it has {schema.names}); fix the data.* column names or "
                    "the shard."
                )
            dtype = schema.field(column).type
            if kind == "number" and not (
                pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)
            ):
                raise DataError(
                    f"Shard {name}: column {column!r} must hold numbers (a label or numeric input), "
                    f"got type {dtype}; convert the column or fix data.tasks / data.numeric."
                )
            if first.setdefault(column, (dtype, name))[0] != dtype:
                raise DataError(
                    f"Shard {name}: column {column!r} has type {dtype}, but shard {first[column][1]} has "
                    f"{first[column][0]}; shards must share one schema (rewrite the odd shard)."
                )
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        shards.append(Shard(path, name, int(info.size or 0), int(info.mtime_ns or 0), groups))
    return shards


def stable_hash(values: np.ndarray | pa.Array) -> np.ndarray:
    """uint64 hashes of values (numbers or text) that never change between processes or runs (pandas'
    ``hash_array`` with its fixed key, unlike Python's salted ``hash``)."""
    array = values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array | pa.ChunkedArray) else values
    return pd.util.hash_array(np.asarray(array))


def shard_salt(name: str) -> np.uint64:
    """A shard's own offset for hashing its rows' positions: the rows of two shards never share a key."""
    return np.uint64(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def uniform(hashes: np.ndarray) -> np.ndarray:
    """Hashes as numbers in [0, 1)."""
    return hashes.astype(np.float64) / _TWO64


@dataclass(frozen=True)
class RowSplit:
    """Which split a row belongs to, computed from the row alone (so no pass keeps an index):

    - ``random``: a hash of (shard name, row position) below ``val_fraction`` -> val, below ``val_fraction +
      test_fraction`` -> test, else train;
    - ``temporal``: by ``timestamp`` against two cuts ``val_from`` <= ``test_from``;
    - ``cold_user`` / ``cold_item``: a hash of the id below ``cold_fraction / 2`` -> val, below ``cold_fraction``
      -> test (the id never occurs in training); the other rows as ``random``;
    - ``shards``: the shard's name in ``val_shards`` / ``test_shards``, else train.
    """

    mode: str
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    cold_fraction: float = 0.1
    id_column: str | None = None  # cold_*: the user or item column
    val_from: float | None = None  # temporal: the cuts (set once the timestamps' range is known)
    test_from: float | None = None
    val_shards: tuple[str, ...] = ()
    test_shards: tuple[str, ...] = ()

    def codes(self, table: pa.Table, shard: Shard, first_row: int, timestamp: str | None) -> np.ndarray:
        """``SPLIT_CODES`` of the rows of ``table``, rows ``first_row ..`` of ``shard``."""
        n = table.num_rows
        if self.mode == "shards":
            code = 1 if shard.name in self.val_shards else 2 if shard.name in self.test_shards else 0
            return np.full(n, code, np.int8)
        if self.mode == "temporal":
            t = table.column(timestamp).to_numpy(zero_copy_only=False).astype(np.float64)
            return (t >= self.val_from).astype(np.int8) + (t >= self.test_from).astype(np.int8)
        u = uniform(stable_hash(np.arange(first_row, first_row + n, dtype=np.uint64) + shard_salt(shard.name)))
        codes = np.where(u < self.val_fraction, 1, np.where(u < self.val_fraction + self.test_fraction, 2, 0))
        if self.mode in ("cold_user", "cold_item"):
            c = uniform(stable_hash(table.column(self.id_column).combine_chunks()))
            codes = np.where(c < self.cold_fraction / 2, 1, np.where(c < self.cold_fraction, 2, codes))
        return codes.astype(np.int8)


def time_range(fs: pafs.FileSystem, shards: list[Shard], column: str) -> tuple[float, float]:
    """The smallest and largest value of ``column`` over every shard, from the footers' row-group statistics
    (the column is read only where a row group has none)."""
    low, high = np.inf, -np.inf
    for shard in shards:
        with fs.open_input_file(shard.path) as f:
            pf = pq.ParquetFile(f)
            j = pf.schema_arrow.get_field_index(column)
            for g in range(pf.metadata.num_row_groups):
                stats = pf.metadata.row_group(g).column(j).statistics
                if stats is not None and stats.has_min_max:
                    lo, hi = stats.min, stats.max
                else:
                    values = pf.read_row_group(g, columns=[column]).column(0).to_numpy(zero_copy_only=False)
                    lo, hi = values.min(), values.max()
                low, high = min(low, float(np.asarray(lo, np.float64))), max(high, float(np.asarray(hi, np.float64)))
    return low, high
