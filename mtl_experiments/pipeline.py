"""``train(cfg)``: seed -> data -> model -> module -> loggers/callbacks -> trainer.fit -> trainer.test.

Everything that can be checked is checked *before* an MLflow run exists (the tracking store and the
``resume=`` target first, before any data is loaded; then config values, data, the optimized metric),
so bad input costs seconds and leaves no half-written run; once a run exists, any exception ends it as
FAILED (KILLED for Ctrl-C) instead of leaving it RUNNING. ``resume=<run id | checkpoint>`` continues a
killed run from its last checkpoint into the same MLflow run (mtl_experiments/checkpoints.py).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from mtl_experiments import checkpoints, outputs, plots, safe_config, schema, selection, summary_names, tracking
from mtl_experiments import resume as resume_lib
from mtl_experiments.console import config_line, print_line, print_run_end, quiet_libraries
from mtl_experiments.errors import ConfigError, MTLError
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import metric_directions
from mtl_experiments.scrub import scrub, scrub_yaml
from mtl_experiments.tasks import Task


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


def print_results(
    results: Mapping[str, float],
    tasks: Mapping[str, Task],
    stage: str = "test",
    segments: tuple[str, ...] = (),
    title: str = "best checkpoint by validation",
) -> None:
    """A task x metric table of the final metrics; a row per task and evaluation segment (warm, cold_user, ...)."""
    columns: list[str] = []
    for task in tasks.values():
        columns += [m for m in task.metrics() if m not in columns]
    table = Table(title=f"{stage} metrics ({title})")
    table.add_column("task")
    for col in columns:
        table.add_column(col, justify="right")
    for prefix, label in [(f"{stage}/", ""), *((f"{stage}/{s}/", f" ({s})") for s in segments)]:
        for name in tasks:
            row = [results.get(f"{prefix}{name}/{col}") for col in columns]
            if any(v is not None for v in row):
                table.add_row(name + label, *["" if v is None else f"{float(v):.4f}" for v in row])
    Console().print(table)


def build_model(cfg: DictConfig, datamodule) -> MultiTaskModel:
    """features -> backbone -> heads, sized from the set-up datamodule's feature spec and tasks."""
    # a dataset that writes item content vectors offers them as the default for features.new_items=pretrained
    encoder = build(
        cfg,
        "features",
        spec=datamodule.feature_spec,
        default_item_vectors=getattr(datamodule, "content_vectors_path", None),
    )
    encoder.set_seen(datamodule.seen_ids())  # ids never seen in training get the new-user / new-item representation
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
        segments=datamodule.segments,
    )


def train(cfg: DictConfig) -> float | None:
    """Train and test one configuration; returns the best value of ``cfg.optimized_metric``.

    In pipeline order: start-up checks (strategy, writable folders, tracking store, ``resume=`` target) -> data
    -> model and module -> callbacks -> inside ``tracking.run``: trainer, the MLflow run, fit, test, summary."""
    quiet_libraries()  # known library warnings and info lines, each by its message
    choices, overrides = hydra_context(cfg)
    output_dir = Path(OmegaConf.select(cfg, "paths.output_dir", default=None) or tempfile.mkdtemp(prefix="mtl-"))
    check_startup(cfg, output_dir)  # first: seed=abc is a config error, not Lightning's ValueError
    pl.seed_everything(cfg.seed, workers=True)
    resume = resolve_resume(cfg, output_dir)
    datamodule = build(cfg, "data")
    # generate / load now: a missing file or a bad label fails here, in seconds; and what the data holds decides
    # some metric names (val/<task>/gauc needs user ids), so the optimized metric is checked after it
    datamodule.setup()
    resolve_optimized_metric(cfg, datamodule.tasks)  # before anything reads ${optimized_mode}
    if rank_zero_only.rank == 0:
        print_line(config_line(output_dir, choices, overrides, cfg.optimized_metric, cfg.optimized_mode))
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    params = tracking.flatten(run_cfg)
    changed = resume.check(params) if resume is not None else {}
    module = build_module(cfg, datamodule, build_model(cfg, datamodule))
    describe_checkpoints(module, run_cfg, params, choices, overrides)
    callbacks = build_callbacks(cfg, resume, datamodule.tasks)
    last = next((c for c in callbacks if isinstance(c, checkpoints.LastCheckpoint)), None)
    checkpoint_dir = last.dirpath if last is not None else None
    with tracking.run(run_cfg, choices, overrides, resume, checkpoint_dir, output_dir / "mlflow_fallback") as run:
        trainer = build_trainer(cfg, callbacks, run.loggers, module)
        run.start(params, run_cfg, overrides, changed, datamodule)  # the dataset becomes the run's MLflow input
        per_task = next((c for c in callbacks if isinstance(c, selection.PerTaskSelection) and c.per_task), None)
        best, results = fit_and_test(trainer, module, datamodule, resume, per_task)
        run.log_summary(run_summary(cfg, best, module), trainer.global_step)
        if trainer.is_global_zero:
            title = "each task's own best checkpoint by validation" if per_task else "best checkpoint by validation"
            print_results(results, datamodule.tasks, segments=datamodule.segments, title=title)
            if run.describe():  # what mtl-recommend --run-id and resume= take
                Console().print(run.describe())
            print_run_end(trainer, run.mlflow)  # the link to the run in the UI comes last
        return best


