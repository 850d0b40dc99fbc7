"""Optuna hyper-parameter search (``hydra/sweeper=mtl_optuna``, ``conf/hparams_search/``): the search space in
Hydra's sweep syntax, trials as Hydra jobs and MLflow child runs, a persistent study that resumes, and
failed trials that do not end the study."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.mtl_optuna_sweeper._impl import (
    RESULTS_FILE,
    OptunaStudySweep,
    in_space,
    job_value,
    parse_search_space,
    resolve_direction,
    storage_for_display,
    trial_overrides,
)
from mtl_experiments import tracking
from mtl_experiments.errors import ConfigError
from mtl_experiments.pipeline import build
from tests.conftest import ROOT, TINY, compose_cfg, options

# TINY, shortened: one epoch on 800 samples still trains, validates, checkpoints and tests
TRIAL = [*TINY, "data.num_samples=800", "trainer.max_epochs=1"]
METRIC = "val_best/mean_auroc"  # what each run logs; the trial's value is the same number


def multirun(cwd: Path, *overrides: str, sweep_dir: str, entry: str = "train.py") -> subprocess.CompletedProcess:
    """``python train.py -m ...`` (or the installed ``mtl-train``) launched from ``cwd``: its default MLflow store
    is ``cwd/mlflow.db``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_RUN_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    script = [str(Path(sys.executable).with_name(entry))]  # a console script installed next to python
    if entry == "train.py":
        script = [sys.executable, str(ROOT / "train.py")]
    cmd = [*script, "-m", *overrides, *TRIAL, f"hydra.sweep.dir={cwd / sweep_dir}"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def sweep_runs(uri: str) -> dict[str, list]:
    """``{parent run id: [child runs]}`` of every sweep in the store."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == tracking.SWEEP_PARENT]
    return {p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id] for p in parents}


def run_of(trial, children):
    """The child run that trained ``trial``: the one whose logged config has the trial's values."""
    matches = [c for c in children if all(float(c.data.params[k]) == v for k, v in trial.params.items())]
    assert len(matches) == 1, (trial.params, [c.data.params.get("optimizer.lr") for c in children])
    return matches[0]


# ------------------------------------------------------------------------------------- search space


def test_search_space_from_hydra_sweep_syntax():
    space, fixed = parse_search_space(
        [
            "loss.weights.y2=tag(log, interval(0.1, 10.0))",
            "optimizer.lr=interval(1e-4, 1e-2)",
            "backbone=choice(mmoe, shared_bottom)",
            "backbone.num_experts=range(2, 9, 2)",
            "data.correlation=range(0.0, 1.0, 0.25)",
            "features.embedding_dim=tag(int, log, interval(4, 64))",
            "hparams_search=fixed_weights",
            "~callbacks.progress_bar",
            "optimizer.lr=tag(log, interval(1e-5, 1e-1))",  # later (the command line) replaces earlier (params)
            "run_name='a b'",
        ]
    )
    assert space == {
        "loss.weights.y2": FloatDistribution(0.1, 10.0, log=True),
        "backbone": CategoricalDistribution(["mmoe", "shared_bottom"]),
        "backbone.num_experts": IntDistribution(2, 8, step=2),  # range() excludes its stop, like Python's
        "data.correlation": FloatDistribution(0.0, 0.75, step=0.25),
        "features.embedding_dim": IntDistribution(4, 64, log=True),
        "optimizer.lr": FloatDistribution(1e-5, 1e-1, log=True),
    }
    # fixed overrides go to every trial verbatim, a removal (~) included
    assert fixed == ["hparams_search=fixed_weights", "~callbacks.progress_bar", "run_name='a b'"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=tag(log, interval(0.0, 1e-2))", "optimizer.lr"),  # log scale from 0
        ("optimizer.lr=interval(1e-2, 1e-4)", "optimizer.lr"),  # low > high
        ("loss.weights=choice({y1: 1.0}, {y1: 2.0})", "loss.weights.y2=interval"),  # dicts: not a categorical
        ("backbone.num_experts=range(5, 2)", "empty range"),
        ("optimizer.lr=interval(1e-4", "Invalid search space"),  # not Hydra's syntax
    ],
)
def test_bad_search_space_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_search_space([override])


