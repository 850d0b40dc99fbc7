"""The Optuna study behind ``hydra/sweeper=mtl_optuna``: ask a batch of trials, launch them as Hydra jobs, tell
each job's return value. Ask-and-tell (rather than ``study.optimize``) keeps Hydra's launcher in charge of
where jobs run, so any launcher (basic, joblib, submitit) runs the trials.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from mtl_experiments.errors import ConfigError, MTLError

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"
_DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
_PARAM_CHARS = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in a param name (e.g. '@' of a package)


# ------------------------------------------------------------------------------------------ search space


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one Hydra sweep: ``choice(a, b)`` -> categorical; ``range(lo, hi, step)``
    -> int (or float) values lo, lo+step, ... < hi; ``interval(lo, hi)`` -> float in [lo, hi];
    ``tag(log, ...)`` samples an interval on a log scale, ``tag(int, interval(lo, hi))`` samples integers."""
    text = override.input_line
    sweep = override.value()
    tags = set(getattr(sweep, "tags", None) or ())
    try:
        if override.is_choice_sweep():
            choices = list(override.sweep_iterator())
            if any(c is not None and not isinstance(c, (str, int, float, bool)) for c in choices):
                raise ConfigError(
                    f"{text}: choice() over lists or dicts is not supported by the Optuna sweeper; "
                    f"search each entry separately (e.g. loss.weights.y2=interval(0.1, 10))."
                )
            return CategoricalDistribution(choices)
        if override.is_range_sweep():
            values = list(override.sweep_iterator())
            if not values:
                raise ConfigError(f"{text} is an empty range: it must contain at least one value.")
            step = abs(sweep.step)
            if all(isinstance(v, int) and not isinstance(v, bool) for v in [*values, step]):
                return IntDistribution(min(values), max(values), step=step)
            return FloatDistribution(min(values), max(values), step=step)
        if override.is_interval_sweep():
            if "int" in tags:
                return IntDistribution(math.ceil(sweep.start), math.floor(sweep.end), log="log" in tags)
            return FloatDistribution(sweep.start, sweep.end, log="log" in tags)
    except ConfigError:
        raise
    except ValueError as e:  # Optuna's own checks: low > high, log scale with low <= 0, ...
        raise ConfigError(f"Invalid search space {text}: {e}") from e
    raise ConfigError(f"{text}: the Optuna sweeper supports choice(), range() and interval() sweeps.")


