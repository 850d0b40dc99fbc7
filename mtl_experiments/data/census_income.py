"""UCI Census-Income (KDD) in the MMoE protocol (Ma et al., KDD 2018, §6.3).

Files: ``census-income.data`` (train, 199,523 rows) and ``census-income.test`` (99,762 rows) in
``root``, each plain, ``.gz`` or ``.bz2`` (the first that exists, in that order), as published by UCI:
no header, 42 ``", "``-separated fields (column names: ``COLUMNS``, the short names of
``../shared/data/census-income/SOURCE.md``), labels ``- 50000.`` / ``50000+.``, missing values ``?``.
A relative ``root`` is resolved against the working directory (the launch directory: this project's
Hydra config does not chdir). With ``download: true`` a missing file is fetched as ``<name>.gz`` from
``download_url`` (the UCI archive) into ``root`` and kept only if the sha256 of its *uncompressed* content
matches ``UCI_SHA256`` (the published files; compression-independent, so a re-compressed copy verifies too).

Task groups (all binary):
  1: ``income`` = income > 50K (``income_50k == "50000+."``), ``marital`` = ``marital_stat == "Never married"``;
  2: ``education`` = education at least college (``college_levels``; default: associates degrees, bachelors,
     masters, professional school and doctorate, the set whose label correlation matches the paper's — an
     inference, the paper does not list them), ``marital`` as in group 1.

Inputs: every column except ``instance_weight`` (a sampling weight), the label ``income_50k`` and the
columns the labels come from (``education``, ``marital_stat``), for both groups, as in the paper.
``NUMERIC`` columns are standardised with the training split's mean and (population) std; a ``?`` in a
numeric column becomes the training mean (0 after standardising). All other columns (including the
integer-coded nominal ones) are categorical: ids 1..K for the K distinct values of the training
file, in sorted order; id 0 for ``?`` and for values never seen in training (cardinality K + 1).

Splits: train = the ``.data`` file; the ``.test`` file is shuffled with ``split_seed`` and split 1:1
into validation (first half, the smaller one for an odd count) and test.

Cache: the preprocessed tensors are saved under ``cache_dir`` keyed by the sha256 of the raw files'
bytes (as stored) plus the preprocessing config, so a second run loads them instead of parsing
(measured on the full files: ~8 s to parse and preprocess, ~0.1 s from the cache; ~82 MB a file).
conf/data/census_income.yaml: ``root`` defaults to ``$MTL_CENSUS_ROOT`` else ``../shared/data/census-income``,
``cache_dir`` to ``${MTL_CACHE_DIR:-~/.cache/mtl-experiments}/census-income``; ``cache: false`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl_experiments import checks
from mtl_experiments.data.base import require_file
from mtl_experiments.data.cache import CachedDataModule
from mtl_experiments.data.spec import FeatureSpec, LabelType, Splits, gather
from mtl_experiments.errors import ConfigError, DataError

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends", "tax_filer_stat",
    "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
    "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father",
    "country_mother", "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits",
    "weeks_worked", "year", "income_50k",
)  # fmt: skip
NUMERIC: tuple[str, ...] = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked",
)  # fmt: skip
EXCLUDED: tuple[str, ...] = ("instance_weight", "income_50k", "education", "marital_stat")
CATEGORICAL: tuple[str, ...] = tuple(c for c in COLUMNS if c not in NUMERIC and c not in EXCLUDED)
LABEL_VALUES = ("- 50000.", "50000+.")
MISSING = "?"
EDUCATION_LEVELS: tuple[str, ...] = (
    "Children", "Less than 1st grade", "1st 2nd 3rd or 4th grade", "5th or 6th grade", "7th and 8th grade",
    "9th grade", "10th grade", "11th grade", "12th grade no diploma", "High school graduate",
    "Some college but no degree", "Associates degree-occup /vocational", "Associates degree-academic program",
    "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)",
)  # fmt: skip
COLLEGE_LEVELS: tuple[str, ...] = EDUCATION_LEVELS[11:]
TASK_GROUPS: dict[int, tuple[str, ...]] = {1: ("income", "marital"), 2: ("education", "marital")}
FILES = {"train": "census-income.data", "test": "census-income.test"}
HOW_TO_GET = (
    "Download census-income.data.gz and census-income.test.gz from the UCI archive "
    "(https://archive.ics.uci.edu/dataset/117/census+income+kdd) into data.root (plain, .gz or .bz2 all work), "
    "or point data.root (or the MTL_CENSUS_ROOT environment variable) at a folder that has them, "
    "or set data.download=true to fetch them (checksum-verified)."
)
CACHE_VERSION = 1  # bump when the preprocessing changes
UCI_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld"
UCI_SHA256 = {  # of the uncompressed files as published (../shared/data/census-income/SOURCE.md)
    "census-income.data": "3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86",
    "census-income.test": "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
}


def download(root: Path, url: str = UCI_URL, sha256: Mapping[str, str] | None = None, timeout: float = 60.0) -> None:
    """Fetch each missing ``<name>.gz`` of ``FILES`` from ``url`` into ``root``, verified by the sha256 of its
    uncompressed content; a failed or mismatching download leaves nothing behind (a DataError says why)."""
    import gzip
    import urllib.error
    import urllib.request

    expected = dict(UCI_SHA256 if sha256 is None else sha256)
    for name in FILES.values():
        if any((root / f"{name}{suffix}").is_file() for suffix in ("", ".gz", ".bz2")):
            continue
        target, source = root / f"{name}.gz", f"{url.rstrip('/')}/{name}.gz"
        part = target.with_name(f".{target.name}.part{os.getpid()}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            log.info("Census-Income: downloading %s", source)
            with urllib.request.urlopen(source, timeout=timeout) as response, open(part, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            h = hashlib.sha256()
            with gzip.open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except (urllib.error.URLError, OSError, EOFError, ValueError) as e:
            part.unlink(missing_ok=True)
            raise DataError(f"Cannot download {source} into {root}: {e}. {HOW_TO_GET}") from e
        if name in expected and h.hexdigest() != expected[name]:
            part.unlink(missing_ok=True)
            raise DataError(
                f"Downloaded {source}, but the sha256 of its content is {h.hexdigest()}, not the published "
                f"{expected[name]}: the file is corrupt or not the UCI original; nothing was kept. {HOW_TO_GET}"
            )
        os.replace(part, target)  # only a verified file ever appears under its real name


def find_file(root: Path, name: str) -> Path:
    """``root/name``, ``root/name.gz`` or ``root/name.bz2``: the first that exists, else a DataError."""
    for suffix in ("", ".gz", ".bz2"):
        if (root / f"{name}{suffix}").is_file():
            return root / f"{name}{suffix}"
    return require_file(root / name, f"(Also looked for {name}.gz and {name}.bz2.) {HOW_TO_GET}")


def read_census(path: Path) -> pd.DataFrame:
    """One UCI file as strings (``?`` kept as is), columns ``COLUMNS``; compression from the extension."""
    try:
        df = pd.read_csv(
            path,
            header=None,
            names=list(COLUMNS),
            sep=",",
            skipinitialspace=True,  # the separator is ", ": the C engine with this is ~10x faster than sep=", "
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            index_col=False,
            engine="c",
        )
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"Cannot parse {path} as a UCI Census-Income file ({len(COLUMNS)} fields a row): {e}") from e
    short = df[COLUMNS[-1]] == ""
    if short.any():
        raise DataError(
            f"{path}: line {int(np.flatnonzero(short.to_numpy())[0]) + 1} has fewer than {len(COLUMNS)} fields."
        )
    bad = ~df["income_50k"].isin(LABEL_VALUES)
    if bad.any():
        raise DataError(
            f"{path}: the label column (field {len(COLUMNS)}) must be one of {list(LABEL_VALUES)}, got "
            f"{df['income_50k'][bad].iloc[0]!r} on line {int(np.flatnonzero(bad.to_numpy())[0]) + 1}."
        )
    return df


class CensusIncomeDataModule(CachedDataModule):
    """The MMoE Census-Income benchmark; see the module docstring for files, tasks, inputs and splits."""

    NAME, CACHE_PREFIX = "Census-Income", "census-income"

    def __init__(
        self,
        tasks: Mapping | None = None,
        root: str = "../shared/data/census-income",
        task_group: int = 1,
        college_levels: Sequence[str] = COLLEGE_LEVELS,
        split_seed: int = 0,
        cache: bool = True,
        cache_dir: str | None = "~/.cache/mtl-experiments/census-income",
        download: bool = False,
        download_url: str = UCI_URL,
        download_sha256: Mapping[str, str] | None = None,
        **kwargs,
    ):
        checks.choice("data.task_group", task_group, sorted(TASK_GROUPS))
        if tasks is None:  # the group's own tasks, so 'data.task_group=2' alone switches the benchmark
            tasks = {name: {"kind": "binary"} for name in TASK_GROUPS[int(task_group)]}
        super().__init__(tasks=tasks, root=root, cache=cache, cache_dir=cache_dir, **kwargs)
        self.task_group = int(task_group)
        expected = TASK_GROUPS[self.task_group]
        if sorted(self.tasks) != sorted(expected):
            example = ", ".join(f"{t}: {{kind: binary}}" for t in expected)
            raise ConfigError(
                f"data.task_group={self.task_group} defines the tasks {list(expected)}, but data.tasks has "
                f"{list(self.tasks)}; set 'data.tasks={{{example}}}'."
            )
        not_binary = [n for n, t in self.tasks.items() if t.label_type is not LabelType.BINARY]
        if not_binary:
            raise ConfigError(f"Census-Income tasks are binary; task(s) {not_binary} have another kind.")
        levels = [str(x) for x in college_levels]
        unknown = sorted(set(levels) - set(EDUCATION_LEVELS))
        if not levels or unknown:
            raise ConfigError(
                f"data.college_levels must be a non-empty list of education values of the UCI file; "
                f"unknown: {unknown}. Valid values: {list(EDUCATION_LEVELS)}."
            )
        self.college_levels = sorted(set(levels))
        self.split_seed = int(split_seed)
        self.download, self.download_url = bool(download), str(download_url)
        self.download_sha256 = dict(download_sha256) if download_sha256 is not None else None

    # ---- config -> key ------------------------------------------------------------------------------
    def preprocessing_config(self) -> dict:
        """Everything that changes the preprocessed tensors (part of the cache key)."""
        return {
            "version": CACHE_VERSION,
            "task_group": self.task_group,
            "college_levels": self.college_levels if self.task_group == 2 else None,
            "split_seed": self.split_seed,
        }

    # ---- loading ------------------------------------------------------------------------------------
    def files(self) -> dict[str, Path]:
        if self.download:
            download(self.root, self.download_url, self.download_sha256)
        return {split: find_file(self.root, name) for split, name in FILES.items()}

    def _unpack(self, data: dict) -> Splits:
        self.vocabularies, self.numeric_stats = data["vocabularies"], data["numeric_stats"]
        s = data["splits"]
        return Splits(s["train"], s["val"], s["test"], FeatureSpec.from_dict(data["feature_spec"]))

    def labels(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        columns = {
            "income": df["income_50k"] == LABEL_VALUES[1],
            "marital": df["marital_stat"] == "Never married",
            "education": df["education"].isin(self.college_levels),
        }
        return {name: torch.from_numpy(columns[name].to_numpy(np.float32)) for name in self.tasks}

    def preprocess(self, files: Mapping[str, Path]) -> dict:
        """Both raw files -> tensors of the three splits, feature spec and the fitted statistics."""
        train_df, test_df = read_census(files["train"]), read_census(files["test"])
        numeric = {}
        stats = {}
        for name, df in (("train", train_df), ("test", test_df)):
            cols = []
            for c in NUMERIC:
                raw = df[c].replace(MISSING, "nan")
                values = pd.to_numeric(raw, errors="coerce")
                bad = values.isna() & (raw != "nan")
                if bad.any():
                    raise DataError(
                        f"Census-Income {name} file: column {c} has the non-numeric value {raw[bad].iloc[0]!r}."
                    )
                cols.append(values.to_numpy(np.float64))
            numeric[name] = np.stack(cols, axis=1)
        x = numeric["train"]
        mean = np.nanmean(x, axis=0) if len(x) else np.zeros(len(NUMERIC))
        mean = np.nan_to_num(mean)
        std = np.nanstd(x, axis=0) if len(x) else np.ones(len(NUMERIC))
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        for c, m, s in zip(NUMERIC, mean, std, strict=True):
            stats[c] = [float(m), float(s)]
        for name in numeric:
            v = numeric[name]
            v = np.where(np.isnan(v), mean, v)
            numeric[name] = torch.from_numpy(((v - mean) / std).astype(np.float32))

        vocab = {c: sorted(set(train_df[c].unique()) - {MISSING}) for c in CATEGORICAL}

        def encode(df: pd.DataFrame) -> torch.Tensor:
            cols = [pd.Index(vocab[c]).get_indexer(df[c]).astype(np.int64) + 1 for c in CATEGORICAL]  # -1 -> 0
            return torch.from_numpy(np.stack(cols, axis=1) if cols else np.zeros((len(df), 0), np.int64))

        full = {
            "train": {"features": {"numeric": numeric["train"], "categorical": encode(train_df)},
                      "labels": self.labels(train_df)},
            "test": {"features": {"numeric": numeric["test"], "categorical": encode(test_df)},
                     "labels": self.labels(test_df)},
        }  # fmt: skip
        n = len(test_df)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        parts = {"val": order[: n // 2], "test": order[n // 2 :]}

        splits = {"train": full["train"], **{k: gather(full["test"], idx) for k, idx in parts.items()}}
        spec = FeatureSpec(numeric=NUMERIC, categorical={c: len(vocab[c]) + 1 for c in CATEGORICAL})
        return {
            "splits": splits,
            "feature_spec": spec.to_dict(),
            "vocabularies": vocab,
            "numeric_stats": stats,
            "config": self.preprocessing_config(),
        }
