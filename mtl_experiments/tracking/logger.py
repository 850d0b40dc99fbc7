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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from mtl_experiments.errors import ConfigError
from mtl_experiments.scrub import redact
from mtl_experiments.tracking.store import last_steps, short_http_retries

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
    """Lightning's ``MLFlowLogger`` that neither dies with its tracking store nor duplicates resumed steps.

    - A write that fails (server gone, database locked, disk full) does not stop training: a warning
      names the store and the fallback folder, and this and every later value is appended to
      ``<fallback_dir>/metrics.jsonl`` (artifacts to ``<fallback_dir>/artifacts/``). Every
      ``retry_every_s`` seconds the store is tried again; once it answers, the buffered values are
      written to the run (flushed) and logging continues there. ``finalize`` tries once more; what is
      still left is uploaded later with ``python -m mtl_experiments.tracking replay <fallback_dir>``.
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
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.fallback_dir = Path(fallback_dir) if fallback_dir else None  # None: a temporary folder, if ever needed
        self.retry_every_s = float(retry_every_s)
        self.resume_floor = dict(resume_floor or {})
        self.offline_since: float | None = None  # wall time the store stopped answering (None: online)
        self.outages: list[dict[str, Any]] = []  # {"error", "start_step", "buffered", "flushed"} per outage
        self._pending: list[dict[str, Any]] = []  # buffered metric values not yet in the store
        self._pending_artifacts: list[tuple[str, str | None]] = []
        self._last_probe = 0.0
        self._final_status: str | None = None

    # -- state ----------------------------------------------------------------------------------------
    @property
    def offline(self) -> bool:
        return self.offline_since is not None

    @property
    def unflushed(self) -> int:
        """Metric values (and artifacts) that are only in the fallback folder."""
        return len(self._pending) + len(self._pending_artifacts)

    @property
    def started(self) -> bool:
        """Whether the MLflow run exists (created or continued); reading ``run_id`` would create it."""
        return self._run_id is not None

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    def end(self, status: str = "FAILED") -> None:
        """Mark the run ``status`` now (FAILED / KILLED); while the store is away, in the fallback folder, for
        ``replay``. Never raises: the error that ended the run is the one to show."""
        if not self.started:
            return
        if self.offline and not self.reconnect(force=True):
            self._final_status = status
            self._write_status()
            return
        with contextlib.suppress(Exception), short_http_retries():
            self.experiment.set_terminated(self.run_id, status)

    def report_outages(self) -> None:
        """Say what happened to the store during the run (an outage, and where its values are): in the log and,
        when the store answers, as the run's tag ``mtl.tracking_outages``."""
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
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        (self.fallback_dir / "run.json").write_text(
            json.dumps({"run_id": self._run_id, "tracking_uri": redact(self._tracking_uri)}, indent=1)
        )
        log.warning(
            "MLflow store %s failed at step %s (%s). Training continues; metrics now go to %s and are written "
            "to the run once the store answers again (tried every %.0f s).",
            redact(self._tracking_uri),
            step,
            redact(str(error))[:300],
            self.fallback_dir,
            self.retry_every_s,
        )

    def reconnect(self, force: bool = False) -> bool:
        """Try the store (at most every ``retry_every_s``, unless ``force``); flush the buffer if it answers."""
        if not self.offline:
            return True
        if not force and time.monotonic() - self._last_probe < self.retry_every_s:
            return False
        self._last_probe = time.monotonic()
        try:
            with short_http_retries(max_retries=0, timeout=5):
                self._mlflow_client.get_run(self._run_id)
                self._flush()
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

    def _flush(self) -> None:
        from mlflow.entities import Metric

        while self._pending:
            chunk = self._pending[:1000]  # MLflow's log_batch limit
            metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in chunk]
            self._mlflow_client.log_batch(self._run_id, metrics=metrics)
            del self._pending[: len(chunk)]
        while self._pending_artifacts:
            local, artifact_path = self._pending_artifacts[0]
            self._mlflow_client.log_artifacts(self._run_id, local, artifact_path)
            self._pending_artifacts.pop(0)

    def _buffer(self, metrics: Mapping[str, float], step: int | None) -> None:
        now = int(time.time() * 1000)
        rows = [
            {"key": clean_key(k), "value": float(v), "step": int(step or 0), "timestamp": now}
            for k, v in metrics.items()
            if not isinstance(v, str)
        ]
        self._pending.extend(rows)
        self.outages[-1]["buffered"] += len(rows)
        with open(self.fallback_dir / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    # -- Lightning's logger interface -----------------------------------------------------------------
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.resume_floor:
            s = int(step or 0)
            metrics = {k: v for k, v in metrics.items() if s > self.resume_floor.get(clean_key(k), -1)}
        if not metrics:
            return
        if self.offline and not self.reconnect():
            self._buffer(metrics, step)
            return
        try:
            with short_http_retries():
                super().log_metrics(metrics, step)
        except Exception as e:  # noqa: BLE001 - whatever the store raised, training must go on
            if self._run_id is None:
                raise  # the run was never created: nothing to continue (the start-up check failed)
            self._go_offline(e, step)
            self._buffer(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        with short_http_retries():
            super().log_hyperparams(params)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> bool:
        """Upload a folder's files; while the store is away, copy them to the fallback folder instead.
        Returns whether they reached the store."""
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
        if not self.outages:
            return None
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
