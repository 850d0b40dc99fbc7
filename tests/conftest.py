"""Shared fixtures: compose the real config (conf/) on tiny data, with a temporary MLflow store."""

from __future__ import annotations

import contextlib
import os
import shutil
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

from tests.fixtures_data import census_row, write_census_files, write_kuairand, write_movielens, write_tabular_file

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


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema and nothing else, made once per test process. MLflow creates a
    store's schema by running its ~60 migrations (2-15 s on 2 cores, in nearly every test that trains); a copy of
    the resulting file is opened in milliseconds and is the same store (tests of store creation make their own).
    Made inside its own folder, so the Default experiment's artifact location is there too."""
    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    with contextlib.chdir(path.parent):
        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_store(empty: Path, target: Path) -> str:
    """``target`` as a copy of the ``empty_store`` fixture's store; its ``sqlite:///`` URI."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty, target)
    return f"sqlite:///{target}"


@pytest.fixture
def tracking_uri(tmp_path: Path, empty_store: Path) -> str:
    return fresh_store(empty_store, tmp_path / "mlflow.db")


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


@pytest.fixture
def tabular_csv(tmp_path: Path) -> Path:
    return write_tabular_file(tmp_path / "tabular" / "interactions.csv")


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
        if name == "stream":  # a recsys_synthetic log as Parquet shards (scripts/make_log.py)
            from scripts.make_log import write_log

            write_log(tmp_path / "stream-log", rows=1500, shards=3, row_group=256, num_users=100, num_items=50,
                      latent_dim=4)  # fmt: skip
            return [f"data.path={tmp_path / 'stream-log'}", "data.batch_size=64", "data.shuffle_buffer=300"]
        if name == "kuairand":
            root = write_kuairand(tmp_path / "kuairand")
            return [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=64"]
        raise KeyError(f"tests/conftest.py:tiny_data has no tiny overrides for data={name}; add them there.")

    return overrides