def check_startup(cfg: DictConfig, output_dir: Path) -> None:
    """What can be refused before anything is loaded or recorded: every config value (``schema.validate``; the CLI
    ran it already, callers of ``train(cfg)`` get it here), a strategy the training step cannot honour, and folders
    the run could not write (its outputs, every callback's checkpoint folder)."""
    schema.validate(cfg)
    check_strategy(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    outputs.check_writable(output_dir, "paths.output_dir")
    for name, node in (cfg.get("callbacks") or {}).items():
        dirpath = OmegaConf.select(node, "dirpath", default=None) if isinstance(node, DictConfig) else None
        if dirpath:
            outputs.check_writable(dirpath, f"callbacks.{name}.dirpath")


def check_strategy(strategy: Any) -> None:
    """Only one device or DDP: strategies that shard parameters (FSDP, DeepSpeed) leave no rank with the shared
    parameters' full gradients, which the per-task gradient path reads and overwrites (README: Distributed)."""
    if not isinstance(strategy, str) or strategy == "auto":
        return  # an object or a config node: MTLModule.check_trainer judges the built strategy
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

    cls = StrategyRegistry[strategy]["strategy"] if strategy in StrategyRegistry else None
    if cls not in (SingleDeviceStrategy, DDPStrategy):  # exactly: DeepSpeedStrategy subclasses DDPStrategy
        raise ConfigError(
            f"trainer.strategy={strategy} is not supported: MTLModule trains on one device or with DDP (trainer=ddp, "
            "or trainer.strategy=ddp), which every loss method supports; strategies that shard parameters (FSDP, "
            "DeepSpeed) leave no rank with the shared parameters' full gradients."
        )


def resolve_resume(cfg: DictConfig, output_dir: Path) -> resume_lib.Resume | None:
    """The tracking store answers and ``resume=`` names a checkpoint of its run: before any data is loaded."""
    uri = tracking.preflight(cfg) if rank_zero_only.rank == 0 else None
    node = tracking.mlflow_logger_node(cfg)
    if uri is None and node is not None:
        uri = tracking.resolve_tracking_uri(OmegaConf.select(node, "tracking_uri"))
    return resume_lib.resolve(cfg.resume, uri, output_dir / "checkpoints") if cfg.get("resume") else None


def describe_checkpoints(module, run_cfg: DictConfig, params: Mapping[str, Any], choices, overrides) -> None:
    """What every checkpoint carries about its run (checkpoints may be shared, so secrets are scrubbed): the
    resolved config, the hash of the settings ``resume=`` must find unchanged, and a target-free recipe (the run's
    overrides) from which ``mtl-recommend`` rebuilds the model through our own config groups."""
    module.run_config = scrub_yaml(run_cfg)
    module.checkpoint_meta = {
        "config_hash": resume_lib.config_hash(params),
        "recipe": scrub(safe_config.recipe(choices, overrides)),
    }


def build_callbacks(cfg: DictConfig, resume: resume_lib.Resume | None, tasks: Mapping[str, Task]) -> list:
    """The configured callbacks, plus what they add for the tasks (a checkpoint per task for per-task selection)."""
    callbacks = [build(cfg, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c]
    for cb in [c for c in callbacks if isinstance(c, selection.TaskCallback)]:
        callbacks += cb.prepare(tasks)
    if resume is not None:
        resume.apply(callbacks)  # checkpoints continue in the resumed run's folder
        # continuing in the run's own checkpoint folder is the point
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    return callbacks


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list, module) -> pl.Trainer:
    """The trainer, its settings checked against the training step before a run exists; checkpoint writes that
    fail stop the run (checkpoints.VerifiedCheckpointIO)."""
    trainer: pl.Trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    module.check_trainer(trainer)  # precision / strategy the training step cannot honour
    for cb in callbacks:
        if isinstance(cb, selection.TaskEarlyStopping):
            cb.check_trainer(trainer)  # before the run exists: task-wise early stopping needs one process
    trainer.strategy.checkpoint_io = checkpoints.VerifiedCheckpointIO()
    return trainer


def fit_and_test(
    trainer: pl.Trainer, module, datamodule, resume, per_task: selection.PerTaskSelection | None = None
) -> tuple[float | None, dict[str, float]]:
    """Fit (from the resumed checkpoint, if any), then test the best checkpoint by validation, or with ``per_task``
    each task's own best checkpoint (``selection.PerTaskSelection.test``); (best, results)."""
    ckpt_path = str(resume.checkpoint) if resume is not None else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, **checkpoints.safe_loading(trainer.fit))
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            plots.log_run_artifacts(logger, module)
    ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    best_path = ckpt.best_model_path if ckpt is not None else ""
    best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
    if per_task is not None:
        return best, per_task.test(trainer, module, datamodule, best_path)
    return best, selection.run_test(trainer, module, datamodule, best_path)


def run_summary(cfg: DictConfig, best: float | None, module) -> dict[str, float]:
    """Run-level values: the best validation score (``val_best/<metric>``: ``summary_names.best_key``)."""
    return {summary_names.best_key(cfg.optimized_metric): best} if best is not None else {}
