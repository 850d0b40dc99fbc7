"""``train(cfg)``: seed -> data -> model -> module -> loggers/callbacks -> trainer.fit -> trainer.test.

Everything that can be checked is checked *before* an MLflow run exists (the tracking store and the
``resume=`` target first, before any data is loaded; then config values, data, the optimized metric),
so bad input costs seconds and leaves no half-written run; once a run exists, any exception ends it as
FAILED (KILLED for Ctrl-C) instead of leaving it RUNNING. ``resume=<run id | checkpoint>`` continues a
killed run from its last checkpoint into the same MLflow run (mtl_experiments/checkpoints.py).
"""

from __future__ import annotations

import logging
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

from mtl_experiments import checkpoints, plots, tracking
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


# What a resumed run may change: where files are, how long and how verbosely it trains. Anything else
# (data, model, loss, optimizer, seed, ...) would continue the run with settings its checkpoint and its
# logged params do not describe, so resume refuses it.
RESUME_MAY_CHANGE = ("resume", "paths.", "trainer.", "callbacks.", "logger.", "run_name", "experiment_name")
RESUME_MAY_CHANGE_KEYS = ("data.root", "data.cache_dir")


def check_resumable(resume: checkpoints.Resume, changed: Mapping[str, tuple]) -> None:
    """ConfigError listing the settings that differ from the resumed run's (and its original overrides)."""
    differ = {
        k: v for k, v in changed.items() if not k.startswith(RESUME_MAY_CHANGE) and k not in RESUME_MAY_CHANGE_KEYS
    }
    if differ:
        listed = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(differ.items())[:8])
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        overrides = resume.run.data.tags.get("overrides", "")
        raise ConfigError(
            f"resume continues run {resume.run_id} with its own settings, but these differ: {listed}{more}. "
            f"Repeat the run's overrides: python train.py {overrides} resume={resume.run_id}"
        )


def _build_loggers(
    cfg: DictConfig,
    choices: dict[str, str],
    overrides: list[str],
    resume: checkpoints.Resume | None = None,
    checkpoint_dir: str | None = None,
    fallback_dir: Path | None = None,
) -> list:
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None:
            continue
        factory = instantiate(logger_cfg, _partial_=True, _convert_="all")
        if isinstance(factory.func, type) and issubclass(factory.func, MLFlowLogger):
            uri = tracking.resolve_tracking_uri(factory.keywords.get("tracking_uri"))
            if rank_zero_only.rank == 0:  # DDP: only rank 0 touches the store (Lightning's logger is rank-0-only)
                tracking.check_tracking_uri(uri)
                tracking.ensure_experiment(uri, factory.keywords.get("experiment_name") or cfg.experiment_name)
            tags = {
                **tracking.run_tags(choices, overrides, loss=cfg.get("loss")),
                **tracking.sweep_tags(),  # a job of a multirun: the child of the sweep's parent run
                **(
                    {tracking.CHECKPOINT_DIR_TAG: checkpoint_dir, tracking.HOST_TAG: tracking.host()}
                    if checkpoint_dir
                    else {}
                ),
                # user tags; a dotted key from the command line (tags.team.name=x) arrives nested: flatten it
                **{k: str(v) for k, v in tracking.flatten(factory.keywords.get("tags") or {}).items()},
            }
            run_name = factory.keywords.get("run_name") or "-".join(
                [str(choices.get(g, "?")) for g in ("data", "backbone", "loss")] + [f"seed{cfg.seed}"]
            )
            kwargs: dict[str, Any] = {"tracking_uri": uri, "tags": tags, "run_name": run_name}
            # Lightning's class becomes ours (buffers through outages, skips resumed steps); a subclass is kept
            cls = tracking.ResilientMLFlowLogger if factory.func is MLFlowLogger else factory.func
            if resume is not None and resume.run is not None:
                kwargs["run_id"] = resume.run_id  # the same MLflow run continues
            if issubclass(cls, tracking.ResilientMLFlowLogger):
                kwargs["fallback_dir"] = fallback_dir
                if resume is not None and resume.run is not None and rank_zero_only.rank == 0:
                    from mlflow.tracking import MlflowClient

                    kwargs["resume_floor"] = tracking.last_steps(MlflowClient(uri), resume.run_id)
            loggers.append(cls(*factory.args, **{**factory.keywords, **kwargs}))
        else:
            loggers.append(factory())
    return loggers


