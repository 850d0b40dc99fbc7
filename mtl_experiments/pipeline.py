"""``train(cfg)``: seed -> data -> model -> module -> loggers/callbacks -> trainer.fit -> trainer.test.

Everything that can be checked is checked *before* an MLflow run exists (config values, data, the
optimized metric, the tracking store), so bad input costs seconds and leaves no half-written run; once a
run exists, any exception ends it as FAILED (KILLED for Ctrl-C) instead of leaving it RUNNING.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from mtl_experiments import plots, tracking
from mtl_experiments.errors import ConfigError, MTLError
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import metric_directions
from mtl_experiments.tasks import Task

log = logging.getLogger(__name__)


def hydra_context(cfg: DictConfig) -> tuple[dict[str, str], list[str]]:
    """Hydra's chosen config options and the command-line overrides of this run."""
    if HydraConfig.initialized():
        hc = HydraConfig.get()
    elif "hydra" in cfg:
        hc = cfg.hydra
    else:
        return {}, []
    return ({str(k): v for k, v in hc.runtime.choices.items()}, list(hc.overrides.task))


def build(cfg: DictConfig, key: str, **runtime: Any) -> Any:
    """``instantiate(cfg[key])``, then called with ``runtime`` objects (which Hydra must not convert).

    A failure becomes one ConfigError naming the config key (Hydra would wrap our own errors in an
    InstantiationException and a typo'd option in a TypeError deep in a traceback).
    """
    node = cfg.get(key) if "." not in key else OmegaConf.select(cfg, key)
    try:
        if runtime:
            return instantiate(node, _partial_=True, _convert_="all")(**runtime)
        return instantiate(node, _convert_="all")
    except MTLError:
        raise
    except InstantiationException as e:
        if isinstance(e.__cause__, MTLError):
            raise e.__cause__ from None
        raise ConfigError(f"Invalid config '{key}': {e}") from e
    except TypeError as e:
        raise ConfigError(f"Invalid config '{key}': {e}") from e


def resolve_optimized_metric(cfg: DictConfig, tasks: Mapping[str, Task]) -> str:
    """Checks ``optimized_metric`` is logged by this run and derives its direction ("max"/"min")."""
    directions = metric_directions(tasks)
    metric = cfg.optimized_metric
    if metric not in directions:
        raise ConfigError(
            f"optimized_metric={metric!r} is not logged by this run; choose one of "
            f"{sorted(directions)} (validation metrics only: never select on test)."
        )
    mode = "max" if directions[metric] else "min"
    if cfg.get("optimized_mode", "auto") not in ("auto", mode):
        raise ConfigError(
            f"optimized_mode={cfg.optimized_mode!r} contradicts {metric}, for which "
            f"{'higher' if mode == 'max' else 'lower'} is better; leave optimized_mode=auto."
        )
    with open_dict(cfg):
        cfg.optimized_mode = mode
    return mode


def _build_loggers(cfg: DictConfig, choices: dict[str, str], overrides: list[str]) -> list:
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None:
            continue
        factory = instantiate(logger_cfg, _partial_=True, _convert_="all")
        if isinstance(factory.func, type) and issubclass(factory.func, MLFlowLogger):
            uri = tracking.resolve_tracking_uri(factory.keywords.get("tracking_uri"))
            tracking.check_tracking_uri(uri)
            tracking.ensure_experiment(uri, factory.keywords.get("experiment_name") or cfg.experiment_name)
            tags = {
                **tracking.run_tags(choices, overrides, loss=cfg.get("loss")),
                **tracking.sweep_tags(),  # a job of a multirun: the child of the sweep's parent run
                **(factory.keywords.get("tags") or {}),
            }
            run_name = factory.keywords.get("run_name") or "-".join(
                [str(choices.get(g, "?")) for g in ("data", "backbone", "loss")] + [f"seed{cfg.seed}"]
            )
            loggers.append(factory(tracking_uri=uri, tags=tags, run_name=run_name))
        else:
            loggers.append(factory())
    return loggers


def print_results(results: Mapping[str, float], tasks: Mapping[str, Task], stage: str = "test") -> None:
    """A task x metric table of the final metrics."""
    columns: list[str] = []
    for task in tasks.values():
        columns += [m for m in task.metrics() if m not in columns]
    table = Table(title=f"{stage} metrics (best checkpoint by validation)")
    table.add_column("task")
    for col in columns:
        table.add_column(col, justify="right")
    for name in tasks:
        row = [results.get(f"{stage}/{name}/{col}") for col in columns]
        table.add_row(name, *["" if v is None else f"{float(v):.4f}" for v in row])
    Console().print(table)


def build_model(cfg: DictConfig, datamodule) -> MultiTaskModel:
    """features -> backbone -> heads, sized from the set-up datamodule's feature spec and tasks."""
    encoder = build(cfg, "features", spec=datamodule.feature_spec)
    backbone = build(cfg, "backbone", input_dim=encoder.output_dim, task_names=list(datamodule.tasks))
    return MultiTaskModel(encoder, backbone, datamodule.tasks)


def build_module(cfg: DictConfig, datamodule, model: MultiTaskModel):
    """The LightningModule: model, tasks, weighting, optimizer and scheduler from the config."""
    return build(
        cfg,
        "module",
        model=model,
        tasks=datamodule.tasks,
        weighting=build(cfg, "loss"),
        optimizer=build(cfg, "optimizer"),
        scheduler=build(cfg, "scheduler") if cfg.get("scheduler") else None,
    )


def train(cfg: DictConfig) -> float | None:
    """Train and test one configuration; returns the best value of ``cfg.optimized_metric``."""
    choices, overrides = hydra_context(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    # 1. build and validate everything (no run exists yet, so a bad value leaves nothing behind)
    datamodule = build(cfg, "data")
    tasks = datamodule.tasks
    resolve_optimized_metric(cfg, tasks)  # before anything reads ${optimized_mode}
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    datamodule.setup()  # generate / load now: a missing file or a bad label fails here, in seconds
    module = build_module(cfg, datamodule, build_model(cfg, datamodule))
    callbacks = [build(cfg, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c]
    loggers = _build_loggers(run_cfg, choices, overrides)
    trainer: pl.Trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers or False)

    # 2. train, tracked; a run that raises ends FAILED
    mlflow_logger = next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None)
    try:
        if mlflow_logger is not None:
            mlflow_logger.log_hyperparams(tracking.flatten(run_cfg))
            tracking.log_config_artifacts(mlflow_logger, run_cfg, overrides)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if mlflow_logger is not None:
            plots.log_run_artifacts(mlflow_logger, module)
        ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        best_path = ckpt.best_model_path if ckpt is not None else ""
        if not best_path:
            log.warning("No best checkpoint was saved; testing the final weights.")
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)[0]
        best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
        summary: dict[str, Any] = {}
        if best is not None:
            summary[f"best/{cfg.optimized_metric}"] = best
        if mlflow_logger is not None and summary:
            mlflow_logger.log_metrics(summary)
        print_results(results, tasks)
        return best
    except BaseException as e:
        tracking.mark_failed(mlflow_logger, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
