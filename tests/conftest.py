"""Shared fixtures: compose the real config (conf/) on tiny data, with a temporary MLflow store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
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


def options(group: str) -> list[str]:
    """Every option of a config group: parametrizing over these enrolls a new YAML file automatically."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store and artifact root; stopped afterwards."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
