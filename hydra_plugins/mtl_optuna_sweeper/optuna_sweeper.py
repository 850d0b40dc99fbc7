"""``hydra/sweeper=mtl_optuna``: a Hydra sweeper that runs an Optuna study, one trial per Hydra job.

Why our own plugin: hydra-optuna-sweeper 1.3.0 (the latest) pins ``optuna<3``, and Optuna 2.10's database
storage fails on SQLAlchemy 2 (``AssertionError`` in ``get_current_version``), which MLflow needs, so it
cannot give a persistent study. This one asks and tells current Optuna (``>=5``) directly.

The search space uses Hydra's sweep syntax (``hydra.sweeper.params`` plus any sweep on the command line):
``choice(a, b)``, ``range(lo, hi, step)``, ``interval(lo, hi)``, ``tag(log, interval(lo, hi))``,
``tag(int, interval(lo, hi))``; every other override is applied to every trial. Each trial's ``train()``
return value (the best validation ``optimized_metric``) is told to the study; a trial that raises or returns
None/NaN is recorded as FAIL and the study goes on. ``storage: sqlite:///optuna.db`` (relative to the
launch directory) keeps the study, and the next invocation with the same ``study_name`` continues it with
``n_trials`` more. The best trial is written to ``<sweep dir>/optimization_results.yaml`` and logged on
the sweep's MLflow parent run.

This module only registers the config and imports nothing heavy: Hydra imports every plugin module on
every start, so Optuna is imported (in ``_impl.py``) only when a sweep uses this sweeper.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules before adding them to sys.modules,
# and dataclasses cannot resolve string annotations of a module that is not there.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class MTLOptunaSweeperConf:
    _target_: str = "hydra_plugins.mtl_optuna_sweeper.optuna_sweeper.MTLOptunaSweeper"
    # maximize | minimize (or max | min); auto: from optimized_metric, as the trials derive optimized_mode
    direction: str = "${optimized_mode}"
    # name of the study in `storage`; the same name in the same storage continues the study
    study_name: str | None = None
    # null: in memory (lost at exit); sqlite:///optuna.db: a file in the launch directory, resumable
    storage: str | None = None
    # trials to run in this invocation (a resumed study gets n_trials more)
    n_trials: int = 20
    # trials asked and launched together (run in parallel by a parallel launcher, e.g. joblib)
    n_jobs: int = 1
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": "${seed}"})
    # {config key: Hydra sweep}, e.g. {optimizer.lr: "tag(log, interval(1e-4, 1e-2))"}
    params: dict[str, Any] | None = None
    # trials evaluated first, e.g. [{optimizer.lr: 0.001}] (the untuned default); skipped if already in the study
    enqueue_trials: list[Any] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper", name="mtl_optuna", node=MTLOptunaSweeperConf, provider="mtl_optuna_sweeper"
)


class MTLOptunaSweeper(Sweeper):
    """The Hydra plugin; the study itself is ``_impl.OptunaStudySweep``."""

    def __init__(self, **kwargs: Any) -> None:
        from hydra_plugins.mtl_optuna_sweeper._impl import OptunaStudySweep

        self._impl = OptunaStudySweep(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self._impl.sweep(arguments)
