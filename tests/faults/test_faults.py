"""Failures during a run: non-finite losses (stop / skip), non-finite parameters (no checkpoint written),
an unreachable tracking store at start (fails before data loading) and one that disappears mid-run (the
training finishes, the values wait in a local fallback, and reach the run when the store is back)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_experiments import tracking
from mtl_experiments.checkpoints import load
from mtl_experiments.errors import NonFiniteLossError, TrackingError
from mtl_experiments.pipeline import train
from tests.conftest import ROOT, MlflowServer, free_port

STEP_CHECKPOINTS = ["callbacks.last_checkpoint.every_n_train_steps=5", "callbacks.last_checkpoint.every_n_minutes=null"]


class PoisonLabels(pl.Callback):
    """Fault injection for tests: NaN labels for ``task`` in the training batches number ``batches``
    (counted over the whole run from 0), so exactly that task's loss is NaN there."""

    def __init__(self, task: str, batches: list[int]):
        self.task, self.batches = task, set(batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx in self.batches:
            batch["labels"][self.task].fill_(float("nan"))  # a gathered copy: the dataset is untouched


class BreakParameters(pl.Callback):
    """Fault injection for tests: a NaN weight after optimizer step ``step`` (an update that exploded)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.model.parameters()).view(-1)[0] = float("nan")


class KillServerAt(pl.Callback):
    """Fault injection for tests: SIGKILL the tracking server (process group ``pgid``) after step ``step``, once the
    values logged so far have landed: the logger's writer thread may still hold them (under load it lagged 8 steps
    behind), and the tests using this one check where the values logged after the outage go (writes queued or in
    flight at a kill: test_logger_flushes_its_buffer_when_the_server_is_back)."""

    def __init__(self, pgid: int, step: int):
        self.pgid, self.step = pgid, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            for logger in trainer.loggers:
                logger.flush()
            os.killpg(self.pgid, signal.SIGKILL)


def poison(task: str, batches: str) -> list[str]:
    return [
        "+callbacks.poison._target_=tests.faults.test_faults.PoisonLabels",
        f"+callbacks.poison.task={task}",
        f"+callbacks.poison.batches={batches}",
    ]


# -- non-finite losses and parameters ------------------------------------------------------------------
def test_nan_loss_stops_naming_the_task_and_step_and_keeps_the_last_good_checkpoint(make_cfg, mlflow_runs, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \{'y2': nan\} at step 13 \(epoch 0, batch 12"):
        train(make_cfg(*STEP_CHECKPOINTS, *poison("y2", "[12]")))
    (run,) = mlflow_runs()
    assert run.info.status == "FAILED"
    last = load(tmp_path / "out" / "checkpoints" / "last.ckpt")  # loads with weights_only=True
    assert last["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if isinstance(v, torch.Tensor))


def test_nan_loss_skip_counts_the_skipped_steps_and_finishes(make_cfg, mlflow_runs, tracking_uri, caplog):
    with caplog.at_level(logging.WARNING):
        train(make_cfg(*poison("y1", "[3,4,30]"), "module.nonfinite=skip", "trainer.max_epochs=2"))
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/nonfinite_skipped")
    assert max(m.value for m in history) == 3
    assert "Skipped step 4 (epoch 0, batch 3 of the epoch): non-finite loss for task(s) {'y1': nan}" in caplog.text
    assert run.data.metrics["test/y1/auroc"] > 0.7  # the skipped batches did not poison the model


def test_nan_loss_skip_stops_after_too_many_in_a_row(make_cfg, mlflow_runs):
    batches = str(list(range(5, 30)))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a non-finite loss"):
        train(make_cfg(*poison("y1", batches), "module.nonfinite=skip", "module.max_consecutive_nonfinite=3"))
    (run,) = mlflow_runs()
    assert run.info.status == "FAILED"


def test_non_finite_parameters_are_never_checkpointed(make_cfg, mlflow_runs, tmp_path):
    breaker = ["+callbacks.breaker._target_=tests.faults.test_faults.BreakParameters", "+callbacks.breaker.step=10"]
    with pytest.raises(NonFiniteLossError, match="became non-finite by step 10 although the loss was finite"):
        train(make_cfg(*STEP_CHECKPOINTS, *breaker))
    assert load(tmp_path / "out" / "checkpoints" / "last.ckpt")["global_step"] == 5  # not overwritten
    assert [r.info.status for r in mlflow_runs()] == ["FAILED"]


def test_bad_nonfinite_policy_is_a_config_error(make_cfg):
    from mtl_experiments.errors import ConfigError

    with pytest.raises(ConfigError, match="module.nonfinite must be one of"):
        train(make_cfg("module.nonfinite=ignore"))


# -- the tracking store --------------------------------------------------------------------------------
def test_unreachable_server_fails_before_data_is_loaded(make_cfg, monkeypatch, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the dataset's files do not exist either: the tracking error comes first, so no data was loaded
    cfg = make_cfg(
        "logger.mlflow.tracking_uri=null", "data=census_income", f"data.root={tmp_path / 'none'}", tiny=False
    )
    with pytest.raises(TrackingError, match=f"tracking server {uri} cannot be reached"):
        train(cfg)


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "server", free_port()).start()
    yield s
    s.stop()


@pytest.mark.slow
def test_server_lost_mid_run_training_finishes_and_the_values_are_replayed(
    server, make_cfg, monkeypatch, caplog, tmp_path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    killer = [
        "+callbacks.kill._target_=tests.faults.test_faults.KillServerAt",
        f"+callbacks.kill.pgid={server.proc.pid}",
        "+callbacks.kill.step=12",
    ]
    with caplog.at_level(logging.WARNING):
        best = train(make_cfg("logger.mlflow.tracking_uri=null", *killer))
    assert best is not None  # trained, validated, tested: the outage did not stop anything
    fallback = tmp_path / "out" / "mlflow_fallback"
    assert f"Training continues; metrics now go to {fallback}" in caplog.text
    assert f"python -m mtl_experiments.tracking replay {fallback}" in caplog.text
    assert "test/y1/auroc" in (fallback / "metrics.jsonl").read_text()

    server.start()  # the server comes back (same database)
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-experiments").experiment_id])
    assert run.info.status == "RUNNING"  # what the UI shows until the fallback is replayed
    before = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss/y1")]
    assert before and max(before) <= 12  # what was logged before the outage, nothing after it

    def replay() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mtl_experiments.tracking", "replay", str(fallback)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    done = replay()
    assert done.returncode == 0, done.stderr
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in sorted(client.get_metric_history(run.info.run_id, "train/loss/y1"), key=lambda m: m.step)]
    assert steps == list(range(4, 75, 5))  # every logged step once, before and after the outage
    assert "test/y1/auroc" in run.data.metrics and "val_best/mean_auroc" in run.data.metrics
    assert "Uploaded 0 metric values" in replay().stdout  # idempotent


@pytest.mark.slow
def test_credentials_in_the_tracking_uri_are_never_logged(server, make_cfg, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)  # restored after the test
    """A team server behind basic auth: user:password in the URI reach the server, never the run's record."""
    uri = server.uri.replace("http://", "http://alice:s3cret@")
    train(make_cfg(f"logger.mlflow.tracking_uri={uri}", "trainer.max_epochs=1"))
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-experiments").experiment_id])
    config = Path(client.download_artifacts(run.info.run_id, "config/config.yaml")).read_text()
    out = capsys.readouterr()
    logged = [*run.data.params.values(), *run.data.tags.values(), config, out.err, out.out]
    assert not any("s3cret" in str(text) for text in logged)
    # the checkpoints carry the run's config (mtl-recommend rebuilds the model from it): redacted too
    ckpts = list(Path(run.data.tags[tracking.CHECKPOINT_DIR_TAG]).glob("*.ckpt"))
    assert ckpts and not any(b"s3cret" in p.read_bytes() for p in ckpts)
    assert run.data.params["logger.mlflow.tracking_uri"] == server.uri.replace("http://", "http://***@")


