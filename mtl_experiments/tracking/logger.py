"""``ResilientMLFlowLogger``: Lightning's MLflow logger that neither dies with its store nor duplicates
resumed steps; the run's final status; ``replay`` of a fallback folder written during an outage."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError
from mtl_experiments.scrub import redact
from mtl_experiments.tracking.store import last_steps, short_http_retries
from mtl_experiments.tracking.writer import BackgroundWriter

log = logging.getLogger(__name__)


def mark_failed(logger, status: str = "FAILED") -> None:
    """End the run as FAILED (or KILLED) so no crashed run is left RUNNING or shown as FINISHED; nothing when no run
    was created (a run that never started leaves nothing behind). Only our logger knows that without creating one,
    and the pipeline always builds ours (a user's own MLFlowLogger subclass ends as Lightning ends it)."""
    if isinstance(logger, ResilientMLFlowLogger):
        logger.end(status)


def clean_key(key: str) -> str:
    return re.sub("[^a-zA-Z0-9_/. -]+", "", key)  # what Lightning's MLFlowLogger does to metric names


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` that writes off the training thread, neither dies with its tracking store nor
    duplicates resumed steps.

    - ``log_metrics`` only queues the values (with their step and the time of the call); one writer thread
      (``tracking.writer.BackgroundWriter``) writes them in order, as few ``log_batch`` calls as the queue allows,
      with the short HTTP retries of ``store.short_http_retries``. Every value stays pending with its data until
      the store has taken it. The queue holds at most ``max_queued`` calls (then ``log_metrics`` waits).
      ``flush()`` waits until everything queued is in the store or in the fallback folder; a checkpoint,
      ``finalize``, ``end`` (the run's status is written after its metrics) and artifact uploads flush first.
      ``synchronous=True``: the writes happen in ``log_metrics`` itself, as Lightning's logger does. MLflow's own
      asynchronous logging is never used: its failures arrive after the fact, too late for the fallback.
    - A write that fails (server gone, database locked, disk full) does not stop training: a warning
      names the store and the fallback folder, and this and every later value is appended to
      ``<fallback_dir>/metrics.jsonl`` (artifacts to ``<fallback_dir>/artifacts/``), in order. Every
      ``retry_every_s`` seconds the store is tried again; once it answers, the buffered values are
      written to the run (without the values of the failed write that the store did take: nothing twice) and
      logging continues there. ``finalize`` tries once more; what is still left is uploaded later with
      ``python -m mtl_experiments.tracking replay <fallback_dir>``. A failure of the writer itself (the fallback
      folder cannot be written either) is logged once per message, kept in ``writer_errors`` and in ``summary()``;
      the values stay in memory and reach the run if the store answers before the process ends.
    - ``resume_floor`` ({metric: last step already in the run}): values at or before those steps are
      not written again, so a run resumed from a checkpoint older than its last logged step keeps one
      value per (metric, step) and strictly increasing steps.
    """

    def __init__(
        self,
        *args: Any,
        fallback_dir: str | os.PathLike | None = None,
        retry_every_s: float = 30.0,
        resume_floor: Mapping[str, int] | None = None,
        synchronous: bool | None = None,
        max_queued: int = 256,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)  # synchronous is ours: MLflow's asynchronous logging is never switched on
        self.fallback_dir = Path(fallback_dir) if fallback_dir else None  # None: a temporary folder, if ever needed
        self.retry_every_s = float(retry_every_s)
        self.resume_floor = dict(resume_floor or {})
        self.synchronous = bool(
            checks.optional(checks.boolean, "logger.mlflow.synchronous", synchronous, hint="true, false or unset")
        )
        max_queued = checks.positive_int("logger.mlflow.max_queued", max_queued, hint="log_metrics calls, e.g. 256")
        self.offline_since: float | None = None  # wall time the store stopped answering (None: online)
        self.outages: list[dict[str, Any]] = []  # {"error", "start_step", "buffered", "flushed"} per outage
        self.writer_errors: list[str] = []  # distinct failures of the writer itself (values kept in memory)
        self._pending: list[dict[str, Any]] = []  # metric values not known to be in the store, in order
        self._in_flight: list[dict[str, Any]] = []  # the rows of the write that failed: the store may hold them
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._last_probe = 0.0
        self._final_status: str | None = None
        self._lock = threading.RLock()  # the writer thread's writes against the training thread's store calls
        self._writer = BackgroundWriter(self._write_batch, self._writer_failed, max_items=max_queued, name="mlflow")

    # -- state ----------------------------------------------------------------------------------------
    @property
    def offline(self) -> bool:
        return self.offline_since is not None

    @property
    def unflushed(self) -> int:
        """Metric values (and artifacts) not in the store: in the fallback folder (or, after a writer failure,
        only in memory). Exact after ``flush()``."""
        return len(self._pending) + len(self._pending_artifacts)

    @property
    def queued(self) -> int:
        """``log_metrics`` calls whose values the writer thread has not written yet."""
        return self._writer.waiting

    @property
    def writing(self) -> bool:
        """Whether the writer thread runs (from the first ``log_metrics`` until ``close``)."""
        return self._writer.alive()

    @property
    def started(self) -> bool:
        """Whether the MLflow run exists (created or continued); reading ``run_id`` would create it."""
        return self._run_id is not None

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    def flush(self) -> None:
        """Wait until every value logged so far is in the store or in the fallback folder."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and end the writer thread (the next ``log_metrics`` starts a new one)."""
        self._writer.close()

    def end(self, status: str = "FAILED") -> None:
        """Mark the run ``status`` now (FAILED / KILLED), after its queued values; while the store is away, in the
        fallback folder, for ``replay``. Never raises: the error that ended the run is the one to show."""
        if not self.started:
            return
        self.close()
        with self._lock:
            if self.offline and not self.reconnect(force=True):
                self._final_status = status
                self._write_status()
                return
            with contextlib.suppress(Exception), short_http_retries():
                self.experiment.set_terminated(self.run_id, status)

    def report_outages(self) -> None:
        """Say what happened to the store during the run (an outage, and where its values are): in the log and,
        when the store answers, as the run's tag ``mtl.tracking_outages``."""
        self.close()
        with self._lock:
            self.reconnect(force=True)
            message = self.summary()
            if message:
                log.warning(message)
                if not self.offline:
                    with contextlib.suppress(Exception), short_http_retries():
                        self.experiment.set_tag(self.run_id, "mtl.tracking_outages", message[:5000])

    def _go_offline(self, error: BaseException, step: int | None) -> None:
        if self.fallback_dir is None:
            self.fallback_dir = Path(tempfile.mkdtemp(prefix="mtl-mlflow-fallback-"))
        self.offline_since = time.time()
        self._last_probe = time.monotonic()
        self.outages.append({"error": redact(str(error))[:300], "start_step": step, "buffered": 0, "flushed": False})
        log.warning(
            "MLflow store %s failed at step %s (%s). Training continues; metrics now go to %s and are written "
            "to the run once the store answers again (tried every %.0f s).",
            redact(self._tracking_uri),
            step,
            redact(str(error))[:300],
            self.fallback_dir,
            self.retry_every_s,
        )
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        (self.fallback_dir / "run.json").write_text(
            json.dumps({"run_id": self._run_id, "tracking_uri": redact(self._tracking_uri)}, indent=1)
        )

    def reconnect(self, force: bool = False) -> bool:
        """Try the store (at most every ``retry_every_s``, unless ``force``); flush the buffer if it answers."""
        if not self.offline:
            return True
        if not force and time.monotonic() - self._last_probe < self.retry_every_s:
            return False
        self._last_probe = time.monotonic()
        try:
            with self._lock, short_http_retries(max_retries=0, timeout=5):
                self._mlflow_client.get_run(self._run_id)
                self._drop_landed()
                self._write_pending()
        except Exception as e:  # noqa: BLE001 - still down: stay offline
            log.debug("MLflow store still unavailable: %s", e)
            return False
        duration = time.time() - self.offline_since
        self.outages[-1]["flushed"] = True
        self.offline_since = None
        log.warning(
            "MLflow store %s answers again after %.0f s; the buffered values were written to run %s.",
            redact(self._tracking_uri),
            duration,
            self._run_id,
        )
        return True

    def _write_pending(self) -> None:
        """Pending values, then artifacts, to the store in order; each chunk leaves ``_pending`` once it landed."""
        from mlflow.entities import Metric

        while self._pending:
            self._in_flight = self._pending[:1000]  # MLflow's log_batch limit
            metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in self._in_flight]
            # synchronous=True even under MLFLOW_ENABLE_ASYNC_LOGGING: a failure must be known here, not later
            self._mlflow_client.log_batch(self._run_id, metrics=metrics, synchronous=True)
            del self._pending[: len(self._in_flight)]
            self._in_flight = []
        while self._pending_artifacts:
            local, artifact_path = self._pending_artifacts[0]
            self._mlflow_client.log_artifacts(self._run_id, local, artifact_path)
            self._pending_artifacts.pop(0)

    def _drop_landed(self) -> None:
        """The write that failed may have landed (the store committed, its answer was lost): its values that the run
        holds already, identical in key, step, time and value, leave the pending ones, so none is written twice."""
        if not self._in_flight:
            return
        held = set()
        for key in {r["key"] for r in self._in_flight}:
            history = self._mlflow_client.get_metric_history(self._run_id, key)
            held.update((key, m.step, m.timestamp, repr(float(m.value))) for m in history)
        landed = {id(r) for r in self._in_flight if (r["key"], r["step"], r["timestamp"], repr(r["value"])) in held}
        self._pending = [r for r in self._pending if id(r) not in landed]
        self._in_flight = []

    def _rows(self, metrics: Mapping[str, float], step: int | None) -> list[dict[str, Any]]:
        """The values to write, taken now: past the resume floor, string values dropped (as Lightning does)."""
        s, now = int(step or 0), int(time.time() * 1000)
        rows = []
        for k, v in metrics.items():
            key = clean_key(f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k)
            if isinstance(v, str):
                log.warning("Discarding metric with string value %s=%s.", key, v)
            elif s > self.resume_floor.get(key, -1):
                rows.append({"key": key, "value": float(v), "step": s, "timestamp": now})
        return rows

    def _write_batch(self, batch: list[tuple[list[dict[str, Any]], int | None]]) -> None:
        """Write queued ``(rows, step)`` items in order (the writer thread; the caller's with ``synchronous``): to
        the store, or once it fails, with all later ones, to the fallback folder."""
        rows = [r for item_rows, _ in batch for r in item_rows]
        with self._lock:
            self._pending.extend(rows)  # pending until the store took them
            if self.offline and not self.reconnect():
                self._append_fallback(rows)
                return
            try:
                with short_http_retries():
                    self._write_pending()
            except Exception as e:  # noqa: BLE001 - whatever the store raised, training must go on
                self._go_offline(e, batch[0][1])
                self._append_fallback(self._pending)

    def _append_fallback(self, rows: list[dict[str, Any]]) -> None:
        with open(self.fallback_dir / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self.outages[-1]["buffered"] += len(rows)

    def _writer_failed(self, error: BaseException, batch: list) -> None:
        """A write that failed beyond the fallback (its folder cannot be written): said once per message; the
        values stay pending in memory."""
        message = redact(f"{type(error).__name__}: {error}")[:300]
        if message not in self.writer_errors:
            self.writer_errors.append(message)
            log.error(
                "The MLflow writer could not write %d metric value(s) to the store %s nor to the fallback folder %s "
                "(%s). Training continues; the values are kept in memory and written to the run if the store "
                "answers before the process ends.",
                sum(len(rows) for rows, _ in batch),
                redact(self._tracking_uri),
                self.fallback_dir,
                message,
            )

    # -- Lightning's logger interface -----------------------------------------------------------------
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        rows = self._rows(metrics, step)
        if not rows:
            return
        if self._run_id is None:
            with short_http_retries():
                self.experiment  # noqa: B018 - creates the run here: a store that cannot create it fails the run
        if self.synchronous:
            try:
                self._write_batch([(rows, step)])
            except Exception as e:  # noqa: BLE001 - as in the writer thread: reported, training goes on
                self._writer_failed(e, [(rows, step)])
        else:
            self._writer.put((rows, step))

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        with self._lock, short_http_retries():
            super().log_hyperparams(params)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """A checkpoint was written: what was logged before it lands now (a resumed run continues from here)."""
        self.flush()
        super().after_save_checkpoint(checkpoint_callback)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Upload a folder's files (after the queued values); while the store is away, copy them to the fallback
        folder instead. Returns whether they reached the store."""
        self.flush()
        with self._lock:
            if not self.offline or self.reconnect():
                try:
                    with short_http_retries():
                        self.experiment.log_artifacts(self.run_id, str(local_dir), artifact_path)
                    return True
                except Exception as e:  # noqa: BLE001
                    self._go_offline(e, None)
            target = self.fallback_dir / "artifacts" / (artifact_path or "")
            shutil.copytree(local_dir, target, dirs_exist_ok=True)  # a newer last.ckpt replaces the older copy
            if (str(target), artifact_path) not in self._pending_artifacts:
                self._pending_artifacts.append((str(target), artifact_path))
            return False

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy2(local_path, Path(tmp) / Path(local_path).name)
            return self.log_artifacts(tmp, artifact_path)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        self.close()  # the status comes after every value logged before it
        with self._lock:
            self._final_status = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(status, status)
            if self.offline and not self.reconnect(force=True):
                self._write_status()
                return
            try:
                with short_http_retries():
                    super().finalize(status)
            except Exception as e:  # noqa: BLE001
                self._go_offline(e, None)
                self._write_status()

    def _write_status(self) -> None:
        info = json.loads((self.fallback_dir / "run.json").read_text())
        info["status"] = self._final_status
        (self.fallback_dir / "run.json").write_text(json.dumps(info, indent=1))

    def summary(self) -> str | None:
        """One line on what happened to the store during the run (None when nothing did)."""
        lost = (
            f" The writer also failed ({'; '.join(self.writer_errors)}): {len(self._pending)} metric values were "
            f"neither in the store nor in {self.fallback_dir}, only in this process's memory."
            if self.writer_errors and self._pending
            else ""
        )
        if not self.outages:
            return lost.strip() or None
        buffered = sum(o["buffered"] for o in self.outages)
        if not self.offline and self.unflushed == 0:
            return (
                f"The MLflow store {redact(self._tracking_uri)} was unreachable {len(self.outages)} time(s) during "
                f"this run; all {buffered} buffered metric values were written to run {self._run_id} once it came "
                f"back (a copy stays in {self.fallback_dir})."
            )
        return (
            f"The MLflow store {redact(self._tracking_uri)} has been unreachable since step "
            f"{self.outages[-1]['start_step']} ({self.outages[-1]['error']}). Training finished; {self.unflushed} "
            f"metric values and artifacts of run {self._run_id} are only in {self.fallback_dir}, and the run shows "
            f"as RUNNING in the store until they are uploaded with:\n"
            f"    python -m mtl_experiments.tracking replay {self.fallback_dir}"
            f"{lost}"
        )


def log_artifacts(logger, local_dir: str | os.PathLike, artifact_path: str | None) -> bool:
    """``logger.log_artifacts`` where the logger buffers (ours), else the client's (may raise)."""
    if isinstance(logger, ResilientMLFlowLogger):
        return logger.log_artifacts(local_dir, artifact_path)
    logger.experiment.log_artifacts(logger.run_id, str(local_dir), artifact_path)
    return True


def replay(fallback_dir: str | os.PathLike, tracking_uri: str | None = None) -> dict[str, int]:
    """Upload a fallback folder to its run: metric values not yet there (per metric, steps after the
    last one the run has), its artifacts, and the final status. Idempotent: a second call adds nothing."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    folder = Path(fallback_dir)
    info = json.loads((folder / "run.json").read_text())
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or info["tracking_uri"]
    if "***@" in uri:
        raise ConfigError(f"{folder}/run.json holds a redacted URI; pass the real one with --tracking-uri.")
    client = MlflowClient(uri)
    run_id = info["run_id"]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    floor = last_steps(client, run_id, {r["key"] for r in rows})
    todo = [r for r in rows if r["step"] > floor.get(r["key"], -1)]
    for i in range(0, len(todo), 1000):
        batch = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in todo[i : i + 1000]]
        client.log_batch(run_id, metrics=batch)
    artifacts = folder / "artifacts"
    if artifacts.is_dir() and any(artifacts.iterdir()):
        client.log_artifacts(run_id, str(artifacts))
    if todo:
        client.set_tag(
            run_id,
            "mtl.tracking_outages",
            f"{len(todo)} values written while the store was away, replayed from {folder}",
        )
    if info.get("status"):
        client.set_terminated(run_id, info["status"])
    return {"metrics": len(todo), "skipped": len(rows) - len(todo)}
