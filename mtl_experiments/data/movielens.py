"""MovieLens-1M (Harper & Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015) as a
multi-task recommender dataset.

Files in ``root``, as GroupLens publishes them in ``ml-1m.zip`` (https://grouplens.org/datasets/movielens/1m/):
no header, fields separated by ``::``, ISO-8859-1 text (``encoding``; titles such as "Misérables" are not UTF-8):
  ``ratings.dat``  ``UserID::MovieID::Rating::Timestamp`` (whole stars 1-5; seconds since the epoch),
  ``users.dat``    ``UserID::Gender::Age::Occupation::Zip-code`` (age and occupation are codes),
  ``movies.dat``   ``MovieID::Title::Genres`` (the title ends in "(year)"; genres '|'-separated, from ``GENRES``).
A malformed line (a wrong number of fields, a non-numeric id, an unknown genre, a rating of an id that
users.dat / movies.dat lack, a duplicate id) is a DataError naming the file and the line. Blank lines are skipped.

Signals (a task's ``label``, default its name, picks one; ``SIGNALS`` lists the kinds each allows):
  ``rating`` (regression, the stars); ``liked`` = rating >= ``like_threshold`` (binary);
  ``genre_interest`` (binary): the movie has one of the user's ``interest_top_k`` genres, ranked by how often they
  occur among the genres of the movies the user rated in the *training* split (ties: ``GENRES`` order), so no
  validation or test row shapes a label; a user without training rows (held out by ``split: cold_user``) is ranked
  on their own rows, which never reach training either;
  ``next_item`` (retrieval): the movie id of the user's next rating in time (ties in the timestamp: file order),
  0 = none (the user's last rating); the whole log defines it, whatever the split;
  ``next_genre`` (multiclass, 19 classes): the primary genre (1..18, ``GENRES`` order) of that next movie, 0 = none.
Inputs: categorical ``user_id`` and ``movie_id``, ids 1..U and 1..I over the whole users.dat / movies.dat
catalogue (raw ids in sorted order), so every user and movie has its own row whether or not training saw it;
``gender``, ``age``, ``occupation``, ``zip_prefix`` (the zip code's first character), ``primary_genre`` (the first
listed), ``year_bucket`` (release decade from the title): ids 1..K for the values of the training rows' users /
movies in sorted order, 0 for a missing value or one never seen in training; numeric ``year`` (standardised with
the training rows' mean and std; a title without a year gets the mean) and ``genre_<name>`` (multi-hot 0/1).
``self.catalog`` holds these per user and per movie (row = id); ``self.item_info.category`` is the primary genre.

Splits: data/splits.py's ``split_rows`` over the rating rows, which are kept in time order (``split``: random,
cold_user, cold_item, temporal; ``val_fraction``, ``test_fraction``, ``cold_fraction``, seeded by ``split_seed``).
Batches carry ``user_id``, ``item_id`` (= movie_id) and ``timestamp``.

Cache: the preprocessed tables are saved under ``cache_dir``, keyed by the sha256 of the three files plus the
preprocessing config (all signals are cached, so the task list is not part of the key); ``cache: false`` turns it off.
Measured on generated files of ML-1M's size (6,040 users, 3,883 movies, 1.0M ratings; one thread): ``setup()``
takes 5.7 s parsing, 0.7 s from the cache (hashing the files included), 1.0 GB peak memory.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mtl_experiments import checks
from mtl_experiments.data.base import require_file
from mtl_experiments.data.interactions import InteractionDataModule, code_table, next_positive_item, standardise
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError, DataError

GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
NO_GENRE = ("", "(no genres listed)")  # later MovieLens releases write this; ML-1M lists at least one genre
GENRE_COLUMNS: tuple[str, ...] = tuple("genre_" + re.sub(r"[^a-z]+", "_", g.lower().replace("'", "")) for g in GENRES)
NUM_GENRE_CLASSES = len(GENRES) + 1  # next_genre: 0 = no next movie
FILES = {"ratings": "ratings.dat", "users": "users.dat", "movies": "movies.dat"}
FIELDS = {
    "ratings": ("UserID", "MovieID", "Rating", "Timestamp"),
    "users": ("UserID", "Gender", "Age", "Occupation", "Zip-code"),
    "movies": ("MovieID", "Title", "Genres"),
}
SIGNALS: dict[str, tuple[str, ...]] = {  # signal -> the task kinds it can train
    "rating": ("regression",),
    "liked": ("binary", "regression"),
    "genre_interest": ("binary", "regression"),
    "next_item": ("retrieval",),
    "next_genre": ("multiclass",),
}
DEFAULT_TASKS = {
    "rating": {"kind": "regression"},
    "liked": {"kind": "binary"},
    "genre_interest": {"kind": "binary"},
    "next_item": {"kind": "retrieval"},
}
USER_CATEGORICAL = ("gender", "age", "occupation", "zip_prefix")  # after user_id
ITEM_CATEGORICAL = ("primary_genre", "year_bucket")  # after movie_id
CATEGORICAL = ("user_id", *USER_CATEGORICAL, "movie_id", *ITEM_CATEGORICAL)
NUMERIC = ("year", *GENRE_COLUMNS)  # all item columns
HOW_TO_GET = (
    "Download ml-1m.zip from https://grouplens.org/datasets/movielens/1m/, unzip it and point data.root (or the "
    "MTL_MOVIELENS_ROOT environment variable) at the ml-1m folder with ratings.dat, users.dat and movies.dat."
)
CACHE_VERSION = 1  # bump when the preprocessing changes
_YEAR = re.compile(r"\((\d{4})\)\s*$")


# ---- parsing --------------------------------------------------------------------------------------------------
def read_dat(path: Path, fields: Sequence[str], encoding: str = "latin-1") -> pd.DataFrame:
    """A ``::``-separated MovieLens file as strings, columns ``fields``, index = the 1-based line number."""
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: not valid {encoding} text ({e.reason}); MovieLens-1M files are ISO-8859-1, "
            "set data.encoding=latin-1."
        ) from e
    except LookupError as e:
        raise ConfigError(f"data.encoding={encoding!r} is not a text encoding Python knows.") from e
    lines = text.splitlines()
    blank = np.fromiter((not line.strip() for line in lines), bool, len(lines))
    counts = np.fromiter((line.count("::") + 1 for line in lines), np.int64, len(lines))
    bad = np.flatnonzero(~blank & (counts != len(fields)))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}, line {i + 1}: expected {len(fields)} '::'-separated fields ({'::'.join(fields)}), found "
            f"{counts[i]}: {lines[i][:120]!r}."
        )
    keep = np.flatnonzero(~blank)
    if not len(keep):
        raise DataError(f"{path} has no data lines. {HOW_TO_GET}")
    body = "\n".join(lines[i] for i in keep).replace("::", "\x1f")  # one-character separator: pandas' C parser
    df = pd.read_csv(
        io.StringIO(body),
        sep="\x1f",
        header=None,
        names=list(fields),
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        quoting=3,  # csv.QUOTE_NONE: quotes in titles are text
        engine="c",
    )
    df.index = keep + 1
    return df


def integers(df: pd.DataFrame, field: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[field].str.strip(), errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}, line {df.index[i]}: {field} must be an integer, got {df[field].iloc[i]!r}.")
    return values.astype(np.int64)


def catalogue_ids(raw: np.ndarray, path: Path, field: str, lines: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted raw ids, the order that sorts the file's rows)``: id k (1-based) is the k-th smallest raw id;
    a DataError for a duplicate."""
    order = np.argsort(raw, kind="stable")
    dup = np.flatnonzero(np.diff(raw[order]) == 0)
    if len(dup):
        i = int(order[dup[0] + 1])
        raise DataError(f"{path}, line {lines[i]}: {field} {raw[i]} appears a second time; ids must be unique.")
    return raw[order], order


