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
from mtl_experiments.sweep_env import PARENT_RUN_ENV, SWEPT_ENV
from mtl_experiments.tracking.logger import log_artifacts

log = logging.getLogger(__name__)


ROLE_TAG, SWEEP_PARENT = "mtl.role", "sweep_parent"
CHECKPOINT_DIR_TAG, HOST_TAG = "mtl.checkpoint_dir", "mtl.host"  # where resume=<run id> finds last.ckpt
RESUME_COUNT_TAG = "mtl.resume.count"
CHECKPOINT_ARTIFACTS = "checkpoints"  # checkpoints/{last,best}.ckpt when callbacks.last_checkpoint.log_to_mlflow
# a config key ending so (or under paths.) is where this run writes: different for every run, so a tag, not a param
RUN_PATH_KEYS = ("dirpath", "output_dir", "default_root_dir", "save_dir", "log_dir")
NAME_PARTS = ("data", "backbone", "loss")  # what a default run name says, after the swept values


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


def swept_keys() -> list[str]:
    """The keys the sweep varies (``$MTL_SWEPT_KEYS``) for a job of a multirun with a parent; [] otherwise."""
    return [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k] if sweep_tags() else []


def is_run_path(key: str) -> bool:
    """Whether a flattened config key is a location this run writes to (checkpoint folder, output dir)."""
    return key.startswith("paths.") or key.rsplit(".", 1)[-1] in RUN_PATH_KEYS


def group_choices(choices: Mapping[str, Any]) -> dict[str, str]:
    """Hydra's chosen option per config group (``{"loss": "pcgrad", ...}``), without Hydra's own groups."""
    return {k: str(v) for k, v in choices.items() if v is not None and not k.startswith("hydra")}


def run_params(params: Mapping[str, Any], choices: Mapping[str, Any]) -> dict[str, Any]:
    """What a run logs as MLflow params: the flattened config without its per-run paths (``path_tags``), plus each
    config group's choice (``loss: pcgrad``), so that the UI's "Show diff only" and parallel coordinates offer the
    settings that differ between runs, the method among them, and never the folders every run has its own of."""
    return {**{k: v for k, v in params.items() if not is_run_path(k)}, **group_choices(choices)}


def path_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """The per-run paths of the flattened config, as tags (still searchable, not compared as settings)."""
    return {k: str(v)[:5000] for k, v in params.items() if is_run_path(k) and v is not None}


def default_run_name(choices: Mapping[str, Any], overrides: list[str], seed: Any, swept: list[str]) -> str:
    """What tells runs apart first: a sweep job's swept values in short forms, the short ones first (``s1 pcgrad``:
    the seed as ``s<n>``, other keys as ``<last part of the key>=<value>``, then a group's option alone; the runs
    table shows ~13 characters of a sweep job's name), then ``<data>-<backbone>-<loss>-seed<n>`` without what was
    already said."""
    values = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    keys = [k for k in swept if k in values and k not in choices] + [k for k in swept if k in values and k in choices]
    lead = [values[k] if k in choices else short_value(k, values[k]) for k in keys]
    rest = [str(choices.get(g, "?")) for g in NAME_PARTS if g not in values or g not in swept]
    rest += [] if "seed" in swept and "seed" in values else [f"seed{seed}"]
    return " ".join(lead) + " | " + "-".join(rest) if lead else "-".join(rest)


def short_value(key: str, value: str) -> str:
    """``seed=1`` -> ``s1``; ``optimizer.lr=0.01`` -> ``lr=0.01``."""
    return f"s{value}" if key == "seed" else f"{key.rsplit('.', 1)[-1]}={value}"


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
    tags = group_choices(choices)
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
    """{key: (value in the run, value now)} for every setting that differs (compared as MLflow stores them; per-run
    paths are tags, and a group's choice param, which mirrors the tag of its name, is told by the group's keys)."""
    new = {k: str(v)[:250] for k, v in params.items() if not is_run_path(k)}
    old = {
        k: v
        for k, v in run.data.params.items()
        if not is_run_path(k) and (k in new or run.data.tags.get(k) != v)  # a choice param: not in ``params``
    }
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def host() -> str:
    return socket.gethostname()
