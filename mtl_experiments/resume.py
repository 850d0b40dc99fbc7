"""``resume=<run id | checkpoint>``: which checkpoint and MLflow run a killed run continues, and whether it may.

A checkpoint knows its run: ``checkpoint["mtl"]`` holds the MLflow run id and ``config_hash``, the hash of the
settings a resumed run may not change (everything but where files are, how long and how verbosely it trains:
``RESUME_MAY_CHANGE``). ``resume=`` refuses a checkpoint of another run, or of another configuration, naming the
differences and the command that continues the run as it was. A run killed before its first checkpoint cannot be
continued: it is marked KILLED (it would otherwise stay RUNNING forever) and the message says how to start again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from mtl_experiments import checkpoints, tracking
from mtl_experiments import run_checkpoint as finder
from mtl_experiments.errors import ConfigError

log = logging.getLogger(__name__)
RESUME_FIX = "or pass the checkpoint file instead: resume=/path/to/last.ckpt"

# What a resumed run may change: where files are, how long and how verbosely it trains. Anything else
# (data, model, loss, optimizer, seed, ...) would continue the run with settings its checkpoint and its
# logged params do not describe, so resume refuses it.
RESUME_MAY_CHANGE = ("resume", "paths.", "trainer.", "callbacks.", "logger.", "run_name", "experiment_name")
RESUME_MAY_CHANGE_KEYS = ("data.root", "data.cache_dir")


def fixed_settings(params: Mapping[str, Any]) -> dict[str, str]:
    """The flattened settings a resumed run must keep, as MLflow stores them (strings of at most 250 chars)."""
    return {
        k: str(v)[:250]
        for k, v in params.items()
        if not k.startswith(RESUME_MAY_CHANGE) and k not in RESUME_MAY_CHANGE_KEYS
    }


def config_hash(params: Mapping[str, Any]) -> str:
    """sha256 (16 hex) of ``fixed_settings``: equal exactly when a run may continue from the checkpoint."""
    text = json.dumps(fixed_settings(params), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Resume:
    """What ``resume=`` continues: the checkpoint file, and the MLflow run it belongs to (if any)."""

    checkpoint: Path
    run_id: str | None
    run: Any = None  # mlflow Run, when it is in this store
    dirpaths: dict[str, str] = field(default_factory=dict)  # callback state key -> its checkpoint folder
    meta: dict[str, Any] = field(default_factory=dict)  # checkpoint["mtl"]: config_hash, config (YAML), run id

    def apply(self, callbacks: Sequence[Any]) -> None:
        """Point each ``ModelCheckpoint`` at the folder its saved state refers to, so the best score, the
        best file and ``last.ckpt`` carry on in one place (Lightning drops the best score if it moved).
        A checkpoint from elsewhere whose folder is gone (downloaded from MLflow, copied) is relocated."""
        for cb in callbacks:
            if not isinstance(cb, ModelCheckpoint) or cb.state_key not in self.dirpaths:
                continue
            saved = self.dirpaths[cb.state_key]
            if Path(saved).is_dir():
                cb.dirpath = saved
            elif cb.dirpath is not None:
                log.warning("The checkpoint folder %s is gone: new checkpoints go to %s.", saved, cb.dirpath)

    def check(self, params: Mapping[str, Any]) -> dict[str, tuple]:
        """ConfigError when this run's settings differ from the checkpoint's (or its run's); returns every changed
        param ``{key: (old, new)}`` for the run's tags (the ones a resumed run may change)."""
        old = self.saved_settings()
        differ = {k: v for k, v in diff(old, fixed_settings(params)).items()} if old is not None else {}
        stored = self.meta.get("config_hash")
        if not differ and stored is not None and old is None and stored != config_hash(params):
            differ = {"(settings)": ("the checkpoint's", "this run's")}
        if differ:
            listed = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(differ.items())[:8])
            more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
            overrides = self.run.data.tags.get("overrides", "") if self.run is not None else ""
            who = f"run {self.run_id}" if self.run_id else str(self.checkpoint)
            raise ConfigError(
                f"resume continues {who} with its own settings, but these differ: {listed}{more}. Repeat the "
                f"run's overrides: python train.py {overrides} resume={self.run_id or self.checkpoint}"
            )
        return tracking.changed_params(self.run, params) if self.run is not None else {}

    def saved_settings(self) -> dict[str, str] | None:
        """The run's settings as the checkpoint stored them (its config), else as its MLflow run logged them."""
        config = self.meta.get("config")
        if config:
            return fixed_settings(tracking.flatten(yaml.safe_load(config) or {}))
        if self.run is not None:  # a group's choice is logged as a param mirroring its tag: a name, not a setting
            tags = self.run.data.tags
            return fixed_settings({k: v for k, v in self.run.data.params.items() if tags.get(k) != v})
        return None


