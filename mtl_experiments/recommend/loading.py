"""Loading a trained model to serve: from a checkpoint (``--checkpoint``) or an MLflow run (``--run-id``: its best
checkpoint, found by ``run_checkpoint.find``).

The dataset (for its ``Catalog`` of users and items) and the model are rebuilt from the config the checkpoint
describes, only through ``safe_config``: its recipe (config group choices and overrides, composed from this
version's ``conf/``), else its stored full config, else the run's config artifact, each resolved and refused if
it names a ``_target_`` the project's own configs do not (a shared checkpoint must not run code). The weights are
the checkpoint's ``model.*`` tensors, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl_experiments import safe_config
from mtl_experiments.errors import ConfigError, TrackingError

CONFIG_ARTIFACT = "config/config.yaml"


@dataclass
class Served:
    """A model ready to score: the model (eval mode), the dataset's catalogue and tasks, and where it came from."""

    model: torch.nn.Module
    catalog: Any
    tasks: dict[str, Any]
    checkpoint: str
    datamodule: Any = None  # the set-up dataset the catalogue comes from
    notes: list[str] = field(default_factory=list)


def load_checkpoint(
    path: str | Path, device: str = "cpu", fallback_config: Callable[[], str | None] | None = None
) -> Served:
    """Rebuild the dataset and model from the checkpoint's recipe or config (checked by ``safe_config``) and load
    its weights. ``fallback_config`` gives the config YAML of a checkpoint that carries neither (the run's config
    artifact)."""
    from omegaconf import OmegaConf

    from mtl_experiments import checkpoints, pipeline

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path}: no such file.")
    ckpt = checkpoints.load(path)
    # nothing is built before every target of the config is checked
    cfg, note = safe_config.from_checkpoint(ckpt.get("mtl"), fallback_config)
    if cfg is None:
        raise ConfigError(
            f"{path} carries no run config (checkpoint['mtl']['recipe'] or ['config']), so its model cannot be "
            "rebuilt; checkpoints written by this version of train.py carry it: retrain, or pass --run-id of a run "
            "whose config artifact (config/config.yaml) describes it."
        )
    state = {k[len("model.") :]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("model.")}
    if not state:
        raise ConfigError(f"{path} holds no model weights (no 'model.*' keys in its state_dict).")
    datamodule = pipeline.build(cfg, "data")
    datamodule.setup()
    if getattr(datamodule, "catalog", None) is None:
        raise ConfigError(
            f"The dataset of this model ({OmegaConf.select(cfg, 'data._target_')}) has no catalogue of users and "
            "items, so it cannot serve recommendations; datasets that can set `catalog` in load() "
            "(e.g. data=recsys_synthetic)."
        )
    model = pipeline.build_model(cfg, datamodule)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(
            f"The weights in {path} do not fit the model its config builds ({str(e).splitlines()[0][:300]}); "
            "it was written by a different version of the code or config."
        ) from None
    model.to(device).eval()
    return Served(model, datamodule.catalog, dict(datamodule.tasks), str(path), datamodule, [note] if note else [])


def load_run(run_id: str, tracking_uri: str | None = None, device: str = "cpu") -> Served:
    """The best checkpoint of an MLflow run: in its checkpoint folder (tag ``mtl.checkpoint_dir``), else its
    artifact ``checkpoints/best.ckpt``; ``last.ckpt`` (folder, then artifact) with a note when there is no best."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mtl_experiments import run_checkpoint, tracking
    from mtl_experiments.compare import check_readable

    os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")  # no download bars in the output
    uri = tracking.resolve_tracking_uri(tracking_uri)
    check_readable(uri)  # an SQLite file that is not there is an error (MLflow would create an empty store)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ConfigError(
            f"No run {run_id} in the MLflow store {tracking.redact(uri)} ({tracking.redact(e.message)[:200]}). "
            "Pass the Run ID shown in the MLflow UI and the store it was tracked in (--tracking-uri)."
        ) from None
    except Exception as e:  # noqa: BLE001 - a store that fails to answer: one readable message
        raise TrackingError(
            f"Reading run {run_id} from {tracking.redact(uri)} failed: {tracking.redact(str(e))}"
        ) from e

    with tempfile.TemporaryDirectory() as tmp:
        path, note = run_checkpoint.find(client, run, "best", Path(tmp), fix="or pass --checkpoint PATH")
        served = load_checkpoint(path, device=device, fallback_config=lambda: config_artifact(client, run_id))
    served.notes = [note, *served.notes] if note else served.notes
    if not Path(served.checkpoint).is_file():  # a downloaded copy, now gone
        served.checkpoint = f"runs:/{run_id}/{tracking.CHECKPOINT_ARTIFACTS}/{Path(served.checkpoint).name}"
    return served


def config_artifact(client, run_id: str) -> str | None:
    """The run's resolved config artifact (``config/config.yaml``), for checkpoints that carry no config."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
    except Exception:  # noqa: BLE001 - optional: the checkpoint normally carries its config
        return None