def test_trial_overrides_parse_back_to_the_sampled_values():
    params = {"optimizer.lr": 1.2345678901234567e-05, "loss.weights.y2": 3.0, "flag": True, "name": "a b=c", "n": 7}
    overrides = trial_overrides(["hparams_search=fixed_weights"], params)
    assert overrides[0] == "hparams_search=fixed_weights"
    parsed = OverridesParser.create().parse_overrides(overrides[1:])
    assert {o.get_key_element(): o.value() for o in parsed} == params


def test_enqueued_values_must_lie_in_the_space():
    space, _ = parse_search_space(["optimizer.lr=tag(log, interval(1e-4, 1e-2))", "loss=choice(equal, fixed)"])
    assert in_space({"optimizer.lr": 1e-3, "loss": "fixed"}, space)
    assert in_space({"optimizer.lr": 1e-3}, space)  # the others are sampled
    assert not in_space({"optimizer.lr": 0.1}, space)
    assert not in_space({"loss": "famo"}, space)
    assert not in_space({"optimizer.momentum": 0.9}, space)


def test_job_value_fails_exceptions_none_and_nan():
    def job(status, value):
        ret = JobReturn(status=status)
        ret.return_value = value
        return ret

    assert job_value(job(JobStatus.COMPLETED, 0.75)) == (0.75, None)
    error = ValueError("Invalid learning rate: -1.0")
    assert job_value(job(JobStatus.FAILED, error)) == (None, error)
    for bad in (None, float("nan"), float("inf"), "x"):
        value, why = job_value(job(JobStatus.COMPLETED, bad))
        assert value is None and "returned" in why


def test_storage_password_is_not_shown():
    assert storage_for_display("postgresql://alice:s3cret@db:5432/optuna") == "postgresql://alice:***@db:5432/optuna"
    assert storage_for_display("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert storage_for_display(None) == "in memory"


@pytest.mark.parametrize(
    ("overrides", "direction", "expected"),
    [
        ([], "${optimized_mode}", "maximize"),  # val/mean_auroc: higher is better
        (["optimized_metric=val/loss"], "auto", "minimize"),
        (["data.tasks.y2.kind=regression", "optimized_metric=val/y2/mse"], "min", "minimize"),
        (["optimized_mode=max"], "${optimized_mode}", "maximize"),
    ],
)
def test_direction_follows_the_optimized_metric(overrides, direction, expected):
    cfg = compose_cfg([*overrides, "hparams_search=lr", f"hydra.sweeper.direction={direction}"])
    assert resolve_direction(cfg.hydra.sweeper.direction, cfg) == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hydra.sweeper.direction=minimize"], "contradicts val/mean_auroc"),
        (["optimized_metric=val/y3/auroc"], "is not logged by this run"),
        (["hydra.sweeper.direction=up"], "use maximize, minimize"),
    ],
)
def test_direction_errors(overrides, message):
    cfg = compose_cfg(["hparams_search=lr", *overrides])
    with pytest.raises(ConfigError, match=message):
        resolve_direction(cfg.hydra.sweeper.direction, cfg)


