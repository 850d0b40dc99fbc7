"""MLflow specifics (DESIGN.md §7): tracking URI, reachability check, tags, params, artifacts, status,
and the faults: a store that disappears mid-run (``ResilientMLFlowLogger`` buffers to a local fallback
and flushes when it is back; ``python -m mtl_experiments.tracking replay <dir>`` uploads what is left)
and a run that is resumed (``run_checkpoint``, ``changed_params``, ``continue_run``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mtl_experiments.errors import ConfigError, TrackingError

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
PARENT_RUN_ENV = "MTL_PARENT_RUN_ID"  # the sweep's parent run id, set by sweep.MLflowSweepCallback for its jobs
ROLE_TAG, SWEEP_PARENT = "mtl.role", "sweep_parent"
CHECKPOINT_DIR_TAG, HOST_TAG = "mtl.checkpoint_dir", "mtl.host"  # where resume=<run id> finds last.ckpt
RESUME_COUNT_TAG = "mtl.resume.count"
CHECKPOINT_ARTIFACTS = "checkpoints"  # checkpoints/{last,best}.ckpt when callbacks.last_checkpoint.log_to_mlflow
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URI
_FIX = (
    "Set MLFLOW_TRACKING_URI or logger.mlflow.tracking_uri to a reachable store, or unset both to use "
    "the local SQLite store sqlite:///<launch dir>/mlflow.db."
)


def redact(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host``: credentials never reach params, tags or logs."""
    return _USERINFO.sub("***@", text) if isinstance(text, str) else text


