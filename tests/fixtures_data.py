"""Writers of fixture files in the real formats of the file-backed datasets (Census-Income, tabular CSV/Parquet,
MovieLens-1M, KuaiRand), small enough for tests; imported by tests/conftest.py's fixtures and by the tests that
vary the files."""

from __future__ import annotations

import bz2
import gzip
from pathlib import Path

# One real row of census-income.test (42 fields); census_row() varies the fields the tests look at.
_CENSUS_LINE = (
    "38, Private, 6, 36, 1st 2nd 3rd or 4th grade, 0, Not in universe, Married-civilian spouse present, "
    "Manufacturing-durable goods, Machine operators assmblrs & inspctrs, White, Mexican (Mexicano), Female, "
    "Not in universe, Not in universe, Full-time schedules, 0, 0, 0, Joint one under 65 & one 65+, Not in universe, "
    "Not in universe, Spouse of householder, Spouse of householder, 1032.38, ?, ?, ?, "
    "Not in universe under 1 year old, ?, 4, Not in universe, Mexico, Mexico, Mexico, "
    "Foreign born- Not a citizen of U S , 0, Not in universe, 2, 12, 95, - 50000."
)
CENSUS_TEMPLATE = _CENSUS_LINE.split(", ")
CENSUS_EDUCATION = ("High school graduate", "Bachelors degree(BA AB BS)", "Children", "Doctorate degree(PhD EdD)")
CENSUS_MARITAL = ("Never married", "Married-civilian spouse present", "Divorced")
CENSUS_WORKER = ("Private", "Self-employed-incorporated", "Local government")


def census_row(i: int, **fields: str) -> list[str]:
    """Row ``i`` of a generated UCI-format file: both labels, a "?" every 5th state, distinct ages."""
    from mtl_experiments.data.census_income import COLUMNS

    row = dict(zip(COLUMNS, CENSUS_TEMPLATE, strict=True))
    row.update(
        age=str(18 + i),
        wage_per_hour=str((37 * i) % 101),
        education=CENSUS_EDUCATION[i % 4],
        marital_stat=CENSUS_MARITAL[i % 3],
        class_worker=CENSUS_WORKER[i % 3],
        state_prev_res="?" if i % 5 == 0 else ("California", "Utah")[i % 2],
        income_50k="50000+." if i % 4 in (1, 2) else "- 50000.",
    )
    row.update(fields)
    return [row[c] for c in COLUMNS]


def write_census_files(root: Path, train_rows, test_rows, suffix: str = "") -> Path:
    """census-income.data / .test in the UCI format (", "-separated, no header), plain, .gz or .bz2."""
    root.mkdir(parents=True, exist_ok=True)
    opener = {"": open, ".gz": gzip.open, ".bz2": bz2.open}[suffix]
    for name, rows in (("census-income.data", train_rows), ("census-income.test", test_rows)):
        with opener(root / f"{name}{suffix}", "wt") as f:
            f.writelines(", ".join(r) + "\n" for r in rows)
    return root


def tabular_frame(rows: int = 300, seed: int = 0):
    """A small interaction table with learnable labels: ids, two text columns (with missing values), two numeric
    columns (a missing age every 10th row), a binary ``click`` and a real ``watch_seconds``."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    city = rng.choice(["Berlin", "Paris", "Rome", "Oslo"], rows)
    age = rng.integers(18, 70, rows).astype(float)
    price = rng.gamma(2.0, 10.0, rows).round(2)
    score = (city == "Paris") * 1.5 - (age - 40) / 10 + rng.normal(0, 0.5, rows)
    frame = pd.DataFrame(
        {
            "user": [f"u{i}" for i in rng.integers(0, 40, rows)],
            "item": rng.integers(1000, 1030, rows),
            "city": city,
            "device": np.where(np.arange(rows) % 7 == 0, None, rng.choice(["ios", "android"], rows)),
            "age": np.where(np.arange(rows) % 10 == 0, np.nan, age),
            "price": price,
            "click": (score > 0).astype(int),
            "watch_seconds": np.round(np.exp(2 + score / 2) + rng.normal(0, 0.1, rows), 3),
        }
    )
    return frame


def write_tabular_file(path: Path, frame=None) -> Path:
    """``frame`` (default ``tabular_frame()``) as CSV/TSV or Parquet, by ``path``'s extension."""
    frame = tabular_frame() if frame is None else frame
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if ".tsv" in path.suffixes else ",")
    return path


