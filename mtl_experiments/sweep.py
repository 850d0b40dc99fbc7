"""One MLflow parent run per Hydra multirun, so the runs of a sweep are one group in the MLflow UI.

``python train.py -m loss=equal,fixed seed=0,1`` creates a parent run (tag ``mtl.role=sweep_parent``, run
name ``sweep-<sweep dir name>``) before the first job, and every job's run is created as its child (tags
``mlflow.parentRunId`` and ``mtl.sweep_id``, see ``tracking.sweep_tags``). The parent's id travels in the
environment variable ``MTL_PARENT_RUN_ID``, so jobs in this process and in the worker processes of
parallel launchers (joblib, submitit), which inherit the environment, see it. A single run (no ``-m``)
never has a parent.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mtl_experiments import tracking
from mtl_experiments.errors import MTLError, TrackingError

log = logging.getLogger(__name__)

_TERMINAL = ("FINISHED", "FAILED", "KILLED")
_PARAM_CHARS = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in a param name (e.g. '@' of a package)


def sweep_params(config: DictConfig) -> dict[str, str]:
    """``{"sweep.<key>": "<values>"}`` for every swept key: command-line sweeps (``loss=equal,fixed``)
    and the sweeper's own ``params`` (e.g. an Optuna search space); fixed overrides are not sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params: dict[str, str] = {}
    for key, value in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items():
        params[f"sweep.{key}"] = str(value)
    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or []
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - the sweeper will report a malformed override itself
        return params
    for override in parsed:
        if override.is_sweep_override():
            text = override.input_line or ""
            params[f"sweep.{override.get_key_element()}"] = text.split("=", 1)[1] if "=" in text else text
    return params


class MLflowSweepCallback(Callback):
    """Creates the sweep's parent run on ``on_multirun_start`` and ends it on ``on_multirun_end``:
    FINISHED, or FAILED if any job failed (a child run FAILED/KILLED, also one of a parallel launcher's
    worker process, or a job Hydra reports FAILED, e.g. one that raised before its run existed).

    If the sweep never reaches ``on_multirun_end`` (Hydra re-raises a failed job's exception after the
    batch, a config error or a NaN loss included, see cli.py; Ctrl-C), an ``atexit`` handler
    ends the parent FAILED (KILLED after an unhandled KeyboardInterrupt) instead of leaving it RUNNING.
    Runs that cannot be tracked stop the sweep before its first job, with the same one-line error and
    exit code 2 as a single run (Hydra only warns about exceptions raised in callbacks, so ``sys.exit``
    is the way to stop it).
    """

    def __init__(self, env_var: str = tracking.PARENT_RUN_ENV) -> None:
        self.env_var = env_var
        self._client = None
        self._parent_id: str | None = None
        self._previous_env: str | None = None
        self._failed_jobs = 0

    # -- Hydra hooks -------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        node = tracking.mlflow_logger_node(config)
        if node is None:  # logger=csv (or none): nothing to group
            return
        try:
            self._start_parent(config, node)
        except MTLError as e:  # the jobs would each fail the same way: stop now, like a single run
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            self._failed_jobs += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._parent_id is None:
            return
        self._end_parent(None)

    # -- parent run --------------------------------------------------------------------------------
    def _start_parent(self, config: DictConfig, node: DictConfig) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        launch = Path(str(OmegaConf.select(config, "hydra.runtime.cwd") or Path.cwd()))
        uri = tracking.resolve_tracking_uri(OmegaConf.select(node, "tracking_uri"), launch=launch)
        tracking.check_tracking_uri(uri)
        # Creating the store's schema here, once, also keeps parallel jobs from racing to create it.
        experiment = OmegaConf.select(node, "experiment_name") or config.experiment_name
        experiment_id = tracking.ensure_experiment(uri, experiment)

        sweep_dir = Path(str(config.hydra.sweep.dir))
        overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or []
        tags = {
            **tracking.run_tags({}, [str(o) for o in overrides]),
            tracking.ROLE_TAG: tracking.SWEEP_PARENT,
            "mtl.sweep_dir": str(sweep_dir.resolve()),
        }
        self._client = MlflowClient(uri)
        try:
            run = self._client.create_run(experiment_id, tags=tags, run_name=f"sweep-{sweep_dir.name}")
        except Exception as e:  # noqa: BLE001 - any store failure becomes one readable message
            raise TrackingError(f"MLflow store {uri} failed while creating the sweep's parent run: {e}") from e
        self._parent_id = run.info.run_id
        params = [Param(_PARAM_CHARS.sub("_", k), v[:6000]) for k, v in sweep_params(config).items()]
        try:
            self._client.log_batch(self._parent_id, params=params)
        except Exception as e:  # noqa: BLE001 - the sweep is still grouped without them
            log.warning(f"Could not log the sweep's parameters on its parent run: {e}")

        self._previous_env = os.environ.get(self.env_var)
        os.environ[self.env_var] = self._parent_id
        self._failed_jobs = 0
        atexit.register(self._end_at_exit)
        log.info(f"MLflow parent run {self._parent_id} ({uri}, experiment {experiment!r})")

    def _end_at_exit(self) -> None:
        """The sweep stopped without ``on_multirun_end``: never leave the parent RUNNING."""
        interrupted = isinstance(getattr(sys, "last_type", None), type) and issubclass(sys.last_type, KeyboardInterrupt)
        self._end_parent("KILLED" if interrupted else "FAILED")

    def _end_parent(self, status: str | None) -> None:
        """End the parent (``status`` None: decide from the jobs) and restore the environment."""
        parent, self._parent_id = self._parent_id, None
        atexit.unregister(self._end_at_exit)
        if self._previous_env is None:
            os.environ.pop(self.env_var, None)
        else:
            os.environ[self.env_var] = self._previous_env
        if parent is None:
            return
        try:
            children = self._client.search_runs(
                [self._client.get_run(parent).info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                max_results=10_000,
            )
            failed = sum(c.info.status in ("FAILED", "KILLED") for c in children)
            if status is None:
                # children that fail in other processes (parallel launchers) are only visible in the store
                status = "FAILED" if failed or self._failed_jobs else "FINISHED"
            self._client.log_metric(parent, "sweep/children", len(children))
            self._client.log_metric(parent, "sweep/failed_children", failed)
        except Exception as e:  # noqa: BLE001 - still try to end the parent below
            log.warning(f"Could not read the sweep's child runs: {e}")
            status = status or ("FAILED" if self._failed_jobs else "FINISHED")
        try:
            if self._client.get_run(parent).info.status not in _TERMINAL:
                self._client.set_terminated(parent, status)
        except Exception as e:  # noqa: BLE001 - at exit or after a failure: report, do not raise
            log.warning(f"Could not end the sweep's parent run {parent}: {e}")
