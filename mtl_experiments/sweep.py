"""Hydra callbacks for multiruns: one MLflow parent run per sweep, and torch threads per parallel job.

``python train.py -m loss=equal,fixed seed=0,1`` creates a parent run (tag ``mtl.role=sweep_parent``, run
name ``<data>: <swept keys> (<sweep dir name>)``, ``sweep_name``) before the first job, and every job's run is
created as its child, named after its swept values first (``metadata.default_run_name``) (tags
``mlflow.parentRunId`` and ``mtl.sweep_id``, see ``tracking.sweep_tags``). The parent's id travels in the
environment variable ``MTL_PARENT_RUN_ID``: set in the launching process, inherited by the worker processes
of parallel launchers (joblib, submitit), and set again at each job's start from the callback object itself,
which every launcher pickles into its workers (so Ray workers, or Slurm jobs submitted without the
environment, see it too). A single run (no ``-m``) never has a parent.

Before the parent run, every job's config is checked (``check_sweep_jobs``: each job's overrides composed, its config
groups once per distinct choice, and ``schema.validate``d): a sweep with a bad value in any job is refused whole, one
line and exit code 2, before any run or job exists.

Creating the parent run also creates the tracking store's schema and the experiment, once, in the launching
process before any job starts: parallel jobs that each found an empty SQLite file would race to create the
tables, and one of them would crash.

At the end of the sweep the parent gets a summary of its jobs (finished, failed with their overrides and
errors), as metrics, tags and the artifact ``sweep_summary.json``, also printed on the console.

Registered in ``conf/hydra/default.yaml`` under ``hydra.callbacks``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mtl_experiments import schema
from mtl_experiments.errors import ConfigError, MTLError, TrackingError
from mtl_experiments.scrub import redact
from mtl_experiments.sweep_env import PARENT_RUN_ENV, SWEPT_ENV

log = logging.getLogger(__name__)

_TERMINAL = ("FINISHED", "FAILED", "KILLED")
_PARAM_CHARS = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in a param name (e.g. '@' of a package)
FAILED_JOB_TAG = "mtl.failed_job."  # + job number: written on the parent by the failed job's own process
FAILED_OVERRIDES_TAG = "mtl.failed_overrides"
SUMMARY_ARTIFACT = "sweep_summary.json"


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


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Every job's overrides, expanded as the basic sweeper does: the sweeper's ``params``, then the command line's,
    each sweep (``a=1,2``, ``range(...)``, ``choice(...)``) over its values. A sweep with no list of values (an Optuna
    ``interval``) is left out: the sweeper samples it, and the job's own check judges the sample."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    params = OmegaConf.select(config, "hydra.sweeper.params")
    lines = [f"{k}={v}" for k, v in (OmegaConf.to_container(params) if params else {}).items()]
    lines += [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False) or []]
    axes = []
    for o in OverridesParser.create().parse_overrides(lines):
        if not o.is_sweep_override():
            axes.append([o.input_line])
        elif not isinstance(o.value(), IntervalSweep):
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    return [list(job) for job in itertools.product(*axes)]


def apply_values(cfg: DictConfig, overrides: list) -> bool:
    """Apply value overrides (parsed, not config groups) to ``cfg`` as Hydra does after composing; False where Hydra
    would refuse one (a missing key, ``+`` on a key that exists, ...): the caller composes that job to get its error."""
    from omegaconf import open_dict

    for o in overrides:
        key, value = o.key_or_group, o.value()
        present = OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        if o.package is not None or (o.is_delete() and present is None):
            return False
        if o.is_add() and present is not None and not isinstance(value, dict | list):
            return False
        try:
            if o.is_delete():
                parent, _, leaf = key.rpartition(".")
                with open_dict(cfg):
                    del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
            else:
                OmegaConf.update(cfg, key, value, merge=True, force_add=o.is_add() or o.is_force_add())
        except Exception:  # noqa: BLE001 - Hydra's own composition says what is wrong
            return False
    return True


def job_problem(config: DictConfig, job: list[str], bases: dict) -> str | None:
    """The first problem of one job's config, or None. The config groups it chooses are composed once per distinct
    choice (``bases``: a composition costs ~0.1 s, a check ~5 ms) and its values applied to a copy."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra.types import RunMode

    def compose(overrides: list[str]) -> DictConfig:
        return GlobalHydra.instance().hydra.compose_config(
            config.hydra.job.config_name, overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )

    parsed = OverridesParser.create().parse_overrides(job)
    is_group = [o.key_or_group.startswith("hydra") or (schema.CONF / o.key_or_group).is_dir() for o in parsed]
    groups = tuple(line for line, group in zip(job, is_group, strict=True) if group)
    try:
        if groups not in bases:
            bases[groups] = compose(list(groups))
        cfg = bases[groups].copy()
        if not apply_values(cfg, [o for o, group in zip(parsed, is_group, strict=True) if not group]):
            cfg = compose(job)  # raises Hydra's error for the override it could not apply
        schema.validate(cfg, dict(cfg.hydra.runtime.choices))
    except ConfigError as e:
        return str(e)
    except HydraException as e:  # an option that does not exist, a key the chosen option lacks
        cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
        return schema.composition_message(f"{e}{cause}").split(" Config search path:")[0]
    return None


