"""KuaiRand (Gao et al., "KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly Exposed Videos",
CIKM 2022): short-video impressions with a dozen feedback signals per row, as a multi-task recommender dataset.

Files in ``root`` (the ``data`` folder of KuaiRand-Pure, -1K or -27K, https://kuairand.com), CSV with a header:
  logs (``logs``: ``standard`` = ``log_standard_4_08_to_4_21_*.csv`` + ``log_standard_4_22_to_5_08_*.csv``,
  ``random`` = ``log_random_4_22_to_5_08_*.csv`` (the randomly exposed videos), ``all``, or a list of file names /
  glob patterns; each must match a file; 27K's ``_part1``/``_part2`` files match the same pattern) with the columns
  user_id, video_id, date, hourmin, time_ms, is_click, is_like, is_follow, is_comment, is_forward, is_hate,
  long_view, play_time_ms, duration_ms, profile_stay_time, comment_stay_time, is_profile_enter, is_rand, tab;
  ``user_features`` (one file, default ``user_features_*.csv``): user_id, user_active_degree, is_lowactive_period,
  is_live_streamer, is_video_author, follow/fans/friend_user_num_range, register_days_range, onehot_feat0..17, ...;
  ``video_features`` (optional, default ``video_features_basic_*.csv``): video_id, author_id, video_type,
  upload_dt, upload_type, visible_status, video_duration, server_width, server_height, music_id, music_type, tag.
A malformed line (a wrong number of fields, a missing or non-numeric id / time / label, a binary signal other than
0/1) is a DataError naming the file and the line (1-based, the header is line 1).

Signals (a task's ``label``, default its name): binary ``click`` (is_click), ``like``, ``follow``, ``comment``,
``forward``, ``hate``, ``long_view``, ``profile_enter``; ``play_time`` = log(1 + play_time_ms / 1000) (regression);
``next_item`` (retrieval): the video id of the user's next row in time with ``next_item_signal`` = 1 (default
``click``; null: the next impression), 0 = none.
Inputs: categorical ``user_id`` and ``video_id``, ids 1..U over the users of the user features file and the logs and
1..I over the videos of the logs read (``item_catalog: logs``) or also every video of the video features file
(``features``), raw ids in sorted order, so every catalogue user/video keeps its own row whether training saw it or
not; the user columns ``USER_CATEGORICAL``; with video features ``author_id``, ``video_type``, ``upload_type``,
``visible_status``, ``music_type``, ``tag`` (the first listed); with ``context_features: true`` also ``tab`` and
``hour`` (of hourmin), which describe the impression, not the user or the item, so the dataset then has no
``catalog`` to recommend from. Their ids are 1..K over the values of the training rows in sorted order, 0 = missing
or never seen in training. Numeric ``log_duration`` = log(1 + seconds) of the video (video_duration, else its mean
duration_ms in the logs), standardised with the training rows' mean and std (missing: the mean).
``self.catalog`` holds these per user and per video (row = id); ``self.item_info.category`` is the video's first tag.

Splits: data/splits.py's ``split_rows`` over the log rows, kept in time order (time_ms; ties: file order, files in
the order listed): ``split`` random, cold_user, cold_item or temporal. Batches carry ``user_id``, ``item_id`` (=
video_id) and ``timestamp`` (time_ms). Everything is held in memory: KuaiRand-Pure and -1K fit, -27K (322M rows)
does not.

Cache: data/cache.py, keyed by the sha256 of every file read plus the preprocessing config (as MovieLens).
Measured on generated files of KuaiRand-Pure's size (27,285 users, 7,583 videos, 1.44M standard-log rows; one
thread): ``setup()`` takes 3.7 s parsing, 1.4 s from the cache, 1.7 GB peak memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl_experiments import checks
from mtl_experiments.data.interactions import (
    InteractionDataModule,
    code_table,
    encode,
    fit_vocabulary,
    next_positive_item,
    standardise,
)
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LOG_SETS: dict[str, tuple[str, ...]] = {
    "standard": ("log_standard_4_08_to_4_21_*.csv", "log_standard_4_22_to_5_08_*.csv"),
    "random": ("log_random_4_22_to_5_08_*.csv",),
}
LOG_SETS["all"] = LOG_SETS["standard"] + LOG_SETS["random"]
BINARY: dict[str, str] = {  # signal -> log column
    "click": "is_click",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "hate": "is_hate",
    "long_view": "long_view",
    "profile_enter": "is_profile_enter",
}
SIGNALS: dict[str, tuple[str, ...]] = {
    **{s: ("binary", "regression") for s in BINARY},
    "play_time": ("regression",),
    "next_item": ("retrieval",),
}
DEFAULT_TASKS = {
    "click": {"kind": "binary"},
    "like": {"kind": "binary"},
    "long_view": {"kind": "binary"},
    "play_time": {"kind": "regression"},
}
REQUIRED_LOG = ("user_id", "video_id", "time_ms", *BINARY.values(), "play_time_ms")  # a missing value is an error
OPTIONAL_LOG = ("hourmin", "duration_ms", "tab")  # a missing value is unknown
USER_CATEGORICAL: tuple[str, ...] = (
    "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author", "follow_user_num_range",
    "fans_user_num_range", "friend_user_num_range", "register_days_range", *(f"onehot_feat{k}" for k in range(18)),
)  # fmt: skip
VIDEO_CATEGORICAL = ("author_id", "video_type", "upload_type", "visible_status", "music_type", "tag")
CONTEXT_CATEGORICAL = ("tab", "hour")
NUMERIC = ("log_duration",)
ITEM_CATALOGS = ("logs", "features")
HOW_TO_GET = (
    "Download KuaiRand-Pure (or -1K / -27K) as described on https://kuairand.com "
    "(https://github.com/chongminggao/KuaiRand#download-the-data), unpack it and point data.root (or the "
    "MTL_KUAIRAND_ROOT environment variable) at its data folder."
)
CACHE_VERSION = 1  # bump when the preprocessing changes


def resolve(root: Path, patterns: Sequence[str], what: str) -> list[Path]:
    """The files each pattern (a name or a glob, relative to ``root`` or absolute) matches, in pattern order, each
    sorted."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        base, glob = (path.parent, path.name) if path.is_absolute() else (root, pattern)
        matches = sorted(p for p in base.glob(glob) if p.is_file())
        if not matches:
            raise DataError(f"No file matches {what} {pattern!r} in {root.resolve()}. {HOW_TO_GET}")
        found += [m for m in matches if m not in found]
    return found


