"""Sweeps grouped in MLflow: a multirun's runs are the children of one parent run (mtl_experiments/sweep.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from mlflow.tracking import MlflowClient

from mtl_experiments import tracking
from mtl_experiments.pipeline import train
from mtl_experiments.sweep import MLflowSweepCallback
from tests.conftest import ROOT, compose_cfg

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
    assert parent.info.run_name == "sweep-sweep"
    assert parent.data.params["sweep.loss"] == "equal,fixed" and parent.data.params["sweep.seed"] == "0,1"
    assert parent.data.metrics["sweep/children"] == 4
    assert "loss=equal,fixed seed=0,1" in parent.data.tags["overrides"]

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


def test_a_failed_job_fails_the_parent(tmp_path):
    """data.correlation=2.0 fails config validation before its run exists. cli.py turns that error into
    exit code 2, which stops Hydra's basic launcher at once (it would continue after an ordinary
    exception and re-raise it at the end of the batch): the 0.5 job never runs, and the parent, never
    reaching on_multirun_end, is ended FAILED by the callback's atexit handler."""
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    proc = multirun(tmp_path, "data.correlation=2.0,0.5", tracking_uri=uri)
    assert proc.returncode != 0
    assert "data.correlation must lie in [-1, 1]" in proc.stderr
    (parent,), children = all_runs(uri)
    assert parent.info.status == "FAILED"
    assert not (tmp_path / tracking.DEFAULT_DB).exists()  # the environment variable chose the store
    # no run for the invalid job; any job that ran is a finished child
    assert all(c.data.params["data.correlation"] == "0.5" and c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)


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
    assert (run.info.status, run.info.run_name) == ("RUNNING", "sweep-12-00-00")
    ok.on_job_end(cfg, JobReturn(status=JobStatus.COMPLETED))
    ok.on_multirun_end(cfg)
    assert client.get_run(pid).info.status == "FINISHED"
    assert os.environ[tracking.PARENT_RUN_ENV] == "outer"

    failed = MLflowSweepCallback()
    failed.on_multirun_start(cfg)
    pid = os.environ[tracking.PARENT_RUN_ENV]
    failed.on_job_end(cfg, JobReturn(status=JobStatus.FAILED))
    failed.on_multirun_end(cfg)
    assert client.get_run(pid).info.status == "FAILED"

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
