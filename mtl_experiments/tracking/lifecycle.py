"""``with tracking.run(cfg, ...) as run:`` — one MLflow run's life in the pipeline.

On entry the loggers are built (no MLflow run exists yet: a trainer setting refused after this leaves nothing);
``run.start(params, ...)`` creates the run (params + config artifacts) or reopens the resumed one; an exception
inside the block ends the run FAILED (KILLED for Ctrl-C; after the values still queued for the store) and is
re-raised; on the way out, whatever happened, the MLflow logger's queued values are written and its writer thread
ends (``report_outages``), and an outage of the store is reported (in the log and as a tag).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from mtl_experiments.scrub import redact
from mtl_experiments.tracking.dataset import log_dataset, log_files
from mtl_experiments.tracking.logger import ResilientMLFlowLogger, mark_failed
from mtl_experiments.tracking.metadata import (
    CHECKPOINT_DIR_TAG,
    HOST_TAG,
    default_run_name,
    flatten,
    host,
    log_config_artifacts,
    path_tags,
    run_params,
    run_tags,
    sweep_tags,
    swept_keys,
)
from mtl_experiments.tracking.resume import continue_run
from mtl_experiments.tracking.store import check_tracking_uri, ensure_experiment, last_steps, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class TrackedRun:
    """The loggers of one training run and its MLflow logger (None without one)."""

    loggers: list
    mlflow: MLFlowLogger | None
    resume: Any = None  # checkpoints.Resume
    checkpoint_tags: dict[str, str] = field(default_factory=dict)
    choices: Mapping[str, str] = field(default_factory=dict)  # Hydra's option per config group

    def start(
        self, params: Mapping[str, Any], run_cfg: DictConfig, overrides: list[str], changed: Mapping, datamodule=None
    ) -> None:
        """Create the MLflow run (params, config artifacts, the dataset) or reopen the resumed one. ``params``: the
        flattened config; per-run paths become tags and each group's choice a param (``metadata.run_params``)."""
        lg, resume = self.mlflow, self.resume
        if lg is None:
            return
        logged = run_params(params, self.choices)
        if resume is not None and resume.run is not None:
            tags = {**self.checkpoint_tags, **path_tags(params)}  # this attempt's folders
            continue_run(lg, resume.run, logged, changed, resume.checkpoint, tags)
            return
        lg.log_hyperparams(logged)
        log_config_artifacts(lg, run_cfg, overrides)
        if datamodule is not None and rank_zero_only.rank == 0:
            log_dataset(lg, datamodule, run_cfg.get("data"), self.choices.get("data"))
        if resume is not None:  # a checkpoint of no known run: a new run, started from it
            lg.experiment.set_tag(lg.run_id, "mtl.resumed_from", redact(str(resume.checkpoint)))

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow is not None else None

    def log_summary(self, summary: Mapping[str, float], step: int) -> None:
        """Run-level values (best score, counters) at the last step: a resumed run writes a new value after the old."""
        if self.mlflow is not None and summary:
            self.mlflow.log_metrics(dict(summary), step=step)

    def describe(self) -> str | None:
        """``MLflow run <id> (<store>)``: what ``mtl-recommend --run-id`` and ``resume=`` take."""
        if self.mlflow is None:
            return None
        uri = self.mlflow.tracking_uri if isinstance(self.mlflow, ResilientMLFlowLogger) else ""
        return f"MLflow run {self.mlflow.run_id} ({redact(uri)})"


@contextlib.contextmanager
def run(
    cfg: DictConfig,
    choices: Mapping[str, str],
    overrides: list[str],
    resume: Any = None,
    checkpoint_dir: str | None = None,
    fallback_dir: Path | None = None,
) -> Iterator[TrackedRun]:
    """The tracked life of one run (see the module docstring)."""
    tags = {CHECKPOINT_DIR_TAG: checkpoint_dir, HOST_TAG: host()} if checkpoint_dir else {}
    loggers = build_loggers(cfg, choices, overrides, resume, tags, fallback_dir)
    mlflow = next((lg for lg in loggers if isinstance(lg, MLFlowLogger)), None)
    tracked = TrackedRun(loggers, mlflow, resume, tags, dict(choices))
    try:
        yield tracked
    except BaseException as e:
        mark_failed(mlflow, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if isinstance(mlflow, ResilientMLFlowLogger) and rank_zero_only.rank == 0:
            if mlflow.started:
                log_files(mlflow)  # the console log, also of a failed run
            mlflow.report_outages()


def build_loggers(
    cfg: DictConfig,
    choices: Mapping[str, str],
    overrides: list[str],
    resume: Any = None,
    checkpoint_tags: Mapping[str, str] | None = None,
    fallback_dir: Path | None = None,
) -> list:
    """Every ``logger.<name>`` of the config; Lightning's ``MLFlowLogger`` becomes ours (buffers through outages,
    skips resumed steps), with the run's tags and name, continuing the resumed run."""
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None:
            continue
        factory = instantiate(logger_cfg, _partial_=True, _convert_="all")
        if isinstance(factory.func, type) and issubclass(factory.func, MLFlowLogger):
            loggers.append(mlflow_logger(cfg, factory, choices, overrides, resume, checkpoint_tags, fallback_dir))
        else:
            loggers.append(factory())
    return loggers


def mlflow_logger(cfg, factory, choices, overrides, resume, checkpoint_tags, fallback_dir) -> MLFlowLogger:
    """The run's MLflow logger from its config partial: the store checked, the experiment made, tags and name."""
    uri = resolve_tracking_uri(factory.keywords.get("tracking_uri"))
    if rank_zero_only.rank == 0:  # DDP: only rank 0 touches the store (Lightning's logger is rank-0-only)
        check_tracking_uri(uri)
        ensure_experiment(uri, factory.keywords.get("experiment_name") or cfg.experiment_name)
    tags = {
        **run_tags(choices, overrides, loss=cfg.get("loss")),
        **sweep_tags(),  # a job of a multirun: the child of the sweep's parent run
        **(checkpoint_tags or {}),
        **path_tags(flatten(cfg)),  # where this run writes: tags, not params (metadata.run_params)
        # user tags; a dotted key from the command line (tags.team.name=x) arrives nested: flatten it
        **{k: str(v) for k, v in flatten(factory.keywords.get("tags") or {}).items()},
    }
    run_name = factory.keywords.get("run_name") or default_run_name(choices, overrides, cfg.seed, swept_keys())
    kwargs: dict[str, Any] = {"tracking_uri": uri, "tags": tags, "run_name": run_name}
    cls = ResilientMLFlowLogger if factory.func is MLFlowLogger else factory.func  # a user's subclass is kept
    continues = resume is not None and resume.run is not None
    if continues:
        kwargs["run_id"] = resume.run_id  # the same MLflow run continues
    if issubclass(cls, ResilientMLFlowLogger):
        kwargs["fallback_dir"] = fallback_dir
        if continues and rank_zero_only.rank == 0:
            from mlflow.tracking import MlflowClient

            kwargs["resume_floor"] = last_steps(MlflowClient(uri), resume.run_id)
    return cls(*factory.args, **{**factory.keywords, **kwargs})