def diff(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def resolve(value: str, tracking_uri: str | None, download_to: Path) -> Resume:
    """``resume=<value>``: an existing checkpoint file, else an MLflow run id (its last checkpoint; if only
    its artifacts have one, it is downloaded into ``download_to``). Checked before any data is loaded."""
    value = str(value)
    path = Path(value).expanduser()
    run = None
    if path.is_file():
        ckpt_path = path.resolve()
    elif tracking_uri is not None and len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        run = tracking.get_run(tracking_uri, value)
        ckpt_path = run_checkpoint(tracking_uri, run, download_to)
    else:
        raise ConfigError(
            f"resume={value}: no such checkpoint file, and not an MLflow run id (32 hex characters, the Run ID in "
            "the MLflow UI)" + ("" if tracking_uri else " (no MLflow logger is configured to look it up)") + "."
        )
    ckpt = checkpoints.load(ckpt_path)
    missing = [k for k in ("state_dict", "loops", "optimizer_states") if k not in ckpt]
    if missing:
        raise ConfigError(
            f"resume: {ckpt_path} is not a full training checkpoint (no {', '.join(missing)}); weights-only files "
            "cannot continue a run."
        )
    meta = {
        k: v
        for k, v in (ckpt.get(checkpoints.RUN_ID_KEY) or {}).items()
        if k in ("mlflow_run_id", "config_hash", "config")
    }
    run = own_run(run, meta.get("mlflow_run_id"), ckpt_path, tracking_uri)
    states = ckpt.get("callbacks") or {}
    dirpaths = {k: v["dirpath"] for k, v in states.items() if isinstance(v, dict) and v.get("dirpath")}
    if ckpt_path.parent == download_to.resolve():  # downloaded: continue next to the copies
        del ckpt
        relocate(ckpt_path)
        dirpaths = {k: str(ckpt_path.parent) for k in dirpaths}
    return Resume(ckpt_path, run.info.run_id if run is not None else None, run, dirpaths, meta)


def run_checkpoint(uri: str, run, download_to: Path) -> Path:
    """The checkpoint ``resume=<run id>`` continues from: the run's ``last.ckpt`` (its folder, else its artifacts,
    downloaded with ``best.ckpt`` into ``download_to``; ``run_checkpoint.find``). A RUNNING run without one was
    killed before its first checkpoint: it is marked KILLED (else it stays RUNNING forever) and the error says how
    to start it again."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        path, _ = finder.find(client, run, "last", download_to, fix=RESUME_FIX)
    except ConfigError as e:
        if run.info.status != "RUNNING":
            raise
        with tracking.short_http_retries():
            client.set_terminated(run.info.run_id, "KILLED")
        raise ConfigError(
            f"resume={run.info.run_id}: the run was killed before its first checkpoint ({e}), so there is nothing to "
            f"continue; it is now marked KILLED. Start it again: python train.py {run.data.tags.get('overrides', '')}"
        ) from None
    return path


def own_run(run, written_by: str | None, ckpt_path: Path, tracking_uri: str | None):
    """The MLflow run the checkpoint continues: ``run`` (resume=<run id>) only if the checkpoint is that run's
    (ConfigError otherwise: continuing it would mix two runs' models); for resume=<path>, the run that wrote it."""
    if run is not None and written_by not in (None, run.info.run_id):
        raise ConfigError(
            f"resume={run.info.run_id}: its checkpoint {ckpt_path} was written by another run, {written_by} (two runs "
            f"shared a checkpoint folder), so continuing would mix two models. Continue that run with "
            f"resume={written_by}, or start run {run.info.run_id} again."
        )
    if run is None and written_by and tracking_uri is not None:
        try:
            run = tracking.get_run(tracking_uri, written_by)
        except ConfigError:
            log.warning("Run %s of %s is not in this store: a new MLflow run is started.", written_by, ckpt_path)
    return run


def relocate(ckpt_path: Path) -> None:
    """Rewrite the callbacks' file paths in a downloaded checkpoint to its folder (best.ckpt, last.ckpt)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    folder = ckpt_path.parent
    best = folder / "best.ckpt"
    for state in (ckpt.get("callbacks") or {}).values():
        if not isinstance(state, dict) or "dirpath" not in state:
            continue
        state["dirpath"] = str(folder)
        if state.get("last_model_path"):
            state["last_model_path"] = str(folder / "last.ckpt")
        if state.get("best_model_path"):
            state["best_model_path"] = str(best) if best.is_file() else ""
            score = state.get("best_model_score")
            state["best_k_models"] = {str(best): score} if best.is_file() and score is not None else {}
            state["kth_best_model_path"] = state["best_model_path"]
    tmp = ckpt_path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(ckpt_path)
