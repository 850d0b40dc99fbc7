"""Any CSV or Parquet table as a multi-task dataset, described by config only (no code).

The file type follows the extension: ``.csv`` / ``.tsv`` (optionally compressed: ``.gz``, ``.bz2``, ``.zip``,
``.xz``, ``.zst``; read with pandas) or ``.parquet`` / ``.pq`` (pandas + pyarrow). The config names the
columns: ``categorical`` and ``numeric`` inputs, ``id_columns`` (``{user_id: <column>, item_id: <column>}``:
categorical inputs that batches also carry as ``user_id`` / ``item_id``) and ``tasks`` (``{name: {kind,
label: <column>}}``, label defaulting to the name; kinds ``binary`` with labels in {0, 1} (or true/false)
and ``regression`` with numeric labels). A label column cannot also be an input.

Splits: ``path`` is the training file; ``val_path`` / ``test_path`` name separate files, and a split without
one is carved out of ``path`` at random (``split_seed``) as ``val_fraction`` / ``test_fraction`` of its rows.
Preprocessing is fitted on the training rows only, as in the census module: categorical values (as text; a
Parquet integer 1 is "1") get ids 1..K in sorted order, id 0 for a missing value and for values never seen
in training; numeric columns are standardised with the training mean and (population) std, and a missing
numeric value becomes the training mean (0 after standardising). Labels must be complete: a missing label is
an error, not a silently dropped row. No cache: reading and encoding cost about as much as a cache load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl_experiments.data.base import FeatureSpec, Split, TabularDataModule, require_file
from mtl_experiments.errors import ConfigError, DataError

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
ID_ROLES = ("user_id", "item_id")
LABEL_KINDS = ("binary", "regression")


def file_format(path: Path) -> str:
    """``"csv"``, ``"tsv"`` or ``"parquet"`` from the file name, else a DataError listing what is supported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in CSV_SUFFIXES:
        return last[1:]
    if last in PARQUET_SUFFIXES:
        return "parquet"
    raise DataError(
        f"{path}: unknown file type {''.join(path.suffixes) or '(no extension)'}; data.path and the split files "
        f"must end in {', '.join(CSV_SUFFIXES)} (optionally {', '.join(COMPRESSION_SUFFIXES)}) or "
        f"{', '.join(PARQUET_SUFFIXES)}."
    )


def read_table(path: Path, columns: Sequence[str], text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """``columns`` of a CSV/TSV or Parquet file (``text_columns`` read as strings in CSV), with a DataError for a
    missing, unreadable or empty file and for a missing column (listing the file's columns)."""
    path = require_file(path, "Check data.path (and data.val_path / data.test_path); relative paths are resolved "
                              "against the directory you launched from.")  # fmt: skip
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise DataError(
                    f"{path}: reading Parquet needs pyarrow, which is not installed; `pip install pyarrow` "
                    "or convert the file to CSV."
                ) from e
            present = list(pq.read_schema(path).names)
        else:
            present = list(pd.read_csv(path, sep=CSV_SUFFIXES[f".{fmt}"], nrows=0).columns)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path} is empty (not even a header row); it needs a header and at least one row.") from e
    except DataError:
        raise
    except Exception as e:  # pyarrow's and pandas' parse errors have no common base class
        raise DataError(f"Cannot read {path} as {fmt.upper()}: {e}") from e
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(
            f"{path} has no column(s) {missing} named in the data config; its columns are {present}. "
            "Fix the column names in data.categorical / data.numeric / data.id_columns / data.tasks.<task>.label."
        )
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path, columns=list(columns))
        else:
            df = pd.read_csv(
                path,
                sep=CSV_SUFFIXES[f".{fmt}"],
                usecols=list(columns),
                dtype={c: str for c in text_columns},
            )
    except Exception as e:
        raise DataError(f"Cannot read {path} as {fmt.upper()}: {e}") from e
    if len(df) == 0:
        raise DataError(f"{path} has a header but no data rows; it needs at least one row.")
    return df.reset_index(drop=True)


def _first_row(df: pd.DataFrame, mask: np.ndarray) -> int:
    """The file's 1-based data row (header not counted) of the first True in ``mask`` (splits keep the file's index)."""
    return int(df.index[np.flatnonzero(mask)[0]]) + 1


def _show(value) -> str:
    return repr(value.item() if isinstance(value, np.generic) else value)