def parse_search_space(overrides: Sequence[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Override strings -> (``{key: distribution}`` of the sweeps, every other override verbatim). A later
    override of a key replaces an earlier one, so the command line wins over ``hydra.sweeper.params``."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(f"Invalid search space: {e}") from e
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in parsed:
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.input_line or f"{key}={override.get_value_element_as_str()}"
    return space, list(fixed.values())


def trial_overrides(fixed: Sequence[str], params: Mapping[str, Any]) -> list[str]:
    """A trial's job overrides: the fixed ones, then its sampled values in Hydra's override syntax."""
    return [*fixed, *(f"{key}={Override._get_value_element_as_str(value)}" for key, value in params.items())]


def in_space(params: Mapping[str, Any], space: Mapping[str, BaseDistribution]) -> bool:
    """Whether every value lies in its key's distribution (keys left out are sampled)."""

    def inside(d: BaseDistribution, v: Any) -> bool:
        if isinstance(d, CategoricalDistribution):
            return v in d.choices
        return isinstance(v, (int, float)) and not isinstance(v, bool) and d.low <= v <= d.high

    return set(params) <= set(space) and all(inside(space[k], v) for k, v in params.items())


# -------------------------------------------------------------------------------------------- direction


def resolve_direction(direction: str, config: DictConfig) -> str:
    """Optuna's "maximize" / "minimize" for ``direction`` (maximize|minimize|max|min|auto). ``auto``, and the
    check of an explicit value, come from ``optimized_metric`` exactly as each trial derives its ``optimized_mode``
    (``pipeline.resolve_optimized_metric`` over the data config's tasks), so a typo'd metric or a contradicting
    direction fails here, before any trial runs."""
    wanted = str(direction).lower()
    if wanted != "auto" and wanted not in _DIRECTIONS:
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: use maximize, minimize (max, min) or auto.")
    if OmegaConf.select(config, "optimized_metric") is None:
        if wanted == "auto":
            raise ConfigError("hydra.sweeper.direction=auto needs optimized_metric; or set maximize / minimize.")
        return _DIRECTIONS[wanted]
    from mtl_experiments.pipeline import build, resolve_optimized_metric

    cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    with open_dict(cfg):
        cfg.optimized_mode = "auto"
    mode = resolve_optimized_metric(cfg, build(cfg, "data").tasks)
    if wanted != "auto" and _DIRECTIONS[wanted] != _DIRECTIONS[mode]:
        raise ConfigError(
            f"hydra.sweeper.direction={direction!r} (default: optimized_mode) contradicts {cfg.optimized_metric}, "
            f"for which {'higher' if mode == 'max' else 'lower'} is better; leave optimized_mode=auto."
        )
    return _DIRECTIONS[mode]


# ----------------------------------------------------------------------------------------------- sweep


def job_value(ret: JobReturn) -> tuple[float | None, BaseException | str | None]:
    """(the job's objective value, None) or (None, why the trial failed)."""
    try:
        value = ret.return_value  # re-raises the job's exception (Hydra also prints its overrides)
    except Exception as e:  # noqa: BLE001 - any job failure is one failed trial
        return None, e
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None, f"the job returned {value!r}, not a number (is a checkpoint callback monitoring the metric?)"
    if not math.isfinite(value):
        return None, f"the job returned {value}"
    return value, None


def storage_for_display(storage: str | None) -> str:
    """The storage URL without its password (it lands in logs, the results file and MLflow)."""
    if not storage:
        return "in memory"
    try:
        from sqlalchemy.engine import make_url

        return make_url(storage).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show its scheme only
        return storage.split("://", 1)[0] + "://***"


class OptunaStudySweep:
    def __init__(
        self,
        direction: str = "auto",
        study_name: str | None = None,
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: optuna.samplers.BaseSampler | None = None,
        params: Mapping[str, Any] | None = None,
        enqueue_trials: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.direction = direction
        self.study_name = study_name
        self.storage = str(storage) if storage else None
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.sampler = sampler
        self.params = dict(params or {})
        self.enqueue_trials = [dict(t) for t in enqueue_trials or ()]
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> list[FrozenTrial]:
        try:
            study, ran = self._run(arguments)
        except MTLError as e:  # a bad search space or storage: one line, like a bad config of a single run
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(2)
        if ran and not any(t.state == TrialState.COMPLETE for t in ran):
            print(f"Error: all {len(ran)} trials of this sweep failed; see the log above.", file=sys.stderr)
            sys.exit(1)  # the sweep's MLflow parent run ends FAILED (sweep.py's exit handler)
        return ran

    # -- steps -------------------------------------------------------------------------------------
    def _run(self, arguments: list[str]) -> tuple[optuna.Study, list[FrozenTrial]]:
        if self.n_trials < 0 or self.n_jobs < 1:
            raise ConfigError("hydra.sweeper.n_trials must be >= 0 and hydra.sweeper.n_jobs >= 1.")
        params = [f"{key}={value}" for key, value in self.params.items()]
        space, fixed = parse_search_space([*params, *arguments])
        if not space:
            raise ConfigError(
                "Nothing to search: give hydra.sweeper.params (e.g. hparams_search=fixed_weights) or a sweep "
                "on the command line, e.g. 'optimizer.lr=tag(log, interval(1e-4, 1e-2))'."
            )
        # one trial's config must compose (a typo'd key fails here, not in every trial)
        self._check_composes(fixed, {k: _a_value(d) for k, d in space.items()})
        direction = resolve_direction(self.direction, self.config)
        study = self._study(direction, space)

        ran: list[FrozenTrial] = []
        while len(ran) < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - len(ran)))]
            ran += self._launch(study, trials, fixed)
        self._report(study, direction, ran)
        return study, ran

    def _check_composes(self, fixed: list[str], params: Mapping[str, Any]) -> None:
        overrides = trial_overrides(fixed, params)
        try:
            self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(f"A trial's overrides do not compose ({' '.join(overrides)}): {e}") from e

    def _study(self, direction: str, space: Mapping[str, BaseDistribution]) -> optuna.Study:
        shown = storage_for_display(self.storage)
        if self.storage and self.storage.startswith("sqlite:///"):
            path = self.storage[len("sqlite:///") :]  # relative: to the launch directory (hydra.job.chdir=false)
            if path and path != ":memory:":
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage,
                sampler=self.sampler,
                direction=direction,
                load_if_exists=True,
            )
        except Exception as e:  # noqa: BLE001 - a bad URL, an unreachable database, a direction mismatch
            raise ConfigError(f"Optuna study {self.study_name!r} in {shown}: {e}") from e
        if study.direction.name.lower() != direction:
            raise ConfigError(
                f"Optuna study {self.study_name!r} in {shown} was created to {study.direction.name.lower()}, "
                f"this sweep would {direction}; use another hydra.sweeper.study_name."
            )
        previous = study.get_trials(deepcopy=False)
        if previous:
            log.info(f"Continuing Optuna study {study.study_name!r} ({shown}): {len(previous)} trials so far")
            stale = [t.number for t in previous if t.state == TrialState.RUNNING]
            if stale:
                log.warning(f"Trials {stale} are still RUNNING in the study (an earlier sweep that died?)")
        else:
            log.info(f"Optuna study {study.study_name!r} ({shown}), {direction} {self._metric()}")
        for values in self.enqueue_trials:
            if not in_space(values, space):
                raise ConfigError(
                    f"hydra.sweeper.enqueue_trials entry {values} must give a value inside the search space for "
                    f"each of {sorted(space)}."
                )
            study.enqueue_trial(values, skip_if_exists=True)
        return study

    def _launch(self, study: optuna.Study, trials: list[Trial], fixed: list[str]) -> list[FrozenTrial]:
        overrides = [trial_overrides(fixed, t.params) for t in trials]
        pending = {t.number: t for t in trials}
        try:
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ovr, ret in zip(trials, overrides, returns, strict=True):
                value, error = job_value(ret)
                trial.set_user_attr("overrides", ovr)
                if ret.hydra_cfg is not None:  # where the job's log, config and checkpoints are
                    trial.set_user_attr("output_dir", str(ret.hydra_cfg.hydra.runtime.output_dir))
                if error is None:
                    study.tell(trial, value)
                else:
                    trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
                    study.tell(trial, state=TrialState.FAIL)
                    detail = isinstance(error, BaseException) and not isinstance(error, MTLError)
                    log.warning(
                        f"Trial {trial.number} failed: {error}",
                        exc_info=(type(error), error, error.__traceback__) if detail else None,
                    )
                pending.pop(trial.number)
        finally:  # Ctrl-C or a launcher error: close the trials, so a resumed study does not count them RUNNING
            for trial in pending.values():
                study.tell(trial, state=TrialState.FAIL)
        all_trials = study.get_trials(deepcopy=False)
        done = [all_trials[t.number] for t in trials]
        for t in done:
            shown = f"{t.value:.6g}" if t.state == TrialState.COMPLETE else t.state.name
            log.info(f"Trial {t.number}: {shown} {t.params}")
        return done

    def _metric(self) -> str:
        return str(OmegaConf.select(self.config, "optimized_metric") or "the objective")

    def _report(self, study: optuna.Study, direction: str, ran: list[FrozenTrial]) -> None:
        """``optimization_results.yaml`` in the sweep directory, the log, and the sweep's MLflow parent run."""
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        results = {
            "name": "mtl_optuna",
            "study_name": study.study_name,
            "storage": storage_for_display(self.storage),
            "metric": self._metric(),
            "direction": direction,
            "best_trial": best.number if best else None,
            "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else None,
            "best_overrides": best.user_attrs.get("overrides") if best else None,
            "trials": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState},
            "this_sweep": [t.number for t in ran],
        }
        path = Path(str(self.config.hydra.sweep.dir)) / RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)
        if best is None:
            log.warning(f"No trial of study {study.study_name!r} completed; results in {path}")
        else:
            log.info(
                f"Best trial {best.number} of {len(trials)}: {results['metric']} = {best.value:.6g} "
                f"with {' '.join(trial_overrides([], best.params))}  ({path})"
            )
        try:
            log_to_parent_run(self.config, results, path)
        except Exception as e:  # noqa: BLE001 - the study and the results file are what matter
            log.warning(f"Could not log the study's results on the sweep's MLflow parent run: {e}")