@pytest.mark.parametrize("name", options("hparams_search"))
def test_hparams_search_config_composes_and_its_trials_build(name):
    """Every conf/hparams_search/*.yaml: our sweeper, a search space over keys that exist, enqueued trials
    inside it, a resolved study name, and a trial's config that composes and builds its loss and optimizer."""
    cfg = compose_cfg([f"hparams_search={name}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.mtl_optuna_sweeper.optuna_sweeper.MTLOptunaSweeper"
    space, fixed = parse_search_space([f"{k}={v}" for k, v in sweeper.params.items()])
    assert space and not fixed
    assert "${" not in sweeper.study_name and sweeper.storage is None  # in memory unless asked
    assert resolve_direction(sweeper.direction, cfg) == "maximize"
    OptunaStudySweep(**{k: v for k, v in sweeper.items() if k not in ("_target_", "sampler")})
    for trial in sweeper.enqueue_trials:
        assert in_space(dict(trial), space), trial
    sample = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask(space).params
    trial_cfg = compose_cfg([f"hparams_search={name}", *trial_overrides([], sample)])
    for key, value in sample.items():
        assert OmegaConf.select(trial_cfg, key, throw_on_missing=True) == value, key
    tasks = build(trial_cfg, "data").tasks
    build(trial_cfg, "loss").setup(tasks)  # e.g. loss.weights names only tasks that exist


# ----------------------------------------------------------------------------------- real sweeps


def test_study_trials_are_child_runs_and_a_persistent_study_resumes(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_args = ["hparams_search=fixed_weights", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=t"]
    proc = multirun(tmp_path, *study_args, "hydra.sweeper.n_trials=3", sweep_dir="sweep1")
    assert proc.returncode == 0, proc.stderr[-4000:]

    study = optuna.load_study(study_name="t", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.trials[0].params == {"loss.weights.y2": 1.0, "optimizer.lr": 0.001}  # the enqueued default
    uri = f"sqlite:///{tmp_path / tracking.DEFAULT_DB}"
    ((parent_id, children),) = sweep_runs(uri).items()
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    for trial in study.trials:  # each trial is its own run, and its value is that run's best validation metric
        run = run_of(trial, children)
        assert math.isclose(trial.value, run.data.metrics[METRIC], rel_tol=1e-6)
        assert run.data.params["loss._target_"] == "mtl_experiments.loss.fixed.Fixed"

    results = yaml.safe_load((tmp_path / "sweep1" / RESULTS_FILE).read_text())
    best = max(study.trials, key=lambda t: t.value)
    assert results["best_trial"] == best.number and results["best_params"] == best.params
    assert math.isclose(results["best_value"], best.value) and results["direction"] == "maximize"
    assert results["trials"]["complete"] == 3 and results["this_sweep"] == [0, 1, 2]
    parent = MlflowClient(uri).get_run(parent_id)
    assert math.isclose(parent.data.metrics["best_value"], best.value)
    assert float(parent.data.params["best.optimizer.lr"]) == best.params["optimizer.lr"]
    assert parent.data.params["optuna.storage"] == storage
    assert parent.data.params["sweep.optimizer.lr"] == "tag(log, interval(1e-4, 1e-2))"

    # a second invocation continues the study: 2 more trials, the enqueued default not repeated
    proc = multirun(tmp_path, *study_args, "hydra.sweeper.n_trials=2", sweep_dir="sweep2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = optuna.load_study(study_name="t", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    assert sum(t.params["optimizer.lr"] == 0.001 for t in study.trials) == 1
    results = yaml.safe_load((tmp_path / "sweep2" / RESULTS_FILE).read_text())
    assert results["this_sweep"] == [3, 4] and results["trials"]["complete"] == 5
    assert math.isclose(results["best_value"], study.best_value)
    sweeps = sweep_runs(uri)
    assert sorted(len(c) for c in sweeps.values()) == [2, 3]


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    """Trial 0 fails inside training (lr=1e6 diverges; module.divergence.action=stop ends it; a bad value such as
    lr=-1 is now refused by the config check before any run exists); the study records it FAIL, its run ends
    FAILED, and the next trials run. Launched through the installed ``mtl-train`` from outside the repository."""
    proc = multirun(
        tmp_path,
        "hparams_search=lr",
        "module.divergence.action=stop",
        "optimizer.lr=choice(1000000.0, 0.01)",
        "hydra.sweeper.enqueue_trials=[{optimizer.lr: 1000000.0, optimizer.weight_decay: 0.0}, {optimizer.lr: 0.01}]",
        "hydra.sweeper.n_trials=3",
        sweep_dir="sweep",
        entry="mtl-train",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Trial 0 failed: Training diverged at step" in proc.stdout  # Hydra's log
    results = yaml.safe_load((tmp_path / "sweep" / RESULTS_FILE).read_text())
    assert results["this_sweep"] == [0, 1, 2] and results["trials"]["fail"] + results["trials"]["complete"] == 3
    assert results["best_trial"] != 0 and results["best_params"]["optimizer.lr"] == 0.01
    ((_, children),) = sweep_runs(f"sqlite:///{tmp_path / tracking.DEFAULT_DB}").items()
    by_lr = {}
    for child in children:
        by_lr.setdefault(float(child.data.params["optimizer.lr"]), set()).add(child.info.status)
    assert by_lr[1e6] == {"FAILED"} and by_lr[0.01] == {"FINISHED"}


def test_a_search_space_key_that_does_not_exist_stops_before_any_trial(tmp_path):
    proc = multirun(tmp_path, "hparams_search=lr", "optimizer.lrr=interval(1e-4, 1e-2)", "logger=csv", sweep_dir="s")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Error: A trial's overrides do not compose" in proc.stderr and "optimizer.lrr" in proc.stderr
    assert not (tmp_path / "s").exists()  # no job ran, no results
