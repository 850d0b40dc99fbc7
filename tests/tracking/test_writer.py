"""The MLflow writes off the training thread (issue 17): ``tracking.writer.BackgroundWriter`` (order, back-pressure,
failures) and ``ResilientMLFlowLogger`` on a real SQLite store (values in order after ``flush``, the status after
the values, a failure of the writer itself reported while training goes on). A server that dies mid-run:
tests/faults/test_faults.py."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from mtl_experiments import tracking
from mtl_experiments.tracking.writer import BackgroundWriter
from tests.conftest import fresh_store


def test_writer_keeps_the_order_and_hands_over_waiting_items_in_batches():
    written: list[list[int]] = []
    gate = threading.Event()

    def write(batch):
        gate.wait(10)  # the first batch waits, so the items put meanwhile queue up behind it
        written.append(list(batch))

    writer = BackgroundWriter(write, lambda e, b: None, max_items=100, batch_items=8)
    for i in range(20):
        writer.put(i)
    gate.set()
    writer.flush()
    assert [i for batch in written for i in batch] == list(range(20))
    assert len(written) < 20 and max(len(b) for b in written) <= 8  # waiting items went together, at most 8
    writer.close()
    assert not writer.alive()


def test_writer_queue_is_bounded_put_waits_for_room():
    gate, started = threading.Event(), threading.Event()

    def write(batch):
        started.set()
        gate.wait(10)

    writer = BackgroundWriter(write, lambda e, b: None, max_items=3, batch_items=1)
    writer.put(0)
    started.wait(10)  # item 0 is being written; 1, 2, 3 fill the queue
    producer = threading.Thread(target=lambda: [writer.put(i) for i in range(1, 6)])
    producer.start()
    producer.join(0.5)
    assert producer.is_alive() and writer.waiting == 4  # 3 queued + 1 in write(): item 4 waits for room
    gate.set()
    producer.join(10)
    writer.close()
    assert writer.waiting == 0


def test_an_exception_in_write_goes_to_on_error_and_the_next_items_are_still_written():
    written, errors = [], []

    def write(batch):
        if 1 in batch:
            raise OSError("disk full")
        written.extend(batch)

    writer = BackgroundWriter(write, lambda e, b: errors.append((str(e), list(b))), batch_items=1)
    for i in range(3):
        writer.put(i)
    writer.close()
    assert written == [0, 2] and errors == [("disk full", [1])]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_flush_writes_on_the_calling_thread_what_a_dead_writer_thread_left():
    written = []

    def write(batch):
        if batch == ["die"]:
            raise SystemExit  # not an Exception: ends the thread (what no write of ours raises)
        written.extend(batch)

    writer = BackgroundWriter(write, lambda e, b: None, batch_items=1)
    writer.put("die")
    while writer.alive():
        time.sleep(0.01)
    for i in range(3):
        writer.put(i)  # a new thread starts
    writer.close()
    assert written == [0, 1, 2]


def test_short_http_retries_hold_while_any_thread_is_inside():
    # the writer thread and the training thread overlap: the first one out must not take the variables away from
    # the other one's request (before: each removed what it had added, whoever was still inside)
    os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    inside, leave = threading.Event(), threading.Event()

    def other():
        with tracking.short_http_retries():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with tracking.short_http_retries():
        thread.start()
        inside.wait(10)
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == "2"  # the other thread is still inside
    leave.set()
    thread.join(10)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_store) -> str:
    """One SQLite store for this module's tests (a copy of conftest's empty store); each test its experiment."""
    return fresh_store(empty_store, tmp_path_factory.mktemp("store") / "mlflow.db")


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_values_land_in_order_after_flush_and_the_status_after_them(store):
    tracking_uri = store
    tracking.ensure_experiment(tracking_uri, "async")
    logger = tracking.ResilientMLFlowLogger(experiment_name="async", tracking_uri=tracking_uri)
    values = {step: {"a": step * 0.5, "b": -float(step)} for step in range(200)}
    for step, metrics in values.items():
        logger.log_metrics(metrics, step=step)
    logger.flush()
    assert logger.queued == 0 and logger.unflushed == 0
    assert history(tracking_uri, logger.run_id, "a") == [(s, v["a"]) for s, v in values.items()]
    assert history(tracking_uri, logger.run_id, "b") == [(s, v["b"]) for s, v in values.items()]
    logger.log_metrics({"c": 1.0}, step=200)
    logger.finalize("success")  # no flush: finalize drains the queue before the status
    run = MlflowClient(tracking_uri).get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["c"] == 1.0
    assert not logger.writing


@pytest.mark.parametrize("synchronous", [False, True])
def test_a_failure_of_the_writer_is_reported_and_training_goes_on(synchronous, store, tmp_path, caplog, monkeypatch):
    # MLflow's own asynchronous logging switched on for the process: our writes still learn of a failure at once
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    # the store refuses a value (MLflow's 250-character key limit) and the fallback folder cannot be written (a
    # path through a regular file): the values are neither in the store nor on disk
    (tmp_path / "a-file").write_text("")
    tracking_uri = store
    tracking.ensure_experiment(tracking_uri, f"broken-{synchronous}")
    logger = tracking.ResilientMLFlowLogger(
        experiment_name=f"broken-{synchronous}",
        tracking_uri=tracking_uri,
        fallback_dir=tmp_path / "a-file" / "fallback",
        synchronous=synchronous,
    )
    logger.log_metrics({"ok": 1.0}, step=0)
    logger.flush()  # in the store before the bad value (a batch written together fails together)
    with caplog.at_level(logging.ERROR):
        logger.log_metrics({"k" * 300: 2.0}, step=1)  # no exception: training goes on
        logger.log_metrics({"ok": 3.0}, step=2)
        logger.flush()
    assert logger.offline and len(logger.writer_errors) >= 1
    assert "Not a directory" in logger.writer_errors[0]
    assert caplog.text.count("The MLflow writer could not write") == len(logger.writer_errors)
    assert logger.unflushed == 2  # kept in memory, in order: nothing silently dropped
    assert "only in this process's memory" in logger.summary()
    assert history(tracking_uri, logger.run_id, "ok") == [(0, 1.0)]


@pytest.mark.parametrize(("key", "value"), [("synchronous", "maybe"), ("max_queued", 0)])
def test_bad_writer_settings_are_config_errors(key, value):
    from mtl_experiments.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^logger.mlflow.{key} must be .*, got {value!r}"):
        tracking.ResilientMLFlowLogger(experiment_name="x", tracking_uri="sqlite:////nonexistent/x.db", **{key: value})