@pytest.mark.slow
def test_logger_flushes_its_buffer_when_the_server_is_back(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # refused retries need not wait seconds
    tracking.ensure_experiment(server.uri, "flush")
    logger = tracking.ResilientMLFlowLogger(experiment_name="flush", tracking_uri=server.uri, retry_every_s=0)
    # the writes happen on the logger's writer thread: flush() waits for each before the server is stopped or the
    # logger's state is read
    logger.log_metrics({"a": 1.0}, step=0)
    logger.flush()
    server.stop()
    logger.log_metrics({"a": 2.0}, step=1)
    logger.flush()
    assert logger.offline and logger.unflushed == 1
    server.start()
    logger.log_metrics({"a": 3.0}, step=2)
    logger.flush()
    assert not logger.offline and logger.unflushed == 0
    history = MlflowClient(server.uri).get_metric_history(logger.run_id, "a")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert "were written to run" in logger.summary()
    # the server dies again, now with writes queued and one in flight (one test: each server start takes seconds)
    kill_while_writing(server, logger)


def kill_while_writing(server, logger) -> None:
    """Each value is in the store or in the fallback, in order; only the write in flight can be in both (the server
    may have committed it), and the logger's reconnection writes the rest without it: every value exactly once."""
    logged = []
    for step in range(3, 200):
        metrics = {f"m{i}": step + i / 10 for i in range(4)}
        logged += [(k, step, v) for k, v in metrics.items()]
        logger.log_metrics(metrics, step=step)  # a tight loop: the queue fills, log_metrics waits for room
        if step == 100:
            assert logger.queued > 0  # the kill finds writes queued
            server.stop()
    logger.flush()
    assert logger.offline
    lines = (logger.fallback_dir / "metrics.jsonl").read_text().splitlines()
    buffered = [(r["key"], r["step"], r["value"]) for r in map(json.loads, lines) if r["key"] != "a"]
    server.start()
    client = MlflowClient(server.uri)

    def stored() -> list[tuple]:
        return [
            (m.key, m.step, m.value)
            for k in sorted({r[0] for r in logged})
            for m in client.get_metric_history(logger.run_id, k)
        ]

    before = stored()
    assert len(set(before)) == len(before) and len(set(buffered)) == len(buffered)
    assert set(before) | set(buffered) == set(logged)  # nothing lost
    assert sorted(buffered, key=lambda r: (r[1], r[0])) == buffered  # in order
    both = set(before) & set(buffered)
    assert set(buffered[: len(both)]) == both  # only the first failed write can be in both
    assert logger.reconnect(force=True)
    assert sorted(stored()) == sorted(logged)  # every value exactly once
