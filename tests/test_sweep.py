"""Sweeps grouped in MLflow: a multirun's runs are the children of one parent run (mtl_experiments/sweep.py)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from mlflow.tracking import MlflowClient

from mtl_experiments import tracking
from mtl_experiments.pipeline import train
from mtl_experiments.sweep import FAILED_JOB_TAG, FAILED_OVERRIDES_TAG, SUMMARY_ARTIFACT, MLflowSweepCallback
from tests.conftest import ROOT, compose_cfg, fresh_store

# The smallest sweep job that still trains, validates, checkpoints and tests (about 2 s each).
SMALL = ["debug=fast", "data.num_samples=800", "data.input_dim=8", "trainer.max_epochs=1", "~callbacks.progress_bar"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multirun(tmp_path: Path, *overrides: str, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    """``python <repo>/train.py -m <overrides>`` launched from ``tmp_path`` (so the default store is there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_RUN_ENV)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, *SMALL, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def all_runs(uri: str) -> tuple[list, list]:
    """(parents, children) of every experiment in the store."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == tracking.SWEEP_PARENT]
    return parents, [r for r in runs if r not in parents]


def test_multirun_groups_its_runs_under_one_parent_in_the_default_store(tmp_path):
    proc = multirun(tmp_path, "loss=equal,fixed", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # parent and children share the launch directory's store: no other store appeared anywhere
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*.db")] == [Path(tracking.DEFAULT_DB)]
    uri = f"sqlite:///{tmp_path / tracking.DEFAULT_DB}"
    (parent,), children = all_runs(uri)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "synthetic: loss x seed (sweep)"  # its data and swept keys, then its folder
    assert parent.data.params["sweep.loss"] == "equal,fixed" and parent.data.params["sweep.seed"] == "0,1"
    assert parent.data.metrics["sweep/children"] == 4
    assert (parent.data.metrics["sweep/jobs"], parent.data.metrics["sweep/failed_jobs"]) == (4, 0)
    assert FAILED_OVERRIDES_TAG not in parent.data.tags
    assert "Sweep synthetic: loss x seed (sweep) FINISHED: 4 job(s), 4 finished, 0 failed" in proc.stdout
    assert "loss=equal,fixed seed=0,1" in parent.data.tags["overrides"]
    # it ends with the parent's link in the UI and the command that compares its runs
    pid = parent.info.run_id
    link = f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{pid}?workflowType=machine_learning"
    assert proc.stdout.rstrip().splitlines()[-2:] == [
        f"Sweep in the MLflow UI: {link}",
        f"Compare its runs: mtl-compare --tracking-uri {uri} --parent {pid[:8]}",
    ]

    assert len(children) == 4
    assert {c.info.experiment_id for c in children} == {parent.info.experiment_id}
    pid = parent.info.run_id
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == pid and tags["mtl.sweep_id"] == pid
        assert tags["backbone"] == "shared_bottom"
        assert f"loss={tags['loss']} seed={child.data.params['seed']} " in tags["overrides"] + " "
    assert sorted((c.data.tags["loss"], c.data.params["seed"]) for c in children) == [
        ("equal", "0"),
        ("equal", "1"),
        ("fixed", "0"),
        ("fixed", "1"),
    ]
    # each name leads with its swept values, then the rest
    assert sorted(c.info.run_name for c in children) == [
        f"s{seed} {loss} | synthetic-shared_bottom" for seed in (0, 1) for loss in ("equal", "fixed")
    ]


def summary_artifact(uri: str, run_id: str) -> dict:
    """The parent's ``sweep_summary.json``."""
    import json

    path = MlflowClient(uri).download_artifacts(run_id, SUMMARY_ARTIFACT)
    return json.loads(Path(path).read_text())