def line_of(index: int) -> int:
    """The file line of a data row (0-based) of a CSV with one header line."""
    return index + 2


def read_csv(path: Path, columns: Sequence[str], **kwargs) -> pd.DataFrame:
    """The whole CSV (so a line with too many fields is an error, which ``usecols`` would hide), checked for
    ``columns``."""
    try:
        df = pd.read_csv(path, engine="c", **kwargs)
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{path} is empty; it needs a header line. {HOW_TO_GET}") from e
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        raise DataError(f"Cannot parse {path} as a KuaiRand CSV file: {e}") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; its columns are {list(df.columns)}. {HOW_TO_GET}")
    return df


def numbers(df: pd.DataFrame, column: str, path: Path, required: bool, start: int = 0) -> np.ndarray:
    """A column as float64 (NaN where missing or empty): a DataError for a non-numeric value, and for a missing one
    when ``required``. ``start``: the data row of ``df``'s first row (for a file read in chunks)."""
    raw = df[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
    missing = np.array(raw.isna(), dtype=bool)  # a writable copy
    if raw.dtype.kind not in "iufb":  # text: an empty field is missing too
        missing |= (raw.astype(str).str.strip() == "").to_numpy()
    bad = (np.isnan(values) & ~missing) | (missing if required else False)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        problem = "is missing" if missing[i] else f"is not a number: {raw.iloc[i]!r}"
        raise DataError(f"{path}, line {line_of(start + i)}: {column} {problem}.")
    return values


def read_log(path: Path) -> dict[str, np.ndarray]:
    df = read_csv(path, (*REQUIRED_LOG, *OPTIONAL_LOG))
    out = {c: numbers(df, c, path, required=True) for c in REQUIRED_LOG}
    out |= {c: numbers(df, c, path, required=False) for c in OPTIONAL_LOG}
    for column in BINARY.values():
        bad = (out[column] != 0) & (out[column] != 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}, line {line_of(i)}: {column} must be 0 or 1, got {df[column].iloc[i]!r}.")
    return out


def texts(df: pd.DataFrame, column: str) -> np.ndarray:
    """A column as an object array of stripped strings, None where missing or empty."""
    values = df[column].astype(object).to_numpy()
    out = np.array(
        [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in values], dtype=object
    )
    out[out == ""] = None
    return out


def unique_ids(ids: np.ndarray, path: Path, column: str) -> None:
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(np.diff(ids[order]) == 0)
    if len(dup):
        i = int(order[dup[0] + 1])
        raise DataError(f"{path}, line {line_of(i)}: {column} {int(ids[i])} appears a second time; ids must be unique.")


def read_logs(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """The log files' rows concatenated, in time order (time_ms; ties: file order, files in the order given)."""
    logs = [read_log(p) for p in paths]
    rows = {c: np.concatenate([part[c] for part in logs]) for c in logs[0]}
    del logs
    order = np.argsort(rows["time_ms"], kind="stable")
    return {c: v[order] for c, v in rows.items()}


def item_tables(
    videos: Mapping[str, np.ndarray] | None,
    video_raw: np.ndarray,
    duration_ms: np.ndarray,
    item: np.ndarray,
    train: np.ndarray,
) -> dict:
    """The item side: ``categorical`` table (video feature ids, vocabularies of the training rows' videos, in
    ``vocabularies``; ``columns`` names them), ``category`` (the first tag, for diversity metrics; None without
    video features) and ``numeric``: log(1 + seconds) standardised (``log_duration_stats``: mean, std), the
    duration from the video features, else the logs' mean duration_ms."""
    num_items = len(video_raw)
    video_text, category = {}, None
    seconds = np.full(num_items + 1, np.nan)
    if videos is not None:
        known = np.isin(videos["video_id"], video_raw)
        video_rows = np.searchsorted(video_raw, videos["video_id"][known]) + 1
        for c in VIDEO_CATEGORICAL:
            video_text[c] = np.full(num_items, None, dtype=object)  # row k - 1 = video id k
            video_text[c][video_rows - 1] = videos[c][known]
        # the catalogue's categories (all videos, not only trained ones): diversity metrics
        tag = np.concatenate([[None], video_text["tag"]])
        category = torch.from_numpy(encode(tag, fit_vocabulary(video_text["tag"])))
        seconds[video_rows] = videos["video_duration"][known] / 1000
    item_cat, vocab = code_table(num_items, video_text, np.unique(item[train]))
    ok = np.isfinite(duration_ms) & (duration_ms > 0)
    count = np.bincount(item[ok], minlength=num_items + 1)
    mean_ms = np.bincount(item[ok], weights=duration_ms[ok], minlength=num_items + 1) / np.maximum(count, 1)
    fill = ~(np.isfinite(seconds) & (seconds > 0)) & (count > 0)
    seconds[fill] = mean_ms[fill] / 1000
    log_duration = np.log1p(np.where(seconds > 0, seconds, np.nan))
    item_num, mean, std = standardise(log_duration, log_duration[item[train]])
    item_num = item_num.astype(np.float32)
    item_num[0] = 0.0
    return {"categorical": item_cat, "vocabularies": vocab, "columns": tuple(video_text), "category": category,
            "numeric": item_num, "log_duration_stats": [mean, std]}  # fmt: skip


class KuaiRandDataModule(InteractionDataModule):
    """KuaiRand-Pure / -1K / -27K; see the module docstring for files, signals, inputs, splits and the cache. The
    split and cache options (``split``, ``val_fraction``, ``test_fraction``, ``cold_fraction``, ``split_seed``,
    ``cache``) are data/interactions.py's."""

    NAME, CACHE_PREFIX = "KuaiRand", "kuairand"
    SIGNALS, DEFAULT_TASKS = SIGNALS, DEFAULT_TASKS  # as conf/data/kuairand.yaml

    def __init__(
        self,
        tasks: Mapping | None = None,
        root: str = "../shared/data/KuaiRand-Pure/data",
        logs: str | Sequence[str] = "standard",
        user_features: str = "user_features_*.csv",
        video_features: str | None = "video_features_basic_*.csv",
        item_catalog: str = "logs",
        context_features: bool = False,
        next_item_signal: str | None = "click",
        cache_dir: str | None = "~/.cache/mtl-experiments/kuairand",
        **kwargs,
    ):
        super().__init__(tasks=tasks, root=root, cache_dir=cache_dir, **kwargs)
        if isinstance(logs, str):
            if logs not in LOG_SETS:
                raise ConfigError(
                    f"data.logs must be one of {list(LOG_SETS)} or a list of log file names / glob patterns, "
                    f"got {logs!r}."
                )
            self.log_patterns = list(LOG_SETS[logs])
        else:
            self.log_patterns = [str(p) for p in logs]
            if not self.log_patterns:
                raise ConfigError("data.logs is empty: name the log files to read, or use 'standard' / 'random'.")
        if not user_features:
            raise ConfigError("data.user_features must name the user features file (e.g. user_features_*.csv).")
        checks.choice("data.item_catalog", item_catalog, ITEM_CATALOGS)
        if item_catalog == "features" and not video_features:
            raise ConfigError("data.item_catalog=features needs data.video_features (the file that lists the videos).")
        hint = "a binary signal; null: the next impression"
        checks.optional(checks.choice, "data.next_item_signal", next_item_signal, BINARY, hint=hint)
        self.user_features, self.video_features = str(user_features), video_features and str(video_features)
        self.item_catalog, self.context_features = item_catalog, bool(context_features)
        self.next_item_signal = next_item_signal

    def preprocessing_config(self) -> dict:
        """Everything besides the files that changes the preprocessed tensors (part of the cache key)."""
        return {
            "version": CACHE_VERSION,
            "item_catalog": self.item_catalog,
            "context_features": self.context_features,
            "next_item_signal": self.next_item_signal,
            **self.split_config(),
        }

    def files(self) -> dict[str, list[Path]]:
        files = {"logs": resolve(self.root, self.log_patterns, "the log file (data.logs)")}
        for key, pattern in (("users", self.user_features), ("videos", self.video_features)):
            if not pattern:
                continue
            found = resolve(self.root, [pattern], f"data.{'user' if key == 'users' else 'video'}_features")
            if len(found) > 1:
                raise DataError(
                    f"data.{key[:-1]}_features={pattern!r} matches {len(found)} files in {self.root.resolve()} "
                    f"({[p.name for p in found]}); name one."
                )
            files[key] = found
        return files

    # ---- raw files -> tables --------------------------------------------------------------------------------
    def preprocess(self, files: Mapping[str, list[Path]]) -> dict:
        rows = read_logs(files["logs"])
        raw_user, raw_video = rows["user_id"].astype(np.int64), rows["video_id"].astype(np.int64)
        users_path = files["users"][0]
        users = read_csv(users_path, ("user_id", *USER_CATEGORICAL), dtype=str, keep_default_na=False)
        user_ids = numbers(users, "user_id", users_path, required=True).astype(np.int64)
        unique_ids(user_ids, users_path, "user_id")
        user_raw = np.union1d(user_ids, raw_user)  # id k = the k-th smallest raw user id
        videos = self.read_videos(files["videos"][0], np.unique(raw_video)) if "videos" in files else None
        if videos is not None and self.item_catalog == "features":
            video_raw = np.union1d(videos["video_id"], raw_video)
        else:
            video_raw = np.unique(raw_video)
        num_users, num_items = len(user_raw), len(video_raw)
        user = np.searchsorted(user_raw, raw_user).astype(np.int64) + 1
        item = np.searchsorted(video_raw, raw_video).astype(np.int64) + 1
        timestamp = rows["time_ms"].astype(np.int64)

        signals = {s: rows[c].astype(np.float32) for s, c in BINARY.items()}
        signals["play_time"] = np.log1p(np.maximum(rows["play_time_ms"], 0) / 1000).astype(np.float32)
        positive = rows[BINARY[self.next_item_signal]] > 0 if self.next_item_signal else np.ones(len(user), bool)
        signals["next_item"] = next_positive_item(user, item, positive)
        parts = self.split_parts(user, item, timestamp)
        train = parts["train"]

        # user table: the user features file's columns, vocabularies of the training rows' users
        user_text = {c: np.full(num_users, None, dtype=object) for c in USER_CATEGORICAL}  # row k - 1 = user id k
        user_rows = np.searchsorted(user_raw, user_ids) + 1  # users.csv row -> its id
        for c in USER_CATEGORICAL:
            user_text[c][user_rows - 1] = texts(users, c)
        user_cat, vocab = code_table(num_users, user_text, np.unique(user[train]))
        items = item_tables(videos, video_raw, rows["duration_ms"], item, train)
        vocab |= items["vocabularies"]
        context = self.context(rows, train, vocab)
        categorical = {"user_id": num_users + 1, **{c: len(vocab[c]) + 1 for c in USER_CATEGORICAL},
                       "video_id": num_items + 1, **{c: len(vocab[c]) + 1 for c in items["columns"]}}  # fmt: skip
        if self.context_features:
            categorical |= {c: len(vocab[c]) + 1 for c in CONTEXT_CATEGORICAL}
        spec = FeatureSpec(
            numeric=NUMERIC, categorical=categorical, id_columns={"user_id": "user_id", "item_id": "video_id"}
        )
        return self.pack(
            rows={"user_id": user, "item_id": item, "timestamp": timestamp, "context": context, "signals": signals},
            parts=parts,
            users=user_cat,
            items=items["categorical"],
            item_numeric=items["numeric"][:, None],
            category=items["category"],
            spec=spec,
            vocabularies=vocab,
            numeric_stats={"log_duration": items["log_duration_stats"]},
            raw_ids={"user_id": user_raw, "video_id": video_raw},  # id k is raw id [k - 1] of the files
        )

    def context(self, rows: Mapping[str, np.ndarray], train: np.ndarray, vocab: dict[str, list[str]]) -> np.ndarray:
        """``[N, K]`` ids of the per-row context columns (``context_features``: tab, hour; K = 0 without), their
        vocabularies (of the training rows) added to ``vocab``."""
        if not self.context_features:
            return np.zeros((len(rows["time_ms"]), 0), np.int64)
        hour = np.floor(rows["hourmin"] / 100)
        context_text = {
            "tab": np.array([None if np.isnan(v) else str(int(v)) for v in rows["tab"]], dtype=object),
            "hour": np.array([None if np.isnan(v) else str(int(v)) for v in hour], dtype=object),
        }
        for c in CONTEXT_CATEGORICAL:
            vocab[c] = fit_vocabulary(context_text[c][train])
        return np.stack([encode(context_text[c], vocab[c]) for c in CONTEXT_CATEGORICAL], axis=1)

    def read_videos(self, path: Path, logged: np.ndarray) -> dict[str, np.ndarray]:
        """The video features of the ``logged`` videos (``item_catalog: logs``) or of all (``features``), read in
        chunks: the -1K and -27K files list millions of videos."""
        read_csv(path, ("video_id", *VIDEO_CATEGORICAL, "video_duration"), nrows=0)  # the header has the columns
        parts, start = [], 0
        try:
            for chunk in pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=1 << 20, engine="c"):
                ids = numbers(chunk, "video_id", path, required=True, start=start).astype(np.int64)
                duration = numbers(chunk, "video_duration", path, required=False, start=start)
                keep = np.ones(len(ids), bool) if self.item_catalog == "features" else np.isin(ids, logged)
                sub = chunk[keep]
                parts.append(
                    {
                        "video_id": ids[keep],
                        "video_duration": duration[keep],
                        **{c: texts(sub, c) for c in VIDEO_CATEGORICAL},
                    }
                )
                start += len(chunk)
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
            raise DataError(f"Cannot parse {path} as a KuaiRand CSV file: {e}") from e
        out = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        unique_ids(out["video_id"], path, "video_id")
        out["tag"] = np.array([None if t is None else (t.split(",")[0].strip() or None) for t in out["tag"]], object)
        return out
