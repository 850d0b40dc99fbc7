"""Config, data, models and trainers for the measurements, built the way ``pipeline.train`` builds them.

Each model is freshly built with the run's seed, so every contender starts from identical weights. The
Lightning contenders train on a bare CPU ``Trainer``: no logger, checkpointing, progress bar, model summary
or validation, so only training is timed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from mtl_experiments import pipeline
from mtl_experiments.bench.timing import Seconds, StepTimer, Stopwatch
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()  # callable from a process that composed before (tests, notebooks)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def load_data(cfg: DictConfig) -> TabularDataModule:
    """The configured datamodule, set up (its splits in memory)."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    return datamodule


def build_model(cfg: DictConfig, datamodule: TabularDataModule) -> MultiTaskModel:
    """A fresh model seeded with ``cfg.seed``: every call returns the same initial weights."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return pipeline.build_model(cfg, datamodule)


def build_module(cfg: DictConfig, datamodule: TabularDataModule) -> MTLModule:
    return pipeline.build_module(cfg, datamodule, build_model(cfg, datamodule))


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # the same parameter groups as MTLModule.configure_optimizers (a loss-level weighting adds none)
    return instantiate(cfg.optimizer, _convert_="all")([{"params": list(model.parameters())}])


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bare_trainer(epochs: int, callbacks=(), log_every_n_steps: int = 50, **limits) -> pl.Trainer:
    """A CPU Trainer that only trains: no logger, checkpoints, progress bar, summary or validation (``limits``:
    more Trainer arguments, e.g. ``limit_train_batches``)."""
    return pl.Trainer(
        **limits,
        callbacks=list(callbacks),
        max_epochs=epochs,
        log_every_n_steps=log_every_n_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )


def lightning_fit(
    cfg: DictConfig, datamodule: TabularDataModule, epochs: int, callbacks=(), log_every_n_steps: int = 50
) -> Seconds:
    """Seconds of ``Trainer.fit`` alone for a freshly built ``MTLModule`` (wall; ``.cpu``: process CPU)."""
    module = build_module(cfg, datamodule)
    trainer = bare_trainer(epochs, callbacks, log_every_n_steps)
    clock = Stopwatch()
    trainer.fit(module, datamodule=datamodule)
    return clock.elapsed()


def step_ms(cfg: DictConfig, datamodule: TabularDataModule, epochs: int, log_every_n_steps: int = 50) -> float:
    """Milliseconds per training step (``StepTimer``) of a freshly built module trained ``epochs`` epochs."""
    timer = StepTimer()
    lightning_fit(cfg, datamodule, epochs, callbacks=[timer], log_every_n_steps=log_every_n_steps)
    return timer.ms_per_step


def with_module_option(cfg: DictConfig, key: str, value) -> DictConfig:
    """A copy of ``cfg`` with ``module.<key> = value``."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.module[key] = value
    return cfg


def with_conflict(cfg: DictConfig, every_n_steps: int) -> DictConfig:
    """A copy of ``cfg`` measuring the conflict metrics every ``every_n_steps`` steps (0: never, no affinity)."""
    conflict = {**(cfg.module.get("conflict") or {}), "every_n_steps": every_n_steps}
    if every_n_steps == 0:
        conflict["affinity_every_n_steps"] = 0
    return with_module_option(cfg, "conflict", conflict)