def lookup(raw: np.ndarray, catalogue: np.ndarray, path: Path, field: str, lines: pd.Index, source: Path) -> np.ndarray:
    """Raw ids -> 1-based positions in the sorted ``catalogue``; a DataError for an id it lacks."""
    pos = np.searchsorted(catalogue, raw)
    found = pos < len(catalogue)
    found[found] = catalogue[pos[found]] == raw[found]
    if not found.all():
        i = int(np.flatnonzero(~found)[0])
        raise DataError(f"{path}, line {lines[i]}: {field} {raw[i]} is not in {source}.")
    return pos.astype(np.int64) + 1


def read_catalogues(
    paths: Mapping[str, Path], encoding: str
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """users.dat and movies.dat with row k - 1 = id k, and the sorted raw ids (id k = the k-th smallest)."""
    out = []
    for key, field in (("users", "UserID"), ("movies", "MovieID")):
        df = read_dat(paths[key], FIELDS[key], encoding)
        raw, order = catalogue_ids(integers(df, field, paths[key]), paths[key], field, df.index)
        out.append((df.iloc[order], raw))
    (users, user_raw), (movies, movie_raw) = out
    return users, movies, user_raw, movie_raw


def read_ratings(
    paths: Mapping[str, Path], encoding: str, user_raw: np.ndarray, movie_raw: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rating rows as ``(user id, movie id, stars, timestamp)``, in time order (ties: file order)."""
    p = paths["ratings"]
    ratings = read_dat(p, FIELDS["ratings"], encoding)
    user = lookup(integers(ratings, "UserID", p), user_raw, p, "UserID", ratings.index, paths["users"])
    item = lookup(integers(ratings, "MovieID", p), movie_raw, p, "MovieID", ratings.index, paths["movies"])
    stars = pd.to_numeric(ratings["Rating"].str.strip(), errors="coerce").to_numpy(np.float64)
    if not np.isfinite(stars).all():
        i = int(np.flatnonzero(~np.isfinite(stars))[0])
        raise DataError(f"{p}, line {ratings.index[i]}: Rating must be a number, got {ratings['Rating'].iloc[i]!r}.")
    timestamp = integers(ratings, "Timestamp", p)
    order = np.argsort(timestamp, kind="stable")
    return user[order], item[order], stars[order], timestamp[order]


def movie_genres(movies: pd.DataFrame, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per movie id (row 0 the unknown id): the multi-hot genres, the primary genre (the first listed, 1..18; 0 =
    none) and the release year (NaN when the title has none)."""
    genre_index = {g: k for k, g in enumerate(GENRES)}
    multi_hot = np.zeros((len(movies) + 1, len(GENRES)), np.float32)
    primary = np.zeros(len(movies) + 1, np.int64)
    for row, (line, text) in enumerate(zip(movies.index, movies["Genres"], strict=True), start=1):
        names = [] if text.strip() in NO_GENRE else text.strip().split("|")
        for k, name in enumerate(names):
            if name not in genre_index:
                raise DataError(
                    f"{path}, line {line}: unknown genre {name!r}; the MovieLens-1M genres are {list(GENRES)}."
                )
            multi_hot[row, genre_index[name]] = 1.0
            if k == 0:
                primary[row] = genre_index[name] + 1
    year = np.full(len(movies) + 1, np.nan)
    year[1:] = movies["Title"].str.extract(_YEAR, expand=False).astype(float).to_numpy()
    return multi_hot, primary, year


def genre_interest(
    user: np.ndarray, item: np.ndarray, train: np.ndarray, multi_hot: np.ndarray, num_users: int, top_k: int
) -> np.ndarray:
    """Per row: 1 if the movie has one of the user's ``top_k`` genres, ranked by how often they occur among the
    movies the user rated in training (a user without training rows: on their own rows, never trained on)."""

    def genre_counts(rows: np.ndarray) -> np.ndarray:
        return np.stack(
            [np.bincount(user[rows], weights=multi_hot[item[rows], g], minlength=num_users + 1)
             for g in range(len(GENRES))], axis=1)  # fmt: skip

    counts = genre_counts(train)
    no_train = np.bincount(user[train], minlength=num_users + 1) == 0
    if no_train[user].any():  # users held out entirely: ranked on their own rows (none of them is trained on)
        counts += genre_counts(np.flatnonzero(no_train[user]))
    top = np.argsort(-counts, axis=1, kind="stable")[:, :top_k]
    interest = np.zeros_like(counts, dtype=bool)
    np.put_along_axis(interest, top, True, axis=1)
    interest &= counts > 0
    return (interest[user] & (multi_hot[item] > 0)).any(axis=1).astype(np.float32)


def input_tables(
    users: pd.DataFrame, primary: np.ndarray, year: np.ndarray, train_user: np.ndarray, train_item: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]]]:
    """The user and movie categorical tables (ids of values, vocabularies of the training rows' users and movies)
    and those vocabularies."""
    user_text = {
        "gender": users["Gender"].str.strip().to_numpy(object),
        "age": users["Age"].str.strip().to_numpy(object),
        "occupation": users["Occupation"].str.strip().to_numpy(object),
        "zip_prefix": users["Zip-code"].str.strip().str[:1].to_numpy(object),
    }
    decade = np.where(np.isnan(year[1:]), -1, np.floor(np.nan_to_num(year[1:]) / 10) * 10).astype(np.int64)
    item_text = {
        "primary_genre": np.array([GENRES[g - 1] if g else None for g in primary[1:]], dtype=object),
        "year_bucket": np.array([f"{d}s" if d >= 0 else None for d in decade], dtype=object),
    }
    for values in (*user_text.values(), *item_text.values()):
        values[values == ""] = None
    user_cat, vocab = code_table(len(users), {c: user_text[c] for c in USER_CATEGORICAL}, np.unique(train_user))
    item_cat, item_vocab = code_table(len(primary) - 1, {c: item_text[c] for c in ITEM_CATEGORICAL},
                                      np.unique(train_item))  # fmt: skip
    return user_cat, item_cat, vocab | item_vocab