# ---- MovieLens-1M and KuaiRand, in their published file formats ---------------------------------------------

ML_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def movielens_lines(num_users: int = 30, num_movies: int = 40, per_user: int = 15, seed: int = 0) -> dict:
    """``{file name: [lines]}`` of a small ml-1m folder: raw ids with gaps (user 3u+2, movie 2k+1), a latin-1
    title, a title without a year, a user and a movie without ratings, equal timestamps, and ratings that
    follow a per-user favourite genre (so ``liked`` is learnable)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    movies, primary = [], []
    for k in range(num_movies):
        title = {0: "Misérables, Les (1995)", 1: "City of Lost Children, The (1995)", 2: "Untitled"}.get(
            k, f"Movie {k} ({1950 + (7 * k) % 50})"
        )
        genres = [ML_GENRES[k % len(ML_GENRES)]]
        if k % 3:
            genres.append(ML_GENRES[(5 * k + 3) % len(ML_GENRES)])
        genres = list(dict.fromkeys(genres))
        primary.append(genres[0])
        movies.append(f"{2 * k + 1}::{title}::{'|'.join(genres)}")
    users, ratings = [], []
    for u in range(num_users):
        zip_code = "98107-2117" if u == 1 else f"{(37 * u) % 10}{1000 + u}"
        users.append(f"{3 * u + 2}::{'MF'[u % 2]}::{(1, 18, 25, 35, 45, 50, 56)[u % 7]}::{u % 21}::{zip_code}")
        if u == num_users - 1:
            continue  # a user without ratings: in the catalogue only
        favourite = {primary[j] for j in rng.choice(num_movies - 1, 3, replace=False)}
        for j, k in enumerate(rng.choice(num_movies - 1, per_user, replace=False)):  # the last movie: no ratings
            stars = int(np.clip(round(2.5 + 2 * (primary[k] in favourite) + rng.normal(0, 0.7)), 1, 5))
            ratings.append(f"{3 * u + 2}::{2 * k + 1}::{stars}::{978300000 + 1000 * u + 10 * (j // 2)}")
    rng.shuffle(ratings)  # the file is not in time order
    return {"users.dat": users, "movies.dat": movies, "ratings.dat": ratings}


def write_movielens(root: Path, lines: dict | None = None, encoding: str = "latin-1") -> Path:
    """The ml-1m files (``::``-separated, ISO-8859-1 like the originals) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (lines or movielens_lines()).items():
        (root / name).write_bytes("".join(f"{r}\n" for r in rows).encode(encoding))
    return root


KUAIRAND_LOG_COLUMNS = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time",
    "is_profile_enter", "is_rand", "tab",
)  # fmt: skip