def check_sweep_jobs(config: DictConfig) -> None:
    """Check every job's config (``schema.validate``) before anything is launched or recorded: a sweep with a bad
    value in any job is refused whole, naming the first such job by its swept values."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    jobs, bases = sweep_jobs(config), {}
    swept = {_key(k[len("sweep.") :]) for k in sweep_params(config)}
    # Hydra's app is initialised during a sweep; a caller of the callback outside it gets the project's conf/
    outside = not GlobalHydra.instance().is_initialized()
    with initialize_config_dir(str(schema.CONF), version_base="1.3") if outside else contextlib.nullcontext():
        bad = [(job, problem) for job in jobs if (problem := job_problem(config, job, bases)) is not None]
    if bad:
        job, message = bad[0]
        shown = " ".join(o for o in job if _key(o) in swept) or " ".join(job)
        raise ConfigError(
            f"sweep job [{shown}] ({len(bad)} of {len(jobs)} jobs have bad values; nothing was run): {message}"
        )


def sweep_name(data: str | None, swept: list[str], folder: str) -> str:
    """A sweep's parent run name: its data and swept keys first, then its folder (``synthetic: loss x seed
    (22-32-54-ab12cd)``), so the runs table shows what the sweep compares before it is cut off."""
    keys = " x ".join(k.rsplit(".", 1)[-1] for k in swept)
    lead = data if data and "data" not in swept else "sweep"
    return f"{lead}: {keys} ({folder})" if keys else f"{lead} sweep ({folder})"


def _key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def _error_line(error: Any, limit: int = 1000) -> str:
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return " ".join(text.split())[:limit]


class MLflowSweepCallback(Callback):
    """Creates the sweep's parent run on ``on_multirun_start`` and ends it on ``on_multirun_end``:
    FINISHED, or FAILED if any job failed (a child run FAILED/KILLED, also one of a parallel launcher's
    worker process, or a job Hydra reports FAILED, e.g. one that raised before its run existed).

    A job that fails records itself on the parent (tag ``mtl.failed_job.<num>``: its overrides and error) in
    ``on_job_end``, which runs in the job's own process whatever the launcher, so failures before a run
    existed (a bad config value) are counted as well as FAILED child runs. The parent's summary: metrics
    ``sweep/jobs``, ``sweep/finished_jobs``, ``sweep/failed_jobs`` (and ``sweep/children``,
    ``sweep/failed_children``: child runs), tag ``mtl.failed_overrides`` and ``sweep_summary.json``.

    If the sweep never reaches ``on_multirun_end`` (Hydra's basic sweeper re-raises a failed job's
    exception after the batch, a config error or a NaN loss included, see cli.py; Ctrl-C), an ``atexit``
    handler writes the summary and ends the parent FAILED (KILLED after an unhandled KeyboardInterrupt)
    instead of leaving it RUNNING. Runs that cannot be tracked stop the sweep before its first job, with
    the same one-line error and exit code 2 as a single run (Hydra only warns about exceptions raised in
    callbacks, so ``sys.exit`` is the way to stop it).
    """

    def __init__(self, env_var: str = PARENT_RUN_ENV) -> None:
        self.env_var = env_var
        self._uri: str | None = None
        self._client = None
        self._parent_id: str | None = None
        self._previous_env: str | None = None
        self._failed_jobs = 0
        self._swept: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        # pickled into the workers of parallel launchers: they open their own connection to the store
        return {**self.__dict__, "_client": None}

    def _store(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self._uri)
        return self._client

    # -- Hydra hooks -------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0:
            return  # a DDP worker: Lightning relaunches the whole command (-m included); rank 0 owns the parent run
        try:
            check_sweep_jobs(config)  # before MLflow is imported and any run exists
        except MTLError as e:
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(2)
        from mtl_experiments import tracking  # MLflow, Lightning: when the sweep starts, not when Hydra builds us

        node = tracking.mlflow_logger_node(config)
        if node is None:  # logger=csv (or none): nothing to group
            return
        try:
            self._start_parent(config, node)
        except MTLError as e:  # the jobs would each fail the same way: stop now, like a single run
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._parent_id is not None:  # a worker whose environment did not carry it (Ray, sbatch --export)
            os.environ[self.env_var] = self._parent_id
            os.environ[SWEPT_ENV] = ",".join(self._swept)  # job run names lead with these values

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        self._failed_jobs += 1
        if self._parent_id is None:
            return
        num = OmegaConf.select(config, "hydra.job.num")
        overrides = [str(o) for o in job_return.overrides or []]
        record = {
            "job": num,
            "overrides": redact(" ".join(overrides))[:3000],  # as the child run's ``overrides`` tag
            "swept": {_key(o): redact(o.split("=", 1)[-1]) for o in overrides if _key(o) in self._swept},
            # the exception itself (``return_value`` would print and re-raise it)
            "error": redact(_error_line(job_return._return_value)),
        }
        try:
            self._store().set_tag(self._parent_id, f"{FAILED_JOB_TAG}{num}", json.dumps(record)[:5000])
        except Exception as e:  # noqa: BLE001 - the parent still counts the job's FAILED run, if it has one
            log.warning(f"Could not record the failed job {num} on the sweep's parent run: {e}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._parent_id is None:
            return
        parent = self._parent_id
        self._end_parent(None)
        self._print_end(config, parent)

    def _print_end(self, config: DictConfig, parent: str) -> None:
        """The parent's link in the UI and the ``mtl-compare`` command for the sweep (after its last job)."""
        from mtl_experiments import console

        experiment_id = self._store().get_run(parent).info.experiment_id
        ui_url = OmegaConf.select(config, "callbacks.progress_bar.ui_url")
        for line in console.sweep_end_lines(self._uri, experiment_id, parent, ui_url):
            print(line)

    # -- parent run --------------------------------------------------------------------------------
    def _start_parent(self, config: DictConfig, node: DictConfig) -> None:
        from mlflow.entities import Param

        from mtl_experiments import tracking

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
        self._uri, self._client = uri, None
        swept = sweep_params(config)
        self._swept = [k[len("sweep.") :] for k in swept]
        name = sweep_name(OmegaConf.select(config, "hydra.runtime.choices.data"), self._swept, sweep_dir.name)
        try:
            run = self._store().create_run(experiment_id, tags=tags, run_name=name)
        except Exception as e:  # noqa: BLE001 - any store failure becomes one readable message
            raise TrackingError(f"MLflow store {uri} failed while creating the sweep's parent run: {e}") from e
        self._parent_id = run.info.run_id
        params = [Param(_PARAM_CHARS.sub("_", k), redact(v)[:6000]) for k, v in swept.items()]
        try:
            self._store().log_batch(self._parent_id, params=params)
        except Exception as e:  # noqa: BLE001 - the sweep is still grouped without them
            log.warning(f"Could not log the sweep's parameters on its parent run: {e}")

        self._previous_env = os.environ.get(self.env_var)
        os.environ[self.env_var] = self._parent_id
        os.environ[SWEPT_ENV] = ",".join(self._swept)
        self._failed_jobs = 0
        atexit.register(self._end_at_exit)
        log.info(f"MLflow parent run {self._parent_id} ({uri}, experiment {experiment!r})")

    def _end_at_exit(self) -> None:
        """The sweep stopped without ``on_multirun_end``: never leave the parent RUNNING."""
        interrupted = isinstance(getattr(sys, "last_type", None), type) and issubclass(sys.last_type, KeyboardInterrupt)
        self._end_parent("KILLED" if interrupted else "FAILED")

    def _end_parent(self, status: str | None) -> None:
        """Summarise the jobs, end the parent (``status`` None: decide from the jobs), restore the environment."""
        parent, self._parent_id = self._parent_id, None
        atexit.unregister(self._end_at_exit)
        if self._previous_env is None:
            os.environ.pop(self.env_var, None)
        else:
            os.environ[self.env_var] = self._previous_env
        os.environ.pop(SWEPT_ENV, None)
        if parent is None:
            return
        client = self._store()
        summary = None
        try:
            summary = summarize(client, parent)
            if status is None:
                # jobs that fail in other processes (parallel launchers) are only visible in the store
                bad = summary["failed_jobs"] or summary["unfinished_jobs"] or self._failed_jobs
                status = "FAILED" if bad else "FINISHED"
            summary["status"] = status
            record_summary(client, parent, summary)
        except Exception as e:  # noqa: BLE001 - still try to end the parent below
            log.warning(f"Could not summarise the sweep's jobs on its parent run {parent}: {e}")
            status = status or ("FAILED" if self._failed_jobs else "FINISHED")
        try:
            if client.get_run(parent).info.status not in _TERMINAL:
                client.set_terminated(parent, status)
        except Exception as e:  # noqa: BLE001 - at exit or after a failure: report, do not raise
            log.warning(f"Could not end the sweep's parent run {parent}: {e}")
        if summary is not None:
            print_summary(summary)