def print_results(
    results: Mapping[str, float], tasks: Mapping[str, Task], stage: str = "test", segments: tuple[str, ...] = ()
) -> None:
    """A task x metric table of the final metrics; a row per task and evaluation segment (warm, cold_user, ...)."""
    columns: list[str] = []
    for task in tasks.values():
        columns += [m for m in task.metrics() if m not in columns]
    table = Table(title=f"{stage} metrics (best checkpoint by validation)")
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
    """Train and test one configuration; returns the best value of ``cfg.optimized_metric``."""
    choices, overrides = hydra_context(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(OmegaConf.select(cfg, "paths.output_dir", default=None) or tempfile.mkdtemp(prefix="mtl-"))

    # 0. the tracking store answers and resume= names a checkpoint: before any data is loaded
    uri = tracking.preflight(cfg) if rank_zero_only.rank == 0 else None
    node = tracking.mlflow_logger_node(cfg)
    if uri is None and node is not None:
        uri = tracking.resolve_tracking_uri(OmegaConf.select(node, "tracking_uri"))
    resume = checkpoints.resolve(cfg.resume, uri, output_dir / "checkpoints") if cfg.get("resume") else None

    # 1. build and validate everything (no run exists yet, so a bad value leaves nothing behind)
    datamodule = build(cfg, "data")
    tasks = datamodule.tasks
    # generate / load now: a missing file or a bad label fails here, in seconds; and what the data holds decides
    # some metric names (val/<task>/gauc needs user ids), so the optimized metric is checked after it
    datamodule.setup()
    resolve_optimized_metric(cfg, tasks)  # before anything reads ${optimized_mode}
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    params = tracking.flatten(run_cfg)
    changed = tracking.changed_params(resume.run, params) if resume is not None and resume.run is not None else {}
    if changed:
        check_resumable(resume, changed)
    module = build_module(cfg, datamodule, build_model(cfg, datamodule))
    # the resolved config travels in every checkpoint, so a checkpoint alone can rebuild its model (recommend.py)
    module.run_config = tracking.redact(OmegaConf.to_yaml(run_cfg, resolve=True))  # checkpoints may be shared
    callbacks = [build(cfg, f"callbacks.{name}") for name, c in (cfg.get("callbacks") or {}).items() if c]
    if resume is not None:
        resume.apply(callbacks)  # checkpoints continue in the resumed run's folder
    last = next((c for c in callbacks if isinstance(c, checkpoints.LastCheckpoint)), None)
    loggers = _build_loggers(
        run_cfg,
        choices,
        overrides,
        resume=resume,
        checkpoint_dir=last.dirpath if last is not None else None,
        fallback_dir=output_dir / "mlflow_fallback",
    )
    trainer: pl.Trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    module.check_trainer(trainer)  # precision / strategy the training step cannot honour: before a run exists
    if resume is not None:  # continuing in the run's own checkpoint folder is the point
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")

    # 2. train, tracked; a run that raises ends FAILED
    mlflow_logger = next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None)
    try:
        if mlflow_logger is not None and resume is not None and resume.run is not None:
            extra = {tracking.CHECKPOINT_DIR_TAG: last.dirpath, tracking.HOST_TAG: tracking.host()} if last else {}
            tracking.continue_run(mlflow_logger, resume.run, params, changed, resume.checkpoint, extra)
        elif mlflow_logger is not None:
            mlflow_logger.log_hyperparams(params)
            tracking.log_config_artifacts(mlflow_logger, run_cfg, overrides)
            if resume is not None:  # a checkpoint of no known run: a new run, started from it
                mlflow_logger.experiment.set_tag(mlflow_logger.run_id, "mtl.resumed_from", str(resume.checkpoint))
        ckpt_path = str(resume.checkpoint) if resume is not None else None
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, **checkpoints.safe_loading(trainer.fit))
        if mlflow_logger is not None:
            plots.log_run_artifacts(mlflow_logger, module)
        ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        best_path = ckpt.best_model_path if ckpt is not None else ""
        if not best_path:
            log.warning("No best checkpoint was saved; testing the final weights.")
        results = trainer.test(
            module,
            datamodule=datamodule,
            ckpt_path=best_path or None,
            verbose=False,
            **checkpoints.safe_loading(trainer.test),
        )[0]
        best = float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None
        summary: dict[str, Any] = {}
        if best is not None:
            summary[f"best/{cfg.optimized_metric}"] = best
        if mlflow_logger is not None and summary:
            # at the last step (not 0): a resumed run that trains on writes a new value after the old one
            mlflow_logger.log_metrics(summary, step=trainer.global_step)
        if trainer.is_global_zero:
            print_results(results, tasks, segments=datamodule.segments)
            if mlflow_logger is not None:  # what mtl-recommend --run-id and resume= take
                Console().print(f"MLflow run {mlflow_logger.run_id} ({tracking.redact(mlflow_logger.tracking_uri)})")
        _report_tracking(mlflow_logger)
        return best
    except BaseException as e:
        tracking.mark_failed(mlflow_logger, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        _report_tracking(mlflow_logger)
        raise


def _report_tracking(logger) -> None:
    """Say what happened to the tracking store during the run (an outage, and where its values are)."""
    if isinstance(logger, tracking.ResilientMLFlowLogger) and rank_zero_only.rank == 0:
        logger.report_outages()
