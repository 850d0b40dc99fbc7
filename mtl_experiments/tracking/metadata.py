"""What a run records about itself: tags (choices, overrides, code, versions, sweep parent, checkpoint
folder), params (the flattened config), the config artifacts, and what changed on resume."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl_experiments.scrub import redact, scrub, scrub_yaml
from mtl_experiments.tracking.logger import log_artifacts

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


PARENT_RUN_ENV = "MTL_PARENT_RUN_ID"  # the sweep's parent run id, set by sweep.MLflowSweepCallback for its jobs
ROLE_TAG, SWEEP_PARENT = "mtl.role", "sweep_parent"
CHECKPOINT_DIR_TAG, HOST_TAG = "mtl.checkpoint_dir", "mtl.host"  # where resume=<run id> finds last.ckpt
RESUME_COUNT_TAG = "mtl.resume.count"
CHECKPOINT_ARTIFACTS = "checkpoints"  # checkpoints/{last,best}.ckpt when callbacks.last_checkpoint.log_to_mlflow


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


def flatten(cfg: Mapping | DictConfig, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"data.correlation": 0.5, ...}`` (lists as strings), for MLflow params; secrets masked
    (credentials in URIs, values of secret-named keys: ``scrub``)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    container = scrub(container)
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
        (Path(tmp) / "config.yaml").write_text(scrub_yaml(cfg))
        (Path(tmp) / "overrides.yaml").write_text(redact(OmegaConf.to_yaml(OmegaConf.create(list(overrides)))))
        log_artifacts(logger, tmp, "config")


def changed_params(run, params: Mapping[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """{key: (value in the run, value now)} for every param that differs (compared as MLflow stores them)."""
    old = run.data.params
    new = {k: str(v)[:250] for k, v in params.items()}
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def host() -> str:
    return socket.gethostname()