def summarize(client, parent: str) -> dict[str, Any]:
    """The jobs of the sweep whose parent run is ``parent``, from its child runs and its failed-job tags.

    A failed job is one that recorded itself (``mtl.failed_job.<num>``; matched to its child run, if any,
    by the ``overrides`` tag) or whose child run ended FAILED/KILLED; a child still RUNNING after the
    sweep belongs to a job that died without ending its run (killed, out of memory) or still runs elsewhere.
    """
    run = client.get_run(parent)
    children, token = [], None
    while True:
        page = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
            max_results=1000,
            page_token=token,
        )
        children += list(page)
        token = page.token
        if not token:
            break

    def entry(child) -> dict[str, Any]:
        return {"run_id": child.info.run_id, "run_name": child.info.run_name, "status": child.info.status}

    records = []
    for key, value in run.data.tags.items():
        if key.startswith(FAILED_JOB_TAG):
            try:
                records.append(json.loads(value))
            except ValueError:  # truncated: still a failed job
                records.append({"job": key[len(FAILED_JOB_TAG) :], "overrides": "", "error": value})
    by_overrides = {c.data.tags.get("overrides", "")[:3000]: c for c in children}
    failed, failed_runs = [], set()
    for rec in sorted(records, key=lambda r: str(r.get("job")).zfill(9)):
        child = by_overrides.get(rec.get("overrides", ""))
        item = {"job": rec.get("job"), "overrides": rec.get("overrides", ""), "swept": rec.get("swept", {})}
        item.update(entry(child) if child is not None else {"run_id": None, "status": "no run"})
        item["error"] = rec.get("error")
        failed.append(item)
        if child is not None:
            failed_runs.add(child.info.run_id)
    for child in children:
        if child.info.status in ("FAILED", "KILLED") and child.info.run_id not in failed_runs:
            overrides = child.data.tags.get("overrides", "")
            failed.append({"job": None, "overrides": overrides, **entry(child), "error": None})
            failed_runs.add(child.info.run_id)
    finished = [c for c in children if c.info.status == "FINISHED" and c.info.run_id not in failed_runs]
    unfinished = [c for c in children if c.info.status not in _TERMINAL and c.info.run_id not in failed_runs]
    return {
        "parent_run_id": parent,
        "parent_run_name": run.info.run_name,
        "sweep_dir": run.data.tags.get("mtl.sweep_dir"),
        "jobs": len(finished) + len(failed) + len(unfinished),
        "finished_jobs": len(finished),
        "failed_jobs": len(failed),
        "unfinished_jobs": len(unfinished),
        "child_runs": len(children),
        "failed": failed,
        "unfinished": [{"overrides": c.data.tags.get("overrides", ""), **entry(c)} for c in unfinished],
        "finished": [{"overrides": c.data.tags.get("overrides", ""), **entry(c)} for c in finished],
    }