def labels_of(df: pd.DataFrame, column: str, task: str, kind: str, path: Path) -> np.ndarray:
    """The label column as float32, checked against its kind (a DataError names file, column, row and fix)."""
    raw = df[column]
    missing = raw.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{path}: label column {column!r} (task {task!r}) has {int(missing.sum())} missing value(s), the first "
            f"on data row {_first_row(df, missing)}; drop those rows or fill the labels."
        )
    values = pd.to_numeric(raw.astype("int8") if raw.dtype == bool else raw, errors="coerce").to_numpy(np.float64)
    not_numeric = np.isnan(values)
    if kind == "binary":
        bad = not_numeric | ~np.isin(values, (0.0, 1.0))
        if bad.any():
            raise DataError(
                f"{path}: task {task!r} is binary but its label column {column!r} has {int(bad.sum())} value(s) "
                f"other than 0/1, e.g. {_show(raw[bad].iloc[0])} on data row {_first_row(df, bad)}; map the column "
                "to 0/1 (or true/false) or use kind: regression."
            )
    else:
        bad = not_numeric | ~np.isfinite(values)
        if bad.any():
            raise DataError(
                f"{path}: task {task!r} is regression but its label column {column!r} has {int(bad.sum())} "
                f"non-numeric or infinite value(s), e.g. {_show(raw[bad].iloc[0])} on data row {_first_row(df, bad)}; "
                "the labels must be finite numbers."
            )
    return values.astype(np.float32)


