"""Shared fixtures: compose the real config (conf/) on tiny data, with a temporary MLflow store."""

from __future__ import annotations

import bz2
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (addopts: -n auto) every worker is a process with torch's default of one thread per core:
# the workers would fight over the cores. Each takes its share, and so do the processes tests start (train.py,
# DDP ranks, mlflow server) through OMP_NUM_THREADS, unless the caller set it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
CONF = ROOT / "conf"

# Small enough for seconds per run, large enough that AUROC is meaningful.
TINY = [
    "data.num_samples=2000",
    "data.input_dim=8",
    "data.batch_size=64",
    "trainer.max_epochs=3",
    "trainer.log_every_n_steps=5",
    "trainer.enable_model_summary=false",
    "~callbacks.progress_bar",
]


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


@pytest.fixture
def census_root(tmp_path: Path) -> Path:
    """A small Census-Income folder (80 train rows, 40 test rows) in the UCI format."""
    return write_census_files(
        tmp_path / "census", [census_row(i) for i in range(80)], [census_row(i) for i in range(80, 120)]
    )


def options(group: str) -> list[str]:
    """Every option of a config group: parametrizing over these enrolls a new YAML file automatically."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def backbone_task_names(name: str, default: list[str]) -> list[str]:
    """The task names to build ``conf/backbone/<name>.yaml`` with in contract tests: the ones it requires
    given its options (``Backbone.required_tasks``, e.g. ESMM's CTR and CTCVR tasks), else ``default``."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(OmegaConf.load(CONF / "backbone" / f"{name}.yaml"))
    required = get_class(options.pop("_target_")).required_tasks(**options)
    return list(default) if required is None else list(required)


def compose_cfg(overrides: list[str] | tuple[str, ...] = (), output_dir: Path | None = None) -> DictConfig:
    """The config ``python train.py <overrides>`` would run, with Hydra's runtime context set."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or Path.cwd())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def bare_trainer(**kwargs):
    """A CPU Lightning Trainer with no logger, checkpoints, progress bar, summary or validation."""
    import lightning.pytorch as pl

    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    return pl.Trainer(**{**defaults, **kwargs})


def load_weighting(name: str, tasks=None, **overrides):
    """``conf/loss/<name>.yaml`` (+ overrides) instantiated under a root with ``seed: 0`` (so ``${seed}``
    resolves as in conf/train.yaml) and set up for ``tasks``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = OmegaConf.merge({"seed": 0, "loss": OmegaConf.load(CONF / "loss" / f"{name}.yaml")}, {"loss": overrides})
    weighting = instantiate(root.loss, _convert_="all")
    if tasks is not None:
        weighting.setup(tasks)
    return weighting


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_cfg(tmp_path: Path, tracking_uri: str):
    """``make_cfg(*overrides)``: tiny data, temporary tracking store and output directory."""

    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        base = [*TINY] if tiny else []
        return compose_cfg([*base, f"logger.mlflow.tracking_uri={tracking_uri}", *overrides], tmp_path / "out")

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def mlflow_runs(tracking_uri: str):
    """``mlflow_runs()`` -> every run in the temporary store (all experiments)."""

    def runs():
        client = MlflowClient(tracking_uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(exps) if exps else []

    return runs


@pytest.fixture
def train_run(make_cfg, mlflow_runs):
    """``train_run(*overrides, metrics=())``: trains ``train.py <overrides>`` (not TINY: the overrides name the data
    and the epochs) without model summary or progress bar, asserts that it tracked one FINISHED run that logged
    each of ``metrics``, and returns that run."""
    from mtl_experiments.pipeline import train

    def run(*overrides: str, metrics: Sequence[str] = ()):
        train(make_cfg(*overrides, "trainer.enable_model_summary=false", "~callbacks.progress_bar", tiny=False))
        (tracked,) = mlflow_runs()
        assert tracked.info.status == "FINISHED"
        for key in metrics:
            assert key in tracked.data.metrics, (key, sorted(tracked.data.metrics))
        return tracked

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1:``port`` over one SQLite file in ``folder``; can be killed and
    started again (the fault tests do), its stderr in ``folder/server.log`` for the start-up error."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port, self.uri, self.proc = folder, port, f"http://127.0.0.1:{port}", None

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}"]
        cmd += ["--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"]
        with open(self.folder / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    tail = (self.folder / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {tail}") from None
                time.sleep(0.5)

    def stop(self, graceful: bool = False) -> None:
        """SIGTERM first when ``graceful`` (then SIGKILL after 20 s), else SIGKILL: a crash, as the fault tests need."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact root; stopped afterwards."""
    server = MlflowServer(tmp_path, free_port()).start()
    try:
        yield server.uri
    finally:
        server.stop(graceful=True)


# ---- recsys_synthetic and tabular datasets --------------------------------------------------------

# conf/data/recsys_synthetic.yaml at a size that trains in about a second
RECSYS_TINY = [
    "data.num_users=200",
    "data.num_items=100",
    "data.num_interactions=3000",
    "data.latent_dim=4",
    "data.num_categories=5",
    "data.content_dim=8",
    "data.batch_size=64",
]
# the columns of write_tabular_file's table, as data=tabular overrides
TABULAR_CONFIG = [
    "data.categorical=[city,device]",
    "data.numeric=[age,price]",
    "data.id_columns={user_id: user, item_id: item}",
    "data.tasks={click: {kind: binary}, watch: {kind: regression, label: watch_seconds}}",
]


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


@pytest.fixture
def tabular_csv(tmp_path: Path) -> Path:
    return write_tabular_file(tmp_path / "tabular" / "interactions.csv")


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


@pytest.fixture
def tiny_data(request, tmp_path: Path):
    """``tiny_data(name)`` -> overrides that train ``conf/data/<name>.yaml`` in seconds (``make_cfg(...,
    tiny=False)``: TINY's keys are the synthetic dataset's), writing fixture files in the real format where the
    dataset reads files."""

    def overrides(name: str) -> list[str]:
        if name == "synthetic":
            return list(TINY[:3])
        if name == "census_income":
            root = request.getfixturevalue("census_root")
            return [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=16"]
        if name == "recsys_synthetic":
            return [*RECSYS_TINY, f"data.cache_dir={tmp_path / 'cache'}"]
        if name == "tabular":
            return [f"data.path={request.getfixturevalue('tabular_csv')}", *TABULAR_CONFIG, "data.batch_size=32"]
        if name == "movielens":
            root = write_movielens(tmp_path / "ml-1m")
            return [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=64"]
        if name == "kuairand":
            root = write_kuairand(tmp_path / "kuairand")
            return [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=64"]
        raise KeyError(f"tests/conftest.py:tiny_data has no tiny overrides for data={name}; add them there.")

    return overrides