def kuairand_frames(num_users: int = 25, num_videos: int = 40, rows: int = 1200, seed: int = 0) -> dict:
    """``{file name: DataFrame}`` of a small KuaiRand-Pure data folder with every column of the published files:
    two standard logs and a random one, the user features (one user without logs, missing onehot values) and the
    basic video features (one video without logs, one without a duration, comma-separated tags). Clicks follow
    a user-video match, so ``click`` is learnable."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    user_raw, video_raw = np.arange(num_users), 100 + 3 * np.arange(num_videos)
    taste, appeal = rng.normal(size=num_users), rng.normal(size=num_videos)
    durations = rng.integers(5_000, 120_000, num_videos)

    def log(n: int, start_ms: int, day: int, rand: int) -> pd.DataFrame:
        u = rng.integers(0, num_users - 1, n)  # the last user has no logs
        v = rng.integers(0, num_videos - 1, n)  # nor the last video
        click = (taste[u] * appeal[v] + rng.normal(0, 0.5, n) > 0).astype(int)
        play = np.where(click == 1, rng.uniform(0.3, 1.5, n) * durations[v], rng.uniform(0, 2000, n)).astype(int)
        t = np.sort(start_ms + rng.integers(0, 86_400_000 * 3, n))
        t[1] = t[0]  # equal timestamps
        minute = (t // 60_000) % 1440
        return pd.DataFrame(
            {
                "user_id": user_raw[u], "video_id": video_raw[v], "date": day + (t - start_ms) // 86_400_000,
                "hourmin": (minute // 60) * 100 + minute % 60, "time_ms": t, "is_click": click,
                "is_like": click * (rng.random(n) < 0.3), "is_follow": click * (rng.random(n) < 0.1),
                "is_comment": click * (rng.random(n) < 0.1), "is_forward": click * (rng.random(n) < 0.1),
                "is_hate": (1 - click) * (rng.random(n) < 0.05),
                "long_view": (play >= np.minimum(durations[v], 18_000)).astype(int), "play_time_ms": play,
                "duration_ms": durations[v], "profile_stay_time": 0, "comment_stay_time": 0,
                "is_profile_enter": click * (rng.random(n) < 0.1), "is_rand": rand, "tab": rng.integers(0, 15, n),
            },
            columns=list(KUAIRAND_LOG_COLUMNS),
        )  # fmt: skip

    ranges = ("0", "(0,10]", "(10,50]", "(50,100]")
    users = pd.DataFrame(
        {
            "user_id": user_raw,
            "user_active_degree": rng.choice(["high_active", "full_active", "middle_active", "UNKNOWN"], num_users),
            "is_lowactive_period": rng.integers(0, 2, num_users), "is_live_streamer": rng.integers(0, 2, num_users),
            "is_video_author": rng.integers(0, 2, num_users), "follow_user_num": rng.integers(0, 100, num_users),
            "follow_user_num_range": rng.choice(ranges, num_users), "fans_user_num": rng.integers(0, 9, num_users),
            "fans_user_num_range": rng.choice(["0", "[1,10)"], num_users), "friend_user_num": 0,
            "friend_user_num_range": "0", "register_days": rng.integers(15, 900, num_users),
            "register_days_range": rng.choice(["15-30", "31-60", "730+"], num_users),
            **{f"onehot_feat{k}": rng.integers(0, 3, num_users) for k in range(18)},
        }
    )  # fmt: skip
    users["onehot_feat3"] = users["onehot_feat3"].astype("Int64").mask(users.index % 4 == 0)  # empty fields
    videos = pd.DataFrame(
        {
            "video_id": video_raw, "author_id": rng.integers(0, 10, num_videos),
            "video_type": rng.choice(["NORMAL", "AD"], num_videos, p=[0.9, 0.1]), "upload_dt": "2022-03-01",
            "upload_type": rng.choice(["ShortImport", "LongImport", "Web"], num_videos), "visible_status": "public",
            "video_duration": durations.astype(float), "server_width": 720, "server_height": 1280,
            "music_id": rng.integers(0, 10**9, num_videos), "music_type": rng.integers(0, 5, num_videos),
            "tag": [",".join(str(t) for t in rng.choice(30, 1 + k % 3, replace=False)) for k in range(num_videos)],
        }
    )  # fmt: skip
    videos.loc[3, "video_duration"] = np.nan
    first, second = rows // 2, rows - rows // 2
    return {
        "log_standard_4_08_to_4_21_pure.csv": log(first, 1_649_376_000_000, 20220408, 0),
        "log_standard_4_22_to_5_08_pure.csv": log(second, 1_650_585_600_000, 20220422, 0),
        "log_random_4_22_to_5_08_pure.csv": log(rows // 4, 1_650_585_600_000, 20220422, 1),
        "user_features_pure.csv": users,
        "video_features_basic_pure.csv": videos,
    }


def write_kuairand(root: Path, frames: dict | None = None) -> Path:
    """The KuaiRand CSV files (header, ',' separated, quoted where a value has a comma) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, frame in (frames or kuairand_frames()).items():
        frame.to_csv(root / name, index=False)
    return root