def _a_value(d: BaseDistribution) -> Any:
    """A value inside ``d``, to check that a trial's overrides compose before the study starts."""
    return d.choices[0] if isinstance(d, CategoricalDistribution) else d.low


def log_to_parent_run(config: DictConfig, results: Mapping[str, Any], path: Path) -> None:
    """``best_value`` (metric), ``best.<key>`` (params), the trial counts and the results file on the sweep's
    MLflow parent run (created by ``mtl_experiments.sweep.MLflowSweepCallback``; none with logger=csv)."""
    from mtl_experiments import tracking

    parent = os.environ.get(tracking.PARENT_RUN_ENV)
    node = tracking.mlflow_logger_node(config)
    if not parent or node is None:
        return
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    launch = Path(str(OmegaConf.select(config, "hydra.runtime.cwd") or Path.cwd()))
    client = MlflowClient(tracking.resolve_tracking_uri(OmegaConf.select(node, "tracking_uri"), launch=launch))
    now = int(time.time() * 1000)
    metrics = [Metric(f"optuna/trials_{state}", n, now, 0) for state, n in results["trials"].items() if n]
    params = [
        Param("optuna.study_name", str(results["study_name"])),
        Param("optuna.storage", str(results["storage"])),
        Param("optuna.direction", str(results["direction"])),
    ]
    if results["best_value"] is not None:
        metrics.append(Metric("best_value", float(results["best_value"]), now, 0))
        metrics.append(Metric("best_trial", float(results["best_trial"]), now, 0))
        params += [Param(_PARAM_CHARS.sub("_", f"best.{k}"), str(v)[:6000]) for k, v in results["best_params"].items()]
    client.log_batch(parent, metrics=metrics, params=params)
    client.log_artifact(parent, str(path))