class MovieLensDataModule(InteractionDataModule):
    """MovieLens-1M; see the module docstring for files, signals, inputs, splits and the cache. The split and
    cache options (``split``, ``val_fraction``, ``test_fraction``, ``cold_fraction``, ``split_seed``, ``cache``)
    are data/interactions.py's."""

    NAME, CACHE_PREFIX = "MovieLens", "movielens"
    SIGNALS, DEFAULT_TASKS = SIGNALS, DEFAULT_TASKS  # as conf/data/movielens.yaml

    def __init__(
        self,
        tasks: Mapping | None = None,
        root: str = "../shared/data/ml-1m",
        like_threshold: float = 4,
        interest_top_k: int = 3,
        encoding: str = "latin-1",
        cache_dir: str | None = "~/.cache/mtl-experiments/movielens",
        **kwargs,
    ):
        super().__init__(tasks=tasks, root=root, cache_dir=cache_dir, **kwargs)
        for name, task in self.tasks.items():
            if task.label == "next_genre":  # a fixed class set: inferring it from training labels could miss one
                if task.num_classes not in (None, NUM_GENRE_CLASSES):
                    raise ConfigError(
                        f"data.tasks.{name}: next_genre has {NUM_GENRE_CLASSES} classes (0 = no next movie, then the "
                        f"{len(GENRES)} genres), got num_classes={task.num_classes}; leave it unset."
                    )
                task.num_classes = NUM_GENRE_CLASSES
        self.interest_top_k = checks.integer("data.interest_top_k", interest_top_k, low=1, high=len(GENRES),
                                             hint="a number of genres")  # fmt: skip
        self.like_threshold = checks.number("data.like_threshold", like_threshold, low=1, high=5, hint="stars")
        self.encoding = encoding

    def preprocessing_config(self) -> dict:
        """Everything that changes the preprocessed tensors (part of the cache key)."""
        return {
            "version": CACHE_VERSION,
            "like_threshold": self.like_threshold,
            "interest_top_k": self.interest_top_k,
            "encoding": self.encoding,
            **self.split_config(),
        }

    def files(self) -> dict[str, Path]:
        return {k: require_file(self.root / name, HOW_TO_GET) for k, name in FILES.items()}

    # ---- raw files -> tables --------------------------------------------------------------------------------
    def preprocess(self, paths: Mapping[str, Path]) -> dict:
        users, movies, user_raw, movie_raw = read_catalogues(paths, self.encoding)
        num_users, num_items = len(user_raw), len(movie_raw)
        user, item, stars, timestamp = read_ratings(paths, self.encoding, user_raw, movie_raw)
        multi_hot, primary, year = movie_genres(movies, paths["movies"])
        # signals that do not depend on the split
        next_item = next_positive_item(user, item, np.ones(len(user), bool))
        signals = {
            "rating": stars.astype(np.float32),
            "liked": (stars >= self.like_threshold).astype(np.float32),
            "next_item": next_item,
            "next_genre": primary[next_item],  # primary[0] = 0: no next movie
        }
        parts = self.split_parts(user, item, timestamp)
        train = parts["train"]
        signals["genre_interest"] = genre_interest(user, item, train, multi_hot, num_users, self.interest_top_k)

        # inputs: vocabularies of the training rows' users and movies
        user_cat, item_cat, vocab = input_tables(users, primary, year, user[train], item[train])
        item_num = np.zeros((num_items + 1, len(NUMERIC)), np.float32)
        item_num[:, 0], mean, std = standardise(year, year[item[train]])
        item_num[:, 1:] = multi_hot
        item_num[0] = 0.0

        spec = FeatureSpec(
            numeric=NUMERIC,
            categorical={"user_id": num_users + 1, **{c: len(vocab[c]) + 1 for c in USER_CATEGORICAL},
                         "movie_id": num_items + 1, **{c: len(vocab[c]) + 1 for c in ITEM_CATEGORICAL}},
            id_columns={"user_id": "user_id", "item_id": "movie_id"},
        )  # fmt: skip
        return self.pack(
            rows={"user_id": user, "item_id": item, "timestamp": timestamp, "signals": signals},
            parts=parts,
            users=user_cat,
            items=item_cat,
            item_numeric=item_num,
            category=primary,
            spec=spec,
            vocabularies=vocab,
            numeric_stats={"year": [mean, std]},
            raw_ids={"user_id": user_raw, "movie_id": movie_raw},  # id k is raw id [k - 1] of users.dat / movies.dat
        )