def test_failed_jobs_do_not_lose_the_others_and_are_summarised_on_the_parent(tmp_path, empty_store):
    """Basic launcher, 4 jobs: two fail before their run exists (resume= names no checkpoint: found after the config
    check, which refuses a sweep with a bad value whole, see the test below),
    one fails in training with a FAILED run (lr=1e30 makes the loss NaN at the first step), one finishes.
    Hydra runs every job of the batch, then re-raises the first failure (exit code != 0), so the parent
    is ended and summarised by the callback's atexit handler."""
    uri = fresh_store(empty_store, tmp_path / "env.db")
    missing = str(tmp_path / "none.ckpt")
    proc = multirun(tmp_path, f"resume={missing},null", "optimizer.lr=1e30,0.001", tracking_uri=uri)
    assert proc.returncode != 0
    assert f"resume={missing}: no such checkpoint file" in proc.stderr
    assert not (tmp_path / tracking.DEFAULT_DB).exists()  # the environment variable chose the store
    (parent,), children = all_runs(uri)
    assert parent.info.status == "FAILED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    # only the two valid configs made runs; the other jobs still ran after the failures
    status = {(c.data.params["resume"], c.data.params["optimizer.lr"]): c.info.status for c in children}
    assert status == {("None", "0.001"): "FINISHED", ("None", "1e+30"): "FAILED"}

    metrics = parent.data.metrics
    assert (metrics["sweep/jobs"], metrics["sweep/finished_jobs"], metrics["sweep/failed_jobs"]) == (4, 1, 3)
    assert (metrics["sweep/children"], metrics["sweep/failed_children"]) == (2, 1)
    job_tags = sorted(k for k in parent.data.tags if k.startswith(FAILED_JOB_TAG))
    assert job_tags == [f"{FAILED_JOB_TAG}{i}" for i in range(3)]
    failed_tag = parent.data.tags[FAILED_OVERRIDES_TAG]
    assert failed_tag.count(f"resume={missing}") == 2 and "resume=null optimizer.lr=1e+30" in failed_tag

    summary = summary_artifact(uri, parent.info.run_id)
    assert (summary["status"], summary["jobs"], summary["finished_jobs"], summary["failed_jobs"]) == ("FAILED", 4, 1, 3)
    by_job = {f["job"]: f for f in summary["failed"]}
    assert sorted(by_job) == [0, 1, 2]
    assert by_job[0]["run_id"] is None
    assert by_job[0]["error"].startswith(f"ConfigError: resume={missing}: no such checkpoint file")
    assert by_job[0]["swept"] == {"resume": missing, "optimizer.lr": "1e+30"}
    nan_run = next(c for c in children if c.info.status == "FAILED")
    assert (by_job[2]["run_id"], by_job[2]["status"]) == (nan_run.info.run_id, "FAILED") and by_job[2]["error"]
    (finished,) = summary["finished"]
    assert finished["status"] == "FINISHED" and "optimizer.lr=0.001" in finished["overrides"]
    # and on the console, at the end
    assert "Sweep synthetic: resume x lr (sweep) FAILED: 4 job(s), 1 finished, 3 failed" in proc.stderr
    assert "failed job #2 [resume=null optimizer.lr=1e+30] (run " in proc.stderr


def test_a_sweep_with_bad_values_is_refused_whole_before_any_run(tmp_path, empty_store):
    """Every job's config is checked before the parent run or any job exists: one line naming the first bad job's
    swept values and the key, exit code 2, nothing recorded in the (real, already created) SQLite store."""
    uri = fresh_store(empty_store, tmp_path / "env.db")
    MlflowClient(uri).create_experiment("mtl-experiments")
    proc = multirun(tmp_path, "optimizer.lr=fast,0.1", "seed=0,1", tracking_uri=uri)
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("Error:")]
    assert line.startswith("Error: sweep job [optimizer.lr=fast seed=0] (2 of 4 jobs have bad values; nothing was run)")
    assert "optimizer.lr must be a finite number > 0, got 'fast'" in line
    assert all_runs(uri) == ([], [])
    assert not (tmp_path / "sweep").exists() and not (tmp_path / tracking.DEFAULT_DB).exists()


