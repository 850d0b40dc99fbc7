"""MLflow specifics (DESIGN.md §7): tracking URI, reachability check, tags, params, artifacts, status."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from mtl_experiments.errors import TrackingError

DEFAULT_DB = "mlflow.db"
PARENT_RUN_ENV = "MTL_PARENT_RUN_ID"  # the sweep's parent run id, set by sweep.MLflowSweepCallback for its jobs
ROLE_TAG, SWEEP_PARENT = "mtl.role", "sweep_parent"
_FIX = (
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
        path = Path(uri[len("sqlite:///") :])
        parent = path.parent
        if parent.exists() and not parent.is_dir():
            raise TrackingError(f"Cannot create the MLflow store {uri}: {parent} is not a directory. {_FIX}")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            with sqlite3.connect(path, timeout=timeout) as con:  # opens/creates and proves it is writable
                con.execute("CREATE TABLE IF NOT EXISTS _mtl_write_check (x INTEGER)")
                con.execute("DROP TABLE _mtl_write_check")
        except (OSError, sqlite3.Error) as e:
            raise TrackingError(f"Cannot write the MLflow SQLite store {uri} ({e}). {_FIX}") from e
    elif scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                ok = response.status == 200
        except (TimeoutError, urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"The MLflow tracking server {uri} cannot be reached ({getattr(e, 'reason', e)}). "
                f"Start it (e.g. `mlflow server --host 127.0.0.1 --port "
                f"{urlparse(uri).port or 5000}`) or check the address. {_FIX}"
            ) from e
        if not ok:
            raise TrackingError(f"The MLflow tracking server {uri} answered {url} with HTTP {response.status}. {_FIX}")
    elif scheme in ("", "file"):
        raise TrackingError(
            f"Tracking URI {uri!r} is a file store, which MLflow 3 no longer supports for "
            f"tracking; use sqlite:///path/to/mlflow.db instead. {_FIX}"
        )
    # other schemes (databricks, postgresql, ...) are validated by MLflow when the run is created


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store's schema and the experiment (if needed) once, before anything is trained."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        return exp.experiment_id if exp else client.create_experiment(name)
    except Exception as e:  # noqa: BLE001 - any store failure becomes one readable message
        raise TrackingError(f"MLflow store {uri} failed while opening experiment {name!r}: {e}. {_FIX}") from e


def flatten(cfg: Mapping | DictConfig, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"data.correlation": 0.5, ...}`` (lists as strings), for MLflow params."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value) if isinstance(value, (list, tuple, dict)) else value
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
    tags["overrides"] = " ".join(overrides)[:5000]
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
        (Path(tmp) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (Path(tmp) / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
        logger.experiment.log_artifacts(logger.run_id, tmp, artifact_path="config")


def mark_failed(logger, status: str = "FAILED") -> None:
    """End the run as FAILED (or KILLED) so no crashed run is left RUNNING or shown as FINISHED."""
    if logger is None or logger._run_id is None:
        return
    with contextlib.suppress(Exception):  # never hide the original error behind a tracking error
        logger.experiment.set_terminated(logger.run_id, status)