def numeric_of(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """A numeric input column as float64 (NaN where missing); a DataError for a non-numeric value."""
    raw = df[column]
    numbers = pd.to_numeric(raw.astype("int8") if raw.dtype == bool else raw, errors="coerce")
    values = np.array(numbers, dtype=np.float64)  # a writable copy (pandas may hand out read-only views)
    bad = np.isnan(values) & raw.notna().to_numpy()
    if bad.any():
        raise DataError(
            f"{path}: numeric column {column!r} has the non-numeric value {_show(raw[bad].iloc[0])} on data row "
            f"{_first_row(df, bad)}; clean the column or list it under data.categorical."
        )
    values[np.isinf(values)] = np.nan  # treated as missing: an infinite input would poison the model
    return values


def text_of(df: pd.DataFrame, column: str) -> np.ndarray:
    """A categorical column as an object array of strings, missing values as None."""
    s = df[column]
    values = np.array(s.astype(str), dtype=object)  # a writable copy
    values[s.isna().to_numpy()] = None
    return values


def _names(key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"data.{key} must be a list of column names, got {value!r}; e.g. data.{key}=[a,b].")
    return [str(c) for c in value]


class TabularFileDataModule(TabularDataModule):
    """A CSV/Parquet file plus a config of its columns; see the module docstring for splits and encoding."""

    def __init__(
        self,
        tasks: Mapping | None = None,
        path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        categorical: Sequence[str] | None = None,
        numeric: Sequence[str] | None = None,
        id_columns: Mapping[str, str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        **kwargs,
    ):
        if not path:
            raise ConfigError(
                "data.path is required for data=tabular: the CSV or Parquet file to train on, e.g. "
                "data.path=data/interactions.csv (or .parquet)."
            )
        if not tasks:
            raise ConfigError(
                "data.tasks is required for data=tabular: the label columns and their kinds, e.g. "
                "'data.tasks={click: {kind: binary}, watch: {kind: regression, label: watch_seconds}}'."
            )
        super().__init__(tasks=tasks, **kwargs)
        bad_kind = {n: t.kind for n, t in self.tasks.items() if t.kind not in LABEL_KINDS}
        if bad_kind:
            raise ConfigError(f"data=tabular supports task kinds {list(LABEL_KINDS)}; got {bad_kind}.")
        ids = dict(id_columns or {})
        unknown = sorted(set(ids) - set(ID_ROLES))
        if unknown:
            raise ConfigError(
                f"data.id_columns has unknown role(s) {unknown}; its keys are {list(ID_ROLES)}, e.g. "
                "'data.id_columns={user_id: user, item_id: movie}'."
            )
        self.id_columns = {role: str(ids[role]) for role in ID_ROLES if ids.get(role)}
        self.categorical = [*self.id_columns.values(), *_names("categorical", categorical)]
        self.numeric = _names("numeric", numeric)
        inputs = self.categorical + self.numeric
        repeated = sorted({c for c in inputs if inputs.count(c) > 1})
        if repeated:
            raise ConfigError(
                f"Column(s) {repeated} are listed more than once among data.id_columns, data.categorical and "
                "data.numeric; list each input column once (id columns are categorical inputs already)."
            )
        if not inputs:
            raise ConfigError("data=tabular needs at least one input column: set data.categorical and/or data.numeric.")
        leaks = {n: t.label for n, t in self.tasks.items() if t.label in inputs}
        if leaks:
            raise ConfigError(
                f"Task label column(s) {leaks} are also input columns; remove them from the inputs (the model would "
                "see its own labels)."
            )
        carved = [k for k, p in (("val", val_path), ("test", test_path)) if not p]
        fractions = {"val": float(val_fraction), "test": float(test_fraction)}
        if any(not 0 < fractions[k] < 1 for k in carved) or sum(fractions[k] for k in carved) >= 1:
            raise ConfigError(
                f"data.{'_fraction and data.'.join(carved)}_fraction must be in (0, 1) and sum to < 1 (the "
                f"share of data.path's rows held out), got {', '.join(str(fractions[k]) for k in carved)}."
            )
        self.paths = {
            "train": Path(str(path)).expanduser(),
            **{k: Path(str(p)).expanduser() for k, p in (("val", val_path), ("test", test_path)) if p},
        }
        self.fractions = {k: fractions[k] for k in carved}
        self.split_seed = int(split_seed)
        self.vocabularies: dict[str, list[str]] | None = None
        self.numeric_stats: dict[str, list[float]] | None = None

    @property
    def columns(self) -> list[str]:
        labels = [t.label for t in self.tasks.values()]
        return list(dict.fromkeys([*self.categorical, *self.numeric, *labels]))

    def load(self) -> tuple[Split, Split, Split, FeatureSpec]:
        frames = {k: read_table(p, self.columns, text_columns=self.categorical) for k, p in self.paths.items()}
        sources = dict(self.paths)
        if self.fractions:  # carve the splits without a file out of the training file's rows
            main = frames["train"]
            n = len(main)
            order = np.random.default_rng(self.split_seed).permutation(n)
            lo = 0
            for split, fraction in self.fractions.items():
                size = math.floor(n * fraction)
                if size < 1:
                    raise DataError(
                        f"{self.paths['train']} has {n} rows: too few for data.{split}_fraction={fraction} to give a "
                        f"non-empty {split} split; use a larger file or fraction, or give data.{split}_path."
                    )
                frames[split] = main.iloc[np.sort(order[lo : lo + size])]  # keeps the file's row numbers
                lo += size
            if lo >= n:
                raise DataError(f"{self.paths['train']} has {n} rows: nothing is left for training after the splits.")
            frames["train"] = main.iloc[np.sort(order[lo:])]
            sources.update(dict.fromkeys(self.fractions, self.paths["train"]))

        train = frames["train"]
        self.vocabularies = {
            c: sorted({v for v in text_of(train, c) if v is not None}) for c in self.categorical
        }  # fmt: skip
        raw_numeric = {k: [numeric_of(df, c, sources[k]) for c in self.numeric] for k, df in frames.items()}
        self.numeric_stats = {}
        for j, c in enumerate(self.numeric):
            x = raw_numeric["train"][j]
            mean = float(np.nanmean(x)) if np.isfinite(x).any() else 0.0
            std = float(np.nanstd(x)) if np.isfinite(x).any() else 1.0
            self.numeric_stats[c] = [mean, std if std > 0 else 1.0]

        splits = {}
        for k, df in frames.items():
            cat = [pd.Index(self.vocabularies[c]).get_indexer(text_of(df, c)) + 1 for c in self.categorical]  # -1 -> 0
            num = [
                (np.where(np.isnan(x), mean, x) - mean) / std
                for x, (mean, std) in zip(raw_numeric[k], self.numeric_stats.values(), strict=True)
            ]
            categorical = torch.from_numpy(
                np.stack(cat, axis=1).astype(np.int64) if cat else np.zeros((len(df), 0), np.int64)
            )
            split = {
                "features": {
                    "categorical": categorical,
                    "numeric": torch.from_numpy(
                        np.stack(num, axis=1).astype(np.float32) if num else np.zeros((len(df), 0), np.float32)
                    ),
                },
                "labels": {
                    name: torch.from_numpy(labels_of(df, task.label, name, task.kind, sources[k]))
                    for name, task in self.tasks.items()
                },
            }
            for j, role in enumerate(self.id_columns):  # id columns come first among the categorical inputs
                split[role] = categorical[:, j].clone()
            splits[k] = split
        spec = FeatureSpec(
            numeric=tuple(self.numeric), categorical={c: len(self.vocabularies[c]) + 1 for c in self.categorical}
        )
        return splits["train"], splits["val"], splits["test"], spec