def record_summary(client, parent: str, summary: Mapping[str, Any]) -> None:
    """Counts as metrics (sortable in the runs table), failed overrides as a tag, the whole as an artifact."""
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    counts = {
        "sweep/jobs": summary["jobs"],
        "sweep/finished_jobs": summary["finished_jobs"],
        "sweep/failed_jobs": summary["failed_jobs"],
        "sweep/children": summary["child_runs"],
        "sweep/failed_children": sum(f["run_id"] is not None for f in summary["failed"]),
    }
    tags = []
    if summary["failed"]:
        text = " | ".join(f["overrides"] or f["run_id"] or "?" for f in summary["failed"])
        tags.append(RunTag(FAILED_OVERRIDES_TAG, text[:5000]))
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in counts.items()], tags=tags)
    client.log_dict(parent, dict(summary), SUMMARY_ARTIFACT)


def print_summary(summary: Mapping[str, Any]) -> None:
    """One line of counts, then one line per failed or unfinished job (its swept values and error)."""
    bad = summary["failed_jobs"] or summary["unfinished_jobs"] or summary.get("status") != "FINISHED"
    lines = [
        f"Sweep {summary['parent_run_name']} {summary.get('status', '')}: {summary['jobs']} job(s), "
        f"{summary['finished_jobs']} finished, {summary['failed_jobs']} failed"
        + (f", {summary['unfinished_jobs']} unfinished" if summary["unfinished_jobs"] else "")
        + f" (MLflow parent run {summary['parent_run_id']}"
        + (f", details in its artifact {SUMMARY_ARTIFACT})" if bad else ")")
    ]
    for f in summary["failed"]:
        what = " ".join(f"{k}={v}" for k, v in (f.get("swept") or {}).items()) or f["overrides"]
        job = f"job #{f['job']}" if f["job"] is not None else "job"
        run = f"run {f['run_id']} {f['status']}" if f["run_id"] else "no run"
        lines.append(f"  failed {job} [{what}] ({run}): {(f['error'] or '')[:300]}")
    for u in summary["unfinished"]:
        lines.append(f"  unfinished [{u['overrides']}] (run {u['run_id']} still {u['status']})")
    print("\n".join(lines), file=sys.stderr if bad else sys.stdout, flush=True)