def _sweep_cfg(tmp_path: Path, *overrides: str):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return compose_cfg([f"logger.mlflow.tracking_uri={uri}", f"hydra.sweep.dir={tmp_path / '12-00-00'}", *overrides])


def test_callback_ends_the_parent_and_restores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "outer")  # e.g. a sweep launched from a sweep's job
    cfg = _sweep_cfg(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    ok = MLflowSweepCallback()
    ok.on_multirun_start(cfg)
    pid = os.environ[tracking.PARENT_RUN_ENV]
    run = client.get_run(pid)
    assert (run.info.status, run.info.run_name) == ("RUNNING", "synthetic sweep (12-00-00)")
    ok.on_job_end(cfg, JobReturn(status=JobStatus.COMPLETED))
    ok.on_multirun_end(cfg)
    assert client.get_run(pid).info.status == "FINISHED"
    assert os.environ[tracking.PARENT_RUN_ENV] == "outer"

    failed = MLflowSweepCallback()
    failed.on_multirun_start(cfg)
    pid = os.environ[tracking.PARENT_RUN_ENV]
    # what a parallel launcher's worker gets: the callback pickled, without its store connection, and
    # maybe an environment without the parent's id, which the job's start sets again
    worker = pickle.loads(pickle.dumps(failed))
    assert worker._client is None and worker._parent_id == pid
    monkeypatch.delenv(tracking.PARENT_RUN_ENV)
    worker.on_job_start(cfg)
    assert os.environ[tracking.PARENT_RUN_ENV] == pid
    worker.on_job_end(cfg, JobReturn(overrides=["seed=7"], status=JobStatus.FAILED, _return_value=ValueError("bad")))
    assert client.get_run(pid).data.tags[f"{FAILED_JOB_TAG}0"]  # recorded by the worker, on the parent
    failed.on_multirun_end(cfg)
    run = client.get_run(pid)
    assert run.info.status == "FAILED"
    assert run.data.metrics["sweep/failed_jobs"] == 1 and run.data.tags[FAILED_OVERRIDES_TAG] == "seed=7"
    assert summary_artifact(client.tracking_uri, pid)["failed"][0]["error"] == "ValueError: bad"
    assert os.environ[tracking.PARENT_RUN_ENV] == "outer"

    crashed = MLflowSweepCallback()  # on_multirun_end never runs: the atexit handler ends it
    crashed.on_multirun_start(cfg)
    pid = os.environ[tracking.PARENT_RUN_ENV]
    crashed._end_at_exit()
    assert client.get_run(pid).info.status == "FAILED"
    assert os.environ[tracking.PARENT_RUN_ENV] == "outer"
    crashed.on_multirun_end(cfg)  # a second end is a no-op
    assert client.get_run(pid).info.status == "FAILED"


def test_callback_stops_an_untrackable_sweep_and_ignores_other_loggers(tmp_path, monkeypatch):
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    cfg = _sweep_cfg(tmp_path, f"logger.mlflow.tracking_uri=http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit) as exit_info:
        MLflowSweepCallback().on_multirun_start(cfg)
    assert exit_info.value.code == 2
    csv = compose_cfg(["logger=csv", f"hydra.sweep.dir={tmp_path / '12-00-00'}"])
    MLflowSweepCallback().on_multirun_start(csv)
    assert tracking.PARENT_RUN_ENV not in os.environ
    assert not (tmp_path / "mlflow.db").exists()


def test_single_run_has_no_parent_even_if_the_variable_leaked(make_cfg, mlflow_runs, monkeypatch):
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "0123456789abcdef")  # left over by a crashed in-process sweep
    train(make_cfg("trainer.max_epochs=1", "data.num_samples=800"))
    (run,) = mlflow_runs()
    assert "mlflow.parentRunId" not in run.data.tags and "mtl.sweep_id" not in run.data.tags
