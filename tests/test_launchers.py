"""Parallel launchers (joblib, submitit_local): every job lands as a child of the sweep's parent run in one
shared SQLite store, a failing job is recorded without losing the others, and each job's torch threads
follow what the launcher gives it (mtl_experiments/sweep.py: MLflowSweepCallback, TorchThreads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_experiments import compare
from mtl_experiments.errors import ConfigError
from mtl_experiments.sweep import FAILED_OVERRIDES_TAG, TorchThreads, available_cores, job_threads
from tests.conftest import compose_cfg
from tests.test_sweep import all_runs, multirun, summary_artifact


@pytest.mark.parametrize(
    ("launcher", "setting", "cores", "expected"),
    [
        ({"n_jobs": 2}, "auto", 8, 4),  # joblib: the machine's cores shared by the jobs running at once
        ({"n_jobs": -1}, "auto", 8, 1),  # joblib's -1: as many jobs as cores
        ({"n_jobs": -2}, "auto", 8, 1),  # all cores but one: 7 jobs
        ({"n_jobs": 3}, "auto", 2, 1),  # more jobs than cores: never 0 threads
        ({"cpus_per_task": 3, "gpus_per_node": None}, "auto", 64, 3),  # submitit: the job's reservation
        ({"ray": {"init": {"address": None}, "remote": {"num_cpus": 2}}}, "auto", 16, 2),
        ({"ray": {"init": {"address": None}, "remote": {}}}, "auto", 16, None),  # Ray's own default (1)
        ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, "auto", 8, None),
        ({"n_jobs": 2}, 3, 8, 3),  # a number wins
        ({"n_jobs": 2}, None, 8, None),  # null: torch's default
    ],
)
def test_job_threads(launcher, setting, cores, expected):
    assert job_threads(launcher, setting, cores)[0] == expected


def test_torch_threads_callback_sets_threads_at_job_start_and_rejects_bad_values():
    before = torch.get_num_threads()
    try:
        cfg = compose_cfg(["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"])
        TorchThreads("auto").on_job_start(cfg)
        assert torch.get_num_threads() == available_cores()
        TorchThreads(1).on_job_start(compose_cfg([]))  # basic launcher, explicit number
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        TorchThreads("auto").on_job_start(compose_cfg([]))  # basic launcher, auto: untouched
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="num_threads must be auto, null or a positive integer"):
        TorchThreads("many")


def job_log(tmp_path: Path, job: int) -> str:
    return (tmp_path / "sweep" / str(job) / "train.log").read_text()


@pytest.mark.slow
def test_joblib_parallel_jobs_share_the_store_and_a_failed_job_is_recorded(tmp_path):
    """3 jobs on 2 worker processes (n_jobs=2) against a store that does not exist yet: the sweep's parent
    run creates its schema before the workers start; the two good jobs land FINISHED, the NaN one FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = multirun(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=0.001,0.002,1e30")
    assert proc.returncode != 0  # the failed job fails the sweep, after every job ran
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in proc.stdout  # Hydra's log
    (parent,), children = all_runs(uri)
    assert parent.info.status == "FAILED"
    status = {c.data.params["optimizer.lr"]: c.info.status for c in children}
    assert status == {"0.001": "FINISHED", "0.002": "FINISHED", "1e+30": "FAILED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.tags[FAILED_OVERRIDES_TAG].startswith("optimizer.lr=1e+30 ")
    metrics = parent.data.metrics
    assert (metrics["sweep/jobs"], metrics["sweep/finished_jobs"], metrics["sweep/failed_jobs"]) == (3, 2, 1)
    (failed,) = summary_artifact(uri, parent.info.run_id)["failed"]
    assert failed["job"] == 2 and failed["status"] == "FAILED" and failed["error"]
    assert "failed job #2 [optimizer.lr=1e+30]" in proc.stderr
    # each worker process split the cores with the other one
    cores = available_cores()
    for job in range(3):
        assert f"torch threads for this job: {max(1, cores // 2)} ({cores} cores // n_jobs=2)" in job_log(tmp_path, job)


@pytest.mark.slow
def test_submitit_local_sweep_over_seeds_lands_and_groups_over_seeds(tmp_path):
    """`seed=range(2)`: 2 jobs, each its own process started by submitit (as on a Slurm node), each with the
    threads its cpus_per_task gives it; mtl-compare groups them as one configuration over 2 seeds."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = multirun(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "seed=range(2)",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # submitit's own job folders: the jobs ran through it
    (parent,), children = all_runs(uri)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.seed"] == "range(2)"
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert "2 job(s), 2 finished, 0 failed" in proc.stdout
    for job in range(2):
        assert "torch threads for this job: 1 (cpus_per_task=1)" in job_log(tmp_path, job)

    (group,) = compare.group_runs(compare.load_runs(uri, parent=parent.info.run_id).runs)
    assert group.seeds == ["0", "1"]
