"""MovieLens-1M: parsing of the published ``::`` files (latin-1), signals (no test leakage in genre_interest),
ids over the catalogue, splits, the catalogue tables, the cache, errors, and one training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_experiments.data import movielens
from mtl_experiments.data.movielens import GENRE_COLUMNS, GENRES, NUMERIC, MovieLensDataModule
from mtl_experiments.errors import ConfigError, DataError
from tests.fixtures_data import movielens_lines, write_movielens

TASKS = {
    "rating": {"kind": "regression"},
    "liked": {"kind": "binary"},
    "genre_interest": {"kind": "binary"},
    "next_item": {"kind": "retrieval"},
    "next_genre": {"kind": "multiclass"},
}


def module(root: Path, tmp_path: Path, tasks=TASKS, **kwargs) -> MovieLensDataModule:
    dm = MovieLensDataModule(tasks=tasks, root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup()
    return dm


def whole(dm) -> dict:
    """The three splits concatenated and put back in time order (ties: the loader's row order)."""
    keys = ("user_id", "item_id", "timestamp")
    parts = [dm.splits[s] for s in ("train", "val", "test")]
    out = {k: torch.cat([p[k] for p in parts]) for k in keys}
    out |= {f"label/{t}": torch.cat([p["labels"][t] for p in parts]) for t in dm.tasks}
    out["categorical"] = torch.cat([p["features"]["categorical"] for p in parts])
    out["numeric"] = torch.cat([p["features"]["numeric"] for p in parts])
    out["split"] = torch.cat([torch.full((len(p["user_id"]),), i) for i, p in enumerate(parts)])
    return out


def ratings_in_time_order(lines: dict) -> list[tuple[int, int, int, int]]:
    """(user, movie, stars, timestamp) of ratings.dat, stably sorted by timestamp (ties: file order)."""
    rows = [tuple(int(x) for x in line.split("::")) for line in lines["ratings.dat"]]
    return sorted(rows, key=lambda r: r[3])


@pytest.fixture
def ml(tmp_path):
    lines = movielens_lines()
    return write_movielens(tmp_path / "ml-1m", lines), lines


def test_parses_the_published_format_with_ids_over_the_catalogue(ml, tmp_path):
    root, lines = ml
    dm = module(root, tmp_path)
    spec = dm.feature_spec
    assert spec.id_columns == {"user_id": "user_id", "item_id": "movie_id"}
    # every catalogue user and movie has an id, also the user and the movie without ratings
    assert spec.categorical["user_id"] == len(lines["users.dat"]) + 1
    assert spec.categorical["movie_id"] == len(lines["movies.dat"]) + 1
    assert dm.item_info.num_items == len(lines["movies.dat"])
    raw_users = sorted(int(x.split("::")[0]) for x in lines["users.dat"])
    raw_movies = sorted(int(x.split("::")[0]) for x in lines["movies.dat"])
    assert dm.raw_ids["user_id"].tolist() == raw_users and dm.raw_ids["movie_id"].tolist() == raw_movies
    # rows: the ratings, their raw ids mapped back; labels as in the file
    rows = whole(dm)
    got = sorted(
        zip(
            dm.raw_ids["user_id"][rows["user_id"] - 1].tolist(),
            dm.raw_ids["movie_id"][rows["item_id"] - 1].tolist(),
            rows["label/rating"].long().tolist(),
            rows["timestamp"].tolist(),
            strict=True,
        )
    )
    assert got == sorted(ratings_in_time_order(lines))
    assert torch.equal(rows["label/liked"], (rows["label/rating"] >= 4).float())
    assert rows["categorical"][:, 0].tolist() == rows["user_id"].tolist()  # the id columns are the batch ids
    assert rows["categorical"][:, list(spec.categorical).index("movie_id")].tolist() == rows["item_id"].tolist()
    assert all(dm.splits[s]["labels"]["next_item"].dtype == torch.long for s in dm.splits)
    assert dm.splits["train"]["labels"]["liked"].dtype == torch.float32


def test_latin1_titles_years_and_genres(ml, tmp_path):
    root, lines = ml
    dm = module(root, tmp_path)
    items = dm.catalog.items
    mean, std = dm.numeric_stats["year"]
    # movie id 1 (raw 1): "Misérables, Les (1995)" in latin-1; id 3: "Untitled" (no year -> the training mean)
    assert items["year"][1].item() * std + mean == pytest.approx(1995)
    assert items["year"][3].item() == pytest.approx(0.0)
    assert dm.vocabularies["year_bucket"][items["year_bucket"][1] - 1] == "1990s"
    assert items["year_bucket"][3].item() == 0
    for k, line in enumerate(lines["movies.dat"], start=1):
        genres = line.split("::")[2].split("|")
        assert [GENRES[g] for g in np.flatnonzero([items[c][k].item() for c in GENRE_COLUMNS])] == sorted(
            genres, key=GENRES.index
        )
        assert dm.item_info.category[k].item() == GENRES.index(genres[0]) + 1  # the primary genre
    assert "Children's" in dm.vocabularies["primary_genre"] and "genre_childrens" in NUMERIC


def test_windows_line_ends_blank_lines_and_utf8_option(tmp_path):
    lines = movielens_lines()
    root = tmp_path / "crlf"
    root.mkdir()
    for name, rows in lines.items():
        (root / name).write_bytes(("\r\n".join(rows[:5] + [""] + rows[5:]) + "\r\n").encode("latin-1"))
    a = module(root, tmp_path, cache=False)
    b = module(write_movielens(tmp_path / "utf8", lines, encoding="utf-8"), tmp_path, encoding="utf-8", cache=False)
    assert torch.equal(a.splits["test"]["features"]["numeric"], b.splits["test"]["features"]["numeric"])
    with pytest.raises(DataError, match=r"movies.dat, line 1: not valid utf-8 .* data.encoding=latin-1"):
        module(write_movielens(tmp_path / "latin", lines), tmp_path, encoding="utf-8", cache=False)


def test_next_item_and_next_genre_follow_each_users_ratings_in_time(ml, tmp_path):
    root, lines = ml
    dm = module(root, tmp_path)
    movie_id = {raw: k for k, raw in enumerate(dm.raw_ids["movie_id"].tolist(), start=1)}
    expected = {}  # (raw user, raw movie) -> (next movie id, next primary genre)
    history: dict[int, list[int]] = {}
    for user, movie, _, _ in ratings_in_time_order(lines):
        history.setdefault(user, []).append(movie)
    for user, movies in history.items():
        for a, b in zip(movies, [*movies[1:], None], strict=True):
            expected[user, a] = (0, 0) if b is None else (movie_id[b], int(dm.item_info.category[movie_id[b]]))
    rows = whole(dm)
    for u, i, nxt, genre in zip(
        rows["user_id"].tolist(),
        rows["item_id"].tolist(),
        rows["label/next_item"].tolist(),
        rows["label/next_genre"].tolist(),
        strict=True,
    ):
        key = (int(dm.raw_ids["user_id"][u - 1]), int(dm.raw_ids["movie_id"][i - 1]))
        assert (nxt, genre) == expected[key]
    assert (rows["label/next_item"] == 0).sum() == len(history)  # each user's last rating has none
    assert dm.tasks["next_genre"].num_classes == len(GENRES) + 1


def interest_from(rows, mask, top_k=3):
    """Each user's top-k genres by count over the genre columns of the ``mask`` rows (ties: GENRES order)."""
    genres = rows["numeric"][:, 1:]
    out = {}
    for u in rows["user_id"][mask].unique().tolist():
        counts = genres[mask & (rows["user_id"] == u)].sum(0)
        order = sorted(range(len(GENRES)), key=lambda g: (-counts[g].item(), g))[:top_k]
        out[u] = {g for g in order if counts[g] > 0}
    return out


@pytest.mark.parametrize("split", ["random", "cold_user"])
def test_genre_interest_comes_from_training_rows_only(split, ml, tmp_path):
    root, _ = ml
    dm = module(root, tmp_path, split=split, cold_fraction=0.2)
    rows = whole(dm)
    interest = interest_from(rows, rows["split"] == 0)
    cold = set(rows["user_id"].tolist()) - set(interest)
    assert bool(cold) == (split == "cold_user")
    for u in cold:  # held-out users: ranked on their own rows, which are all val/test
        interest |= interest_from(rows, rows["user_id"] == u)
    genres = rows["numeric"][:, 1:] > 0
    expected = [
        float(any(genres[r, g] for g in interest[u])) for r, u in enumerate(rows["user_id"].tolist())
    ]  # fmt: skip
    assert rows["label/genre_interest"].tolist() == expected
    assert 0 < sum(expected) < len(expected)
    # a top-1 interest is narrower
    narrow = whole(module(root, tmp_path, split=split, cold_fraction=0.2, interest_top_k=1))
    assert narrow["label/genre_interest"].sum() < rows["label/genre_interest"].sum()


def test_vocabularies_are_fitted_on_training_users_and_movies(ml, tmp_path):
    root, lines = ml
    dm = module(root, tmp_path, split="cold_user", cold_fraction=0.3, split_seed=1)
    train_users = set(dm.splits["train"]["user_id"].tolist())
    assert set(dm.splits["test"]["user_id"].tolist()) - train_users  # some users never reach training
    raw = {int(x.split("::")[0]): x.split("::") for x in lines["users.dat"]}
    occupations = {raw[int(dm.raw_ids["user_id"][u - 1])][3] for u in train_users}
    assert dm.vocabularies["occupation"] == sorted(occupations)
    for u in range(1, dm.catalog.num_users + 1):  # every catalogue user, cold or without ratings, is encoded
        value = raw[int(dm.raw_ids["user_id"][u - 1])][3]
        expected = sorted(occupations).index(value) + 1 if value in occupations else 0
        assert dm.catalog.users["occupation"][u].item() == expected
    assert 0 < len(occupations) < 21  # some occupation is unseen in training, so some user gets id 0


@pytest.mark.parametrize("split", ["random", "cold_user", "cold_item", "temporal"])
def test_every_split_mode(split, ml, tmp_path):
    root, lines = ml
    dm = module(root, tmp_path, split=split, cold_fraction=0.2)
    s = dm.splits
    assert sum(len(s[k]["user_id"]) for k in s) == len(lines["ratings.dat"])
    train_users, train_items = set(s["train"]["user_id"].tolist()), set(s["train"]["item_id"].tolist())
    held = {k: (set(s[k]["user_id"].tolist()), set(s[k]["item_id"].tolist())) for k in ("val", "test")}
    if split == "cold_user":
        assert all(users - train_users for users, _ in held.values())
    if split == "cold_item":
        assert all(items - train_items for _, items in held.values())
    if split == "temporal":
        assert s["train"]["timestamp"].max() <= s["val"]["timestamp"].min()
        assert s["val"]["timestamp"].max() <= s["test"]["timestamp"].min()
    for k in s:  # each split stays in time order
        assert torch.all(s[k]["timestamp"][1:] >= s[k]["timestamp"][:-1])


def test_catalog_rows_rebuild_every_rows_features(ml, tmp_path):
    root, _ = ml
    dm = module(root, tmp_path)
    cat = dm.catalog
    assert cat.num_users == dm.feature_spec.categorical["user_id"] - 1
    assert cat.num_items == dm.item_info.num_items
    split = dm.splits["val"]
    for r in range(0, len(split["user_id"]), 7):
        u, i = int(split["user_id"][r]), split["item_id"][r : r + 1]
        f = cat.features(u, i)
        assert torch.equal(f["categorical"][0], split["features"]["categorical"][r])
        assert torch.equal(f["numeric"][0], split["features"]["numeric"][r])
    train = dm.splits["train"]
    assert torch.equal(cat.train_user_id, train["user_id"]) and torch.equal(cat.train_item_id, train["item_id"])
    assert cat.vocabularies["gender"] == {"F": 1, "M": 2}
    assert cat.encode_user({"gender": "F", "age": "25", "occupation": "3", "zip_prefix": "9"})["gender"] == 1


def test_second_setup_loads_the_cache_without_parsing(ml, tmp_path, monkeypatch):
    root, _ = ml
    first = module(root, tmp_path)
    assert len(list((tmp_path / "cache").glob("movielens-*.pt"))) == 1

    def fail(path, *args):
        raise AssertionError(f"parsed {path} although the cache should have been used")

    monkeypatch.setattr(movielens, "read_dat", fail)
    tasks = {"liked": {"kind": "binary"}, "stars": {"kind": "regression", "label": "rating"}}
    second = module(root, tmp_path, tasks=tasks)  # another task list: the same cache entry
    for split in ("train", "val", "test"):
        for key in ("numeric", "categorical"):
            assert torch.equal(first.splits[split]["features"][key], second.splits[split]["features"][key])
        assert torch.equal(first.splits[split]["labels"]["rating"], second.splits[split]["labels"]["stars"])
    assert second.feature_spec == first.feature_spec and second.vocabularies == first.vocabularies
    assert torch.equal(second.item_info.category, first.item_info.category)


def test_a_changed_config_or_file_misses_the_cache(ml, tmp_path, monkeypatch):
    root, lines = ml
    calls = []
    parse = movielens.read_dat
    monkeypatch.setattr(movielens, "read_dat", lambda p, *a: calls.append(p.name) or parse(p, *a))
    module(root, tmp_path)
    module(root, tmp_path)
    assert len(calls) == 3  # three files once, then the cache
    module(root, tmp_path, split="temporal")
    module(root, tmp_path, like_threshold=5)
    assert len(calls) == 9
    write_movielens(root, {"ratings.dat": lines["ratings.dat"][:-1]})  # the same name, other bytes
    module(root, tmp_path)
    assert len(calls) == 12
    module(root, tmp_path, cache=False)
    assert len(calls) == 15
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


def test_missing_file_names_the_path_and_grouplens(tmp_path):
    root = write_movielens(tmp_path / "ml")
    (root / "movies.dat").unlink()
    with pytest.raises(DataError) as e:
        module(root, tmp_path)
    assert str((root / "movies.dat").resolve()) in str(e.value)
    assert "https://grouplens.org/datasets/movielens/1m/" in str(e.value)


@pytest.mark.parametrize(
    "file, line, bad, message",
    [
        ("ratings.dat", 4, "2::1::5", r"ratings.dat, line 4: expected 4 '::'-separated fields .* found 3"),
        ("ratings.dat", 2, "2::1::5::97830::1", r"ratings.dat, line 2: expected 4 .* found 5"),
        ("ratings.dat", 3, "2::one::5::978300000", r"ratings.dat, line 3: MovieID must be an integer, got 'one'"),
        ("ratings.dat", 5, "2::1::x::978300000", r"ratings.dat, line 5: Rating must be a number"),
        ("ratings.dat", 6, "2::2::5::978300000", r"ratings.dat, line 6: MovieID 2 is not in .*movies.dat"),
        ("ratings.dat", 1, "4::1::5::978300000", r"ratings.dat, line 1: UserID 4 is not in .*users.dat"),
        ("movies.dat", 2, "1000::Movie (1990)::Comedy|Cartoon", r"movies.dat, line 2: unknown genre 'Cartoon'"),
        ("users.dat", 3, "2::F::25::3::55455", r"users.dat, line 3: UserID 2 appears a second time"),
    ],
)
def test_malformed_lines_name_the_file_and_the_line(file, line, bad, message, tmp_path):
    lines = movielens_lines()
    lines[file] = [*lines[file][: line - 1], bad, *lines[file][line - 1 :]]
    with pytest.raises(DataError, match=message):
        module(write_movielens(tmp_path / "ml", lines), tmp_path)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no signal 'watch_time'; available signals: \['rating', 'liked'"):
        MovieLensDataModule(tasks={"watch_time": {"kind": "regression"}})
    with pytest.raises(ConfigError, match="signal 'rating' trains a task of kind regression, got kind 'binary'"):
        MovieLensDataModule(tasks={"rating": {"kind": "binary"}})
    with pytest.raises(ConfigError, match="next_genre has 19 classes"):
        MovieLensDataModule(tasks={"next_genre": {"kind": "multiclass", "num_classes": 5}})
    with pytest.raises(ConfigError, match="data.split must be one of"):
        MovieLensDataModule(split="by_user")
    with pytest.raises(ConfigError, match="interest_top_k"):
        MovieLensDataModule(interest_top_k=0)
    with pytest.raises(ConfigError, match="like_threshold"):
        MovieLensDataModule(like_threshold=6)


def test_trains_end_to_end_with_every_signal_on_a_cold_user_split(train_run, tmp_path):
    root = write_movielens(tmp_path / "ml")
    train_run(
        "data=movielens",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "+data.tasks.next_genre={kind: multiclass}",  # the other four are the defaults
        "data.split=cold_user",
        "data.cold_fraction=0.2",
        "data.batch_size=64",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        metrics=("test/rating/mse", "test/liked/auroc", "test/genre_interest/auroc", "test/next_item/ndcg_10",
                 "test/next_genre/accuracy", "train/loss/next_item"),
    )  # fmt: skip