def launch_dir() -> Path:
    """The directory the user launched from, even if Hydra was configured to change into its output dir."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.cwd)
    except ValueError:
        pass
    return Path.cwd()


def resolve_tracking_uri(configured: str | None, launch: Path | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI`` (read now, at run time), else the launch dir's SQLite file.

    Always explicit: Lightning's own fallback is the ``./mlruns`` file store, which would scatter runs
    across Hydra's output directories (and which MLflow 3 deprecates). ``launch`` overrides the launch
    directory (the sweep callback runs before Hydra's runtime config of a job is set).
    """
    launch = launch or launch_dir()
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{launch / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_absolute():  # relative SQLite paths would follow the process's cwd
            uri = f"sqlite:///{(launch / path).resolve()}"
    if redact(uri) != uri:
        # MLflow prints "View run <name> at: <uri>/#/..." when a run ends, password included; the pipeline prints
        # the run id with the redacted URI instead
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return uri


def mlflow_logger_node(cfg: DictConfig) -> DictConfig | None:
    """The ``logger.<name>`` node that builds an ``MLFlowLogger`` (or a subclass), if any."""
    from hydra.utils import get_class
    from lightning.pytorch.loggers import MLFlowLogger

    for node in (cfg.get("logger") or {}).values():
        target = OmegaConf.select(node, "_target_") if isinstance(node, DictConfig) else None
        if not target:
            continue
        try:
            cls = get_class(target)
        except Exception:  # noqa: BLE001 - a bad target is reported by the run that instantiates it
            continue
        if isinstance(cls, type) and issubclass(cls, MLFlowLogger):
            return node
    return None


def sweep_tags() -> dict[str, str]:
    """``mlflow.parentRunId`` and ``mtl.sweep_id`` for a job of a multirun whose parent run exists
    (``$MTL_PARENT_RUN_ID``); nothing for a single run, even if the variable leaked into its process."""
    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return {}
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return {}
    except (ImportError, ValueError):
        return {}
    return {"mlflow.parentRunId": parent, "mtl.sweep_id": parent}


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, if runs could not be recorded at ``uri``."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        # proved writable without creating anything: a run stopped later by a config error leaves no file
        path = Path(uri[len("sqlite:///") :])
        existing = next(p for p in (path, *path.parents) if p.exists())
        if existing != path and not existing.is_dir():
            raise TrackingError(f"Cannot create the MLflow store {uri}: {existing} is not a directory. {_FIX}")
        try:
            if existing == path:
                with contextlib.closing(sqlite3.connect(path, timeout=timeout)) as con:
                    con.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only or foreign file
                    con.rollback()
            else:  # the folders up to it can be created, and files in them
                with tempfile.TemporaryFile(dir=existing):
                    pass
        except (OSError, sqlite3.Error) as e:
            raise TrackingError(f"Cannot write the MLflow SQLite store {uri} ({e}). {_FIX}") from e
    elif scheme in ("http", "https"):
        parts = urlparse(uri)
        url = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl().rstrip("/") + "/health"
        request = urllib.request.Request(url)
        if parts.username:  # user:password@ (basic auth): urllib does not take it from the URL itself
            token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                ok = response.status == 200
        except (TimeoutError, urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"The MLflow tracking server {redact(uri)} cannot be reached ({getattr(e, 'reason', e)}). "
                f"Start it (e.g. `mlflow server --host 127.0.0.1 --port "
                f"{urlparse(uri).port or 5000}`) or check the address. {_FIX}"
            ) from e
        if not ok:
            raise TrackingError(
                f"The MLflow tracking server {redact(uri)} answered {redact(url)} with HTTP {response.status}. {_FIX}"
            )
    elif scheme in ("", "file"):
        raise TrackingError(
            f"Tracking URI {uri!r} is a file store, which MLflow 3 no longer supports for "
            f"tracking; use sqlite:///path/to/mlflow.db instead. {_FIX}"
        )
    # other schemes (databricks, postgresql, ...) are validated by MLflow when the run is created


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A file lock beside a SQLite store (``<db>.lock``), else nothing. MLflow creates or migrates the schema of
    a new SQLite store when a client first opens it, and two processes doing that at once (two sweeps started
    together) fail with ``duplicate column name``; under the lock the second one finds the schema done."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    path = Path(uri[len("sqlite:///") :])
    return FileLock(str(path.with_name(path.name + ".lock")), timeout=300)


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store's schema and the experiment (if needed) once, before anything is trained."""
    from mlflow.tracking import MlflowClient

    try:
        with _store_lock(uri):
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(name)
            return exp.experiment_id if exp else client.create_experiment(name)
    except Exception as e:  # noqa: BLE001 - any store failure becomes one readable message
        raise TrackingError(
            f"MLflow store {redact(uri)} failed while opening experiment {name!r}: {redact(str(e))}. {_FIX}"
        ) from e


def flatten(cfg: Mapping | DictConfig, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"data.correlation": 0.5, ...}`` (lists as strings), for MLflow params."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            value = str(value) if isinstance(value, (list, tuple, dict)) else value
            out[name] = redact(value) if isinstance(value, str) else value
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(choices: Mapping[str, str], overrides: list[str], loss: Mapping | None = None) -> dict[str, str]:
    """Hydra's chosen options (``data``, ``backbone``, ``loss``, ...), the weighting method's
    hyper-parameters (``loss.<key>``, so runs can be filtered by them), overrides, code and versions."""
    tags = {k: str(v) for k, v in choices.items() if v is not None and not k.startswith("hydra")}
    tags.update({f"loss.{k}": str(v) for k, v in flatten(loss or {}).items()})
    tags["overrides"] = redact(" ".join(overrides))[:5000]
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for pkg in ("mtl-experiments", "torch", "lightning", "torchmetrics", "hydra-core", "mlflow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{pkg}"] = metadata.version(pkg)
    return tags


def log_config_artifacts(logger, cfg: DictConfig, overrides: list[str]) -> None:
    """The resolved config and the command-line overrides, as ``config/*.yaml`` artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(redact(OmegaConf.to_yaml(cfg, resolve=True)))
        (Path(tmp) / "overrides.yaml").write_text(redact(OmegaConf.to_yaml(OmegaConf.create(list(overrides)))))
        log_artifacts(logger, tmp, "config")


def mark_failed(logger, status: str = "FAILED") -> None:
    """End the run as FAILED (or KILLED) so no crashed run is left RUNNING or shown as FINISHED."""
    if logger is None or logger._run_id is None:
        return
    if isinstance(logger, ResilientMLFlowLogger) and logger.offline and not logger._back_online(force=True):
        logger._final_status = status  # the store is away: replay sets it
        logger._write_status()
        return
    with contextlib.suppress(Exception), short_http_retries():  # never hide the original error behind a tracking error
        logger.experiment.set_terminated(logger.run_id, status)


# -- preflight ---------------------------------------------------------------------------------------
def preflight(cfg: DictConfig) -> str | None:
    """The run's tracking URI, checked to answer, before any data is loaded (None: no MLflow logger)."""
    node = mlflow_logger_node(cfg)
    if node is None:
        return None
    uri = resolve_tracking_uri(OmegaConf.select(node, "tracking_uri"))
    check_tracking_uri(uri)
    return uri


# -- a store that goes away mid-run ------------------------------------------------------------------
@contextlib.contextmanager
def short_http_retries(max_retries: int = 2, timeout: int = 10) -> Iterator[None]:
    """MLflow retries a failed HTTP request 7 times with exponential backoff (about 4 minutes) and waits
    up to 120 s for each answer: right for a script with nothing else to do, wrong for a training loop
    that can buffer its metrics. Inside this block: fewer retries and a shorter timeout, unless the user
    set these variables themselves (MLflow reads them at each request)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _clean_key(key: str) -> str:
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

    def _back_online(self, force: bool = False) -> bool:
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
            {"key": _clean_key(k), "value": float(v), "step": int(step or 0), "timestamp": now}
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
            metrics = {k: v for k, v in metrics.items() if s > self.resume_floor.get(_clean_key(k), -1)}
        if not metrics:
            return
        if self.offline and not self._back_online():
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
        if not self.offline or self._back_online():
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
        if self.offline and not self._back_online(force=True):
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


# -- resuming a run ------------------------------------------------------------------------------------
def last_steps(client, run_id: str, keys=None) -> dict[str, int]:
    """{metric: the largest step logged} for ``keys`` (default: every metric of the run)."""
    keys = set(client.get_run(run_id).data.metrics) if keys is None else keys
    out = {}
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            out[key] = max(m.step for m in history)
    return out


def get_run(uri: str, run_id: str):
    """The run, or a ConfigError saying it is not in this store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        raise ConfigError(
            f"resume={run_id}: no such run in the MLflow store {redact(uri)} ({redact(str(e))[:200]}). Pass the run "
            "id shown in the MLflow UI (Run ID), a checkpoint file, or point MLFLOW_TRACKING_URI at the run's store."
        ) from None


def run_checkpoint(uri: str, run, download_to: Path) -> Path:
    """The checkpoint ``resume=<run id>`` continues from: ``last.ckpt`` in the run's checkpoint folder
    (tag ``mtl.checkpoint_dir``), else the run's artifact ``checkpoints/last.ckpt`` (downloaded with
    ``checkpoints/best.ckpt`` into ``download_to``)."""
    from mlflow.tracking import MlflowClient

    run_id = run.info.run_id
    folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if folder and (Path(folder) / "last.ckpt").is_file():
        return Path(folder) / "last.ckpt"
    client = MlflowClient(uri)
    names = {Path(a.path).name for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS)}
    if "last.ckpt" in names:
        download_to.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for name in sorted(names & {"last.ckpt", "best.ckpt"}):
                local = client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACTS}/{name}", tmp)
                shutil.move(local, download_to / name)
        log.info("Downloaded the checkpoints of run %s from its MLflow artifacts into %s.", run_id, download_to)
        return download_to / "last.ckpt"
    host = run.data.tags.get(HOST_TAG)
    where = f"{folder}/last.ckpt" + (f" (written on host {host})" if host else "") if folder else "no local folder"
    raise ConfigError(
        f"resume={run_id}: the run has no checkpoint to continue from: not at {where}, and no MLflow artifact "
        f"{CHECKPOINT_ARTIFACTS}/last.ckpt (callbacks.last_checkpoint.log_to_mlflow=true uploads it). Pass the "
        "checkpoint file instead: resume=/path/to/last.ckpt."
    )