def job_threads(launcher: Mapping | None, num_threads: int | str | None, cores: int) -> tuple[int | None, str]:
    """torch intra-op threads for one job: ``num_threads`` if a number; for ``"auto"`` what the launcher's
    config says one job may use: ``cpus_per_task`` (submitit), ``ray.remote.num_cpus`` (Ray), or ``cores //
    n_jobs`` (joblib, its ``n_jobs=-1`` being every core); ``None`` (torch's default) otherwise, e.g. with
    the basic launcher, which runs one job at a time."""
    if num_threads is None:
        return None, "num_threads=null"
    if num_threads != "auto":
        return int(num_threads), f"num_threads={num_threads}"
    launcher = launcher or {}
    cpus = launcher.get("cpus_per_task")
    if cpus:
        return int(cpus), f"cpus_per_task={cpus}"
    ray_cpus = ((launcher.get("ray") or {}).get("remote") or {}).get("num_cpus")
    if ray_cpus:
        return max(1, int(ray_cpus)), f"ray.remote.num_cpus={ray_cpus}"
    n_jobs = launcher.get("n_jobs")
    if n_jobs:
        parallel = int(n_jobs) if int(n_jobs) > 0 else max(1, cores + 1 + int(n_jobs))  # joblib: -1 = all
        return max(1, cores // parallel), f"{cores} cores // n_jobs={n_jobs}"
    return None, "the launcher runs one job at a time or does not say how many CPUs a job has"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: a Slurm allocation, taskset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class TorchThreads(Callback):
    """Sets torch's intra-op threads when each job starts, in the job's own process, so that jobs running
    side by side on one machine share its cores instead of each starting one thread per core (N jobs x
    all cores threads run slower than N jobs x cores/N). ``num_threads``: ``auto`` (see ``job_threads``),
    a number, or null (leave torch's default)."""

    def __init__(self, num_threads: int | str | None = "auto") -> None:
        if num_threads not in (None, "auto") and not (str(num_threads).isdigit() and int(num_threads) > 0):
            raise ConfigError(
                f"hydra.callbacks.torch_threads.num_threads must be auto, null or a positive integer, "
                f"got {num_threads!r}."
            )
        self.num_threads = num_threads

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = OmegaConf.select(config, "hydra.launcher")  # read key by key: the rest may not resolve here
        threads, why = job_threads(launcher, self.num_threads, available_cores())
        if threads is None:
            return
        import torch

        torch.set_num_threads(threads)
        log.info(f"torch threads for this job: {torch.get_num_threads()} ({why})")
