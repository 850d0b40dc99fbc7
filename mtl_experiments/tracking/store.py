"""The MLflow store: where it is (URI), whether it answers and can be written, its experiment, and
short HTTP retries for a training loop that can buffer. Checked before any data is loaded."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import sqlite3
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from mtl_experiments.errors import ConfigError, TrackingError
from mtl_experiments.scrub import redact
from mtl_experiments.tracking.ui import mark_model_training

log = logging.getLogger(__name__)


DEFAULT_DB = "mlflow.db"


FIX = (
    "Set MLFLOW_TRACKING_URI or logger.mlflow.tracking_uri to a reachable store, or unset both to use "
    "the local SQLite store sqlite:///<launch dir>/mlflow.db."
)


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


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, if runs could not be recorded at ``uri``."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        # proved writable without creating anything: a run stopped later by a config error leaves no file
        path = Path(uri[len("sqlite:///") :])
        existing = next(p for p in (path, *path.parents) if p.exists())
        if existing != path and not existing.is_dir():
            raise TrackingError(f"Cannot create the MLflow store {uri}: {existing} is not a directory. {FIX}")
        try:
            if existing == path:
                with contextlib.closing(sqlite3.connect(path, timeout=timeout)) as con:
                    con.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only or foreign file
                    con.rollback()
            else:  # the folders up to it can be created, and files in them
                with tempfile.TemporaryFile(dir=existing):
                    pass
        except (OSError, sqlite3.Error) as e:
            raise TrackingError(f"Cannot write the MLflow SQLite store {uri} ({e}). {FIX}") from e
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
                f"{urlparse(uri).port or 5000}`) or check the address. {FIX}"
            ) from e
        if not ok:
            raise TrackingError(
                f"The MLflow tracking server {redact(uri)} answered {redact(url)} with HTTP {response.status}. {FIX}"
            )
    elif scheme in ("", "file"):
        raise TrackingError(
            f"Tracking URI {uri!r} is a file store, which MLflow 3 no longer supports for "
            f"tracking; use sqlite:///path/to/mlflow.db instead. {FIX}"
        )
    # other schemes (databricks, postgresql, ...) are validated by MLflow when the run is created


def store_lock(uri: str) -> contextlib.AbstractContextManager:
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
        with store_lock(uri):
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(name)
            exp = exp or client.get_experiment(client.create_experiment(name))
            mark_model_training(client, exp)  # the UI opens it on its runs, not on GenAI traces (tracking/ui.py)
    except Exception as e:  # noqa: BLE001 - any store failure becomes one readable message
        raise TrackingError(
            f"MLflow store {redact(uri)} failed while opening experiment {name!r}: {redact(str(e))}. {FIX}"
        ) from e
    check_artifact_location(exp.artifact_location, name)
    return exp.experiment_id


def check_artifact_location(location: str, experiment: str) -> None:
    """A local artifact store (``file:`` or a plain path) must be writable before a run starts; a remote one
    (``mlflow-artifacts:``, ``s3:``, ...) is the server's to check."""
    from urllib.request import url2pathname

    from mtl_experiments.outputs import check_writable

    parsed = urlparse(location or "")
    if parsed.scheme not in ("", "file"):
        return
    path = url2pathname(parsed.path) if parsed.scheme == "file" else location
    check_writable(path, f"the artifact location of MLflow experiment {experiment!r}")


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
class _SharedEnv:
    """Environment variables set while any thread is inside ``short_http_retries``: the first thread in sets them,
    the last one out removes them, so the logger's writer thread and the training thread can overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.added: list[str] = []


_RETRY_ENV = _SharedEnv()


@contextlib.contextmanager
def short_http_retries(max_retries: int = 2, timeout: int = 10) -> Iterator[None]:
    """MLflow retries a failed HTTP request 7 times with exponential backoff (about 4 minutes) and waits
    up to 120 s for each answer: right for a script with nothing else to do, wrong for a training loop
    that can buffer its metrics. Inside this block: fewer retries and a shorter timeout, unless the user
    set these variables themselves (MLflow reads them at each request, in whichever thread sends it; the
    variables are the process's, so they stay set while any thread is inside, with the first one's values)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    with _RETRY_ENV.lock:
        if _RETRY_ENV.holders == 0:
            _RETRY_ENV.added = [k for k in wanted if k not in os.environ]
            os.environ.update({k: wanted[k] for k in _RETRY_ENV.added})
        _RETRY_ENV.holders += 1
    try:
        yield
    finally:
        with _RETRY_ENV.lock:
            _RETRY_ENV.holders -= 1
            if _RETRY_ENV.holders == 0:
                for k in _RETRY_ENV.added:
                    os.environ.pop(k, None)


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


def last_steps(client, run_id: str, keys=None) -> dict[str, int]:
    """{metric: the largest step logged} for ``keys`` (default: every metric of the run)."""
    keys = set(client.get_run(run_id).data.metrics) if keys is None else keys
    out = {}
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            out[key] = max(m.step for m in history)
    return out
