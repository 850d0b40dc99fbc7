"""Any CSV or Parquet table as a multi-task dataset, described by config only (no code).

The file type follows the extension: ``.csv`` / ``.tsv`` (optionally compressed: ``.gz``, ``.bz2``, ``.zip``,
``.xz``, ``.zst``; read with pandas) or ``.parquet`` / ``.pq`` (pandas + pyarrow). The config names the
columns: ``categorical`` and ``numeric`` inputs, ``id_columns`` (``{user_id: <column>, item_id: <column>}``:
categorical inputs that batches also carry as ``user_id`` / ``item_id``), an optional ``timestamp_column``
(numbers or date-times; batches carry it as ``timestamp``) and ``tasks`` (``{name: {kind, label: <column>}}``,
label defaulting to the name). Label kinds: ``binary`` (0/1 or true/false), ``regression`` (finite numbers),
``multiclass`` (integer classes 0..C-1, or any text whose classes become 0..C-1 in sorted order of the training
values; ``num_classes`` is then set on the task and ``self.label_classes`` keeps the names) and ``retrieval``
(an item column, e.g. the next item clicked, mapped through the item id vocabulary; an empty cell = no label,
id 0). A label column cannot also be an input.

Splits: ``path`` is the training file; ``val_path`` / ``test_path`` name separate files, and a split without
one is carved out of ``path`` as ``val_fraction`` / ``test_fraction`` of its rows, by ``split``
(mtl_experiments/data/splits.py, seeded by ``split_seed``): ``random``, ``cold_user`` / ``cold_item`` (a
``cold_fraction`` share of the users / items held out of training; needs the id column), ``temporal`` (by
``timestamp_column``). Modes other than ``random`` carve both val and test, so they take no split files.
Preprocessing is fitted on the training rows only, as in the census module: categorical values (as text; a
Parquet integer 1 is "1") get ids 1..K in sorted order, id 0 for a missing value and for values never seen
in training; numeric columns are standardised with the training mean and (population) std, and a missing
numeric value becomes the training mean (0 after standardising). The id columns are the exception: their
vocabulary spans the rows of every split (and the item values of retrieval labels), so a user or item never
seen in training keeps an id of its own (its embedding row stays untrained; features.py decides how such ids
are represented) and the cold-start segments can tell them apart. Labels must be complete (retrieval labels
excepted): a missing label is an error, not a silently dropped row. No cache: reading and encoding cost about
as much as a cache load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl_experiments import checks
from mtl_experiments.data.base import TabularDataModule, require_file
from mtl_experiments.data.spec import FeatureSpec, ItemInfo, LabelType, Split, Splits
from mtl_experiments.data.splits import COLD_KEY, SPLIT_MODES, check_split_options, split_rows
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.tasks import Task

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zip", ".xz", ".zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
ID_ROLES = ("user_id", "item_id")


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


def labels_of(df: pd.DataFrame, column: str, task: Task, path: Path) -> np.ndarray:
    """A BINARY or REAL label column as float32, checked against the task's ``label_type`` (a DataError names
    file, column, row and fix)."""
    name, kind = task.name, task.kind
    raw = df[column]
    missing = raw.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{path}: label column {column!r} (task {name!r}) has {int(missing.sum())} missing value(s), the first "
            f"on data row {_first_row(df, missing)}; drop those rows or fill the labels."
        )
    values = pd.to_numeric(raw.astype("int8") if raw.dtype == bool else raw, errors="coerce").to_numpy(np.float64)
    not_numeric = np.isnan(values)
    if task.label_type is LabelType.BINARY:
        bad = not_numeric | ~np.isin(values, (0.0, 1.0))
        if bad.any():
            raise DataError(
                f"{path}: task {name!r} is {kind} but its label column {column!r} has {int(bad.sum())} value(s) "
                f"other than 0/1, e.g. {_show(raw[bad].iloc[0])} on data row {_first_row(df, bad)}; map the column "
                "to 0/1 (or true/false) or use kind: regression."
            )
    else:
        bad = not_numeric | ~np.isfinite(values)
        if bad.any():
            raise DataError(
                f"{path}: task {name!r} is {kind} but its label column {column!r} has {int(bad.sum())} "
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
    """A categorical column as an object array of strings, missing values as None. Whole numbers stored as floats
    (a Parquet integer column with missing values) read as integers, "7" not "7.0", so they match the same ids in
    an integer column (an item id column and a next-item label column, a CSV and a Parquet file)."""
    s = df[column]
    missing = s.isna().to_numpy()
    if pd.api.types.is_float_dtype(s) and np.all(np.mod(s.to_numpy()[~missing], 1) == 0):
        s = s.fillna(0).astype(np.int64)
    values = np.array(s.astype(str), dtype=object)  # a writable copy
    values[missing] = None
    return values


def timestamps_of(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """The timestamp column as int64 (whole numbers; date-times as seconds since 1970 UTC) or float64 (other
    numbers); a DataError for a missing or unreadable value."""
    raw = df[column]
    if raw.isna().any():
        bad = raw.isna().to_numpy()
        raise DataError(
            f"{path}: timestamp column {column!r} has {int(bad.sum())} missing value(s), the first on data row "
            f"{_first_row(df, bad)}; every row needs a timestamp."
        )
    numbers = pd.to_numeric(raw, errors="coerce")
    if not numbers.isna().all():  # numbers (a value that is not one is an error), else date-times
        bad = numbers.isna().to_numpy()
        if bad.any():
            raise DataError(
                f"{path}: timestamp column {column!r} holds numbers but has the value {_show(raw[bad].iloc[0])} on "
                f"data row {_first_row(df, bad)}; every timestamp must be a number (or every one a date-time)."
            )
        values = np.array(numbers, dtype=np.float64)  # a writable copy (pandas may hand out read-only views)
        return values.astype(np.int64) if np.all(np.mod(values, 1) == 0) else values
    times = pd.to_datetime(raw.astype(str), errors="coerce", utc=True, format="mixed")
    bad = times.isna().to_numpy()
    if bad.any():
        raise DataError(
            f"{path}: timestamp column {column!r} has the value {_show(raw[bad].iloc[0])} on data row "
            f"{_first_row(df, bad)}, neither a number nor a date-time (e.g. 2024-05-01 12:00:00)."
        )
    return np.array((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1), dtype=np.int64)


def class_labels(
    frames: Mapping[str, pd.DataFrame], column: str, task: str, sources: Mapping[str, Path]
) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """A multiclass label column of every split as int64 classes: whole numbers >= 0 as they are (``None``
    for the class names), any other values (text) as 0..C-1 in the sorted order of the training values (and
    the names). A DataError for a missing value, a negative or fractional class, or a class name never seen
    in training."""
    for k, df in frames.items():
        missing = df[column].isna().to_numpy()
        if missing.any():
            raise DataError(
                f"{sources[k]}: label column {column!r} (task {task!r}) has {int(missing.sum())} missing value(s), "
                f"the first on data row {_first_row(df, missing)}; drop those rows or fill the labels."
            )

    def numbers(df: pd.DataFrame) -> np.ndarray:
        raw = df[column]
        return pd.to_numeric(raw.astype("int8") if raw.dtype == bool else raw, errors="coerce").to_numpy(np.float64)

    def whole(values: np.ndarray) -> np.ndarray:
        return np.isfinite(values) & (np.mod(values, 1) == 0) & (values >= 0)

    def every_split(classes_of, problem) -> dict[str, np.ndarray]:
        """``classes_of(df) -> (classes, bad rows, the column as shown)`` per split; a DataError ``problem(value,
        row)`` for a split's first bad row."""
        out = {}
        for k, df in frames.items():
            values, bad, shown = classes_of(df)
            if bad.any():
                where = problem(_show(shown[bad].iloc[0]), _first_row(df, bad))
                raise DataError(f"{sources[k]}: task {task!r} {where}")
            out[k] = values.astype(np.int64)
        return out

    def integers(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Series]:
        values = numbers(df)
        return values, ~whole(values), df[column]

    if np.all(whole(numbers(frames["train"]))):  # integer classes
        out = every_split(
            integers,
            lambda value, row: (
                f"is multiclass with integer classes (as in the training rows) but its label column {column!r} "
                f"has the value {value} on data row {row}; classes are whole numbers 0..C-1."
            ),
        )
        return out, None
    classes = sorted(set(frames["train"][column].astype(str)))
    index, listed = pd.Index(classes), f"{classes[:20]}{' ...' if len(classes) > 20 else ''}"

    def names(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.Series]:
        text = df[column].astype(str)
        codes = index.get_indexer(text)
        return codes, codes < 0, text

    out = every_split(
        names,
        lambda value, row: (
            f"has the class {value} on data row {row}, which no training row has; every class must occur in the "
            f"training rows (classes: {listed})."
        ),
    )
    return out, classes


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
        timestamp_column: str | None = None,
        split: str = "random",
        cold_fraction: float = 0.1,
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
        self._set_columns(categorical, numeric, id_columns, timestamp_column)
        carved = [k for k, p in (("val", val_path), ("test", test_path)) if not p]
        self._check_split(split, carved, cold_fraction, {"val": val_fraction, "test": test_fraction})
        self.split, self.cold_fraction = split, cold_fraction
        self.paths = {
            "train": Path(str(path)).expanduser(),
            **{k: Path(str(p)).expanduser() for k, p in (("val", val_path), ("test", test_path)) if p},
        }
        self.fractions = {k: float({"val": val_fraction, "test": test_fraction}[k]) for k in carved}
        self.split_seed = int(split_seed)
        self.vocabularies: dict[str, list[str]] | None = None
        self.numeric_stats: dict[str, list[float]] | None = None
        self.label_classes: dict[str, list[str]] = {}  # multiclass tasks with named classes: class id -> name
        self.id_vocab: dict[str, pd.Index] = {}  # role -> the raw ids of ids 1.. (after setup)

    def _set_columns(self, categorical, numeric, id_columns, timestamp_column) -> None:
        """The input columns (id columns first among the categorical ones), checked against each other and the
        tasks' label columns."""
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
        if "item_id" not in self.id_columns:
            retrieval = [n for n, t in self.tasks.items() if t.label_type is LabelType.ITEM]
            if retrieval:
                raise ConfigError(
                    f"Retrieval task(s) {retrieval} name items, so data=tabular needs the item id column: set "
                    "data.id_columns.item_id=<column> (the label column holds values of that column)."
                )
        self.timestamp_column = str(timestamp_column) if timestamp_column else None

    def _check_split(self, split: str, carved: list[str], cold_fraction, fractions: Mapping[str, float]) -> None:
        """The split mode against the split files given (``carved``: the splits without one) and the columns."""
        checks.choice("data.split", split, SPLIT_MODES)
        if split != "random" and len(carved) < 2:
            raise ConfigError(
                f"data.split={split} carves both val and test out of data.path, so data.val_path and data.test_path "
                "must be null; with split files of your own, use data.split=random (the default)."
            )
        if split in COLD_KEY and COLD_KEY[split] not in self.id_columns:
            raise ConfigError(
                f"data.split={split} holds {COLD_KEY[split][:-3]}s out of training, so it needs "
                f"data.id_columns.{COLD_KEY[split]}=<column>."
            )
        if split == "temporal" and not self.timestamp_column:
            raise ConfigError("data.split=temporal orders the rows by time: set data.timestamp_column=<column>.")
        if len(carved) == 2:
            check_split_options(split, cold_fraction, float(fractions["val"]), float(fractions["test"]))
        elif carved:
            checks.fraction(
                f"data.{carved[0]}_fraction", fractions[carved[0]], open_low=True, open_high=True,
                hint="the share of data.path's rows held out",
            )  # fmt: skip

    @property
    def columns(self) -> list[str]:
        labels = [t.label for t in self.tasks.values()]
        time = [self.timestamp_column] if self.timestamp_column else []
        return list(dict.fromkeys([*self.categorical, *self.numeric, *labels, *time]))

    @property
    def text_columns(self) -> list[str]:
        """Columns read as text from CSV: the categorical inputs and the item values of retrieval labels."""
        return [*self.categorical, *(t.label for t in self.tasks.values() if t.label_type is LabelType.ITEM)]

    def _carve(self, frames: dict[str, pd.DataFrame], id_vocab: Mapping[str, pd.Index]) -> None:
        """Carve the splits without a file out of the training file's rows (in place)."""
        main, path = frames["train"], self.paths["train"]
        n = len(main)
        if len(self.fractions) == 2:
            ids = {role: id_vocab[role].get_indexer(text_of(main, c)) + 1 for role, c in self.id_columns.items()}
            time = timestamps_of(main, self.timestamp_column, path) if self.split == "temporal" else None
            try:
                parts = split_rows(
                    self.split, n, user_id=ids.get("user_id"), item_id=ids.get("item_id"), timestamp=time,
                    val_fraction=self.fractions["val"], test_fraction=self.fractions["test"],
                    cold_fraction=self.cold_fraction, seed=self.split_seed,
                )  # fmt: skip
            except ConfigError as e:  # the options were checked up front: what is left is about this file's rows
                raise DataError(f"{path}: {e}") from e
        else:  # one split file given: carve the other split at random
            ((split, fraction),) = self.fractions.items()
            size = math.floor(n * fraction)
            if size < 1 or size >= n:
                raise DataError(
                    f"{path} has {n} rows: too few for data.{split}_fraction={fraction} to give non-empty {split} "
                    f"and train splits; use a larger file or fraction, or give data.{split}_path."
                )
            order = np.random.default_rng(self.split_seed).permutation(n)
            parts = {split: np.sort(order[:size]), "train": np.sort(order[size:])}
        for split, rows in parts.items():
            frames[split] = main.iloc[rows]  # keeps the file's row numbers (for error messages)

    def load(self) -> Splits:
        frames, sources, items = self._read()
        raw_numeric = self._fit_inputs(frames, sources)
        labels = self._labels(frames, sources, items)
        splits = {k: self._split(df, raw_numeric[k], labels[k], sources[k]) for k, df in frames.items()}
        spec = FeatureSpec(
            numeric=tuple(self.numeric),
            categorical={c: len(self.vocabularies[c]) + 1 for c in self.categorical},
            id_columns=dict(self.id_columns),
        )
        if items is not None:
            self.item_info = ItemInfo(num_items=len(items))
        return Splits(splits["train"], splits["val"], splits["test"], spec)

    def _read(self) -> tuple[dict[str, pd.DataFrame], dict[str, Path], pd.Index | None]:
        """Every split's rows (carved out of the training file where it has no file of its own), the file each
        came from, and the item vocabulary (None without an item id column)."""
        frames = {k: read_table(p, self.columns, text_columns=self.text_columns) for k, p in self.paths.items()}
        sources = dict(self.paths)
        # id vocabularies span every file's rows (and retrieval labels' items), so an id unseen in training
        # keeps its own id; built before carving, so the same over any split
        id_values = {role: [text_of(df, c) for df in frames.values()] for role, c in self.id_columns.items()}
        for task in self.tasks.values():
            if task.label_type is LabelType.ITEM:
                id_values["item_id"] += [text_of(df, task.label) for df in frames.values()]
        self.id_vocab = {
            role: pd.Index(sorted({v for part in parts for v in part if v is not None}))
            for role, parts in id_values.items()
        }
        if self.fractions:
            self._carve(frames, self.id_vocab)
            sources.update(dict.fromkeys(self.fractions, self.paths["train"]))
        return frames, sources, self.id_vocab.get("item_id")

    def _fit_inputs(self, frames: Mapping[str, pd.DataFrame], sources: Mapping[str, Path]) -> dict[str, list]:
        """Fit the vocabularies and numeric statistics on the training rows; returns every split's raw numeric
        columns."""
        train = frames["train"]
        id_of = {c: role for role, c in self.id_columns.items()}
        self.vocabularies = {
            c: list(self.id_vocab[id_of[c]]) if c in id_of else sorted({v for v in text_of(train, c) if v is not None})
            for c in self.categorical
        }
        raw_numeric = {k: [numeric_of(df, c, sources[k]) for c in self.numeric] for k, df in frames.items()}
        self.numeric_stats = {}
        for j, c in enumerate(self.numeric):
            x = raw_numeric["train"][j]
            mean = float(np.nanmean(x)) if np.isfinite(x).any() else 0.0
            std = float(np.nanstd(x)) if np.isfinite(x).any() else 1.0
            self.numeric_stats[c] = [mean, std if std > 0 else 1.0]
        return raw_numeric

    def _labels(
        self, frames: Mapping[str, pd.DataFrame], sources: Mapping[str, Path], items: pd.Index | None
    ) -> dict[str, dict[str, np.ndarray]]:
        """``{split: {task: labels}}``, each read as its task's ``label_type`` says."""
        labels: dict[str, dict[str, np.ndarray]] = {k: {} for k in frames}
        self.label_classes = {}
        for name, task in self.tasks.items():
            if task.label_type is LabelType.CLASS:  # classes over every split at once: a class count to fit
                per_split, classes = class_labels(frames, task.label, name, sources)
                task.fit_classes(
                    len(classes) if classes is not None else 1 + max(int(v.max()) for v in per_split.values()), classes
                )
                if classes is not None:
                    self.label_classes[name] = classes
            for k, df in frames.items():
                if task.label_type is LabelType.CLASS:
                    labels[k][name] = per_split[k]
                elif task.label_type is LabelType.ITEM:  # the item's id; an empty cell (no such item) is 0, no label
                    labels[k][name] = (items.get_indexer(text_of(df, task.label)) + 1).astype(np.int64)
                else:
                    labels[k][name] = labels_of(df, task.label, task, sources[k])
        return labels

    def _split(self, df: pd.DataFrame, raw_numeric: list, labels: Mapping[str, np.ndarray], source: Path) -> Split:
        """One split's tensors: inputs encoded with the training fit, labels, ids and timestamps."""
        cat = [pd.Index(self.vocabularies[c]).get_indexer(text_of(df, c)) + 1 for c in self.categorical]  # -1 -> 0
        num = [
            (np.where(np.isnan(x), mean, x) - mean) / std
            for x, (mean, std) in zip(raw_numeric, self.numeric_stats.values(), strict=True)
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
            "labels": {name: self.tasks[name].encode_labels(values) for name, values in labels.items()},
        }
        for j, role in enumerate(self.id_columns):  # id columns come first among the categorical inputs
            split[role] = categorical[:, j].clone()
        if self.timestamp_column:
            split["timestamp"] = torch.from_numpy(timestamps_of(df, self.timestamp_column, source))
        return split