def changed_params(run, params: Mapping[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """{key: (value in the run, value now)} for every param that differs (compared as MLflow stores them)."""
    old = run.data.params
    new = {k: str(v)[:250] for k, v in params.items()}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def continue_run(
    logger: MLFlowLogger,
    run,
    params: Mapping[str, Any],
    changed: Mapping,
    checkpoint: str | os.PathLike,
    extra_tags: Mapping[str, str] | None = None,
) -> None:
    """Reopen a killed / failed / finished run: status RUNNING, the new params only (MLflow forbids
    changing a logged param; the changes are kept in a tag), resume count and source as tags."""
    from mlflow.entities import Param, RunTag

    client, run_id = logger.experiment, logger.run_id
    count = int(run.data.tags.get(RESUME_COUNT_TAG, "0")) + 1
    tags = {RESUME_COUNT_TAG: str(count), f"mtl.resume.{count}.checkpoint": redact(str(checkpoint))[:5000]}
    tags.update({k: str(v) for k, v in (extra_tags or {}).items() if v})
    if changed:
        diff = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        tags[f"mtl.resume.{count}.changed_params"] = diff[:5000]
    new = [Param(k, str(v)[:250]) for k, v in params.items() if k not in run.data.params]
    with short_http_retries():
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i : i + 100])
    log.info("Resuming MLflow run %s (resume #%d, was %s) from %s.", run_id, count, run.info.status, checkpoint)
    if run.info.status == "RUNNING":
        log.warning(
            "Run %s was RUNNING: as a killed run stays. If it is in fact still training somewhere, stop that "
            "process: both would write to the same run and checkpoint folder.",
            run_id,
        )


def host() -> str:
    return socket.gethostname()


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl_experiments.tracking replay <fallback dir> [--tracking-uri URI]``."""
    parser = argparse.ArgumentParser(prog="python -m mtl_experiments.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="upload a run's fallback folder (written while its store was unreachable)")
    p.add_argument("fallback_dir")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the one in run.json")
    args = parser.parse_args(argv)
    try:
        done = replay(args.fallback_dir, args.tracking_uri)
    except (ConfigError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    print(f"Uploaded {done['metrics']} metric values ({done['skipped']} already in the run) from {args.fallback_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
