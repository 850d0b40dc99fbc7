"""Checkpoints for resuming: ``last.ckpt`` written often enough that a kill loses minutes, not hours,
and ``resume=<run id | checkpoint path>`` turned into the checkpoint and MLflow run to continue.

A Lightning checkpoint holds the model, optimizer and scheduler states, the loops' progress, the
callbacks' states (best score, early-stopping patience), the train loader's position
(``TensorBatchLoader.state_dict``) and what ``MTLModule.on_save_checkpoint`` adds (RNG states, the
epoch's train metric states and the rows kept since their last update, the MLflow run id). The weighting's
state (learned weights, histories, inner optimisers, generators) is part of the module's ``state_dict``.
Everything in it is tensors and plain containers, so it is loaded with ``torch.load(weights_only=True)``: no
pickled code runs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchmetrics import MetricCollection
from torchmetrics.utilities.data import dim_zero_cat

from mtl_experiments.errors import ConfigError, StorageError

log = logging.getLogger(__name__)
RUN_ID_KEY = "mtl"  # checkpoint["mtl"]["mlflow_run_id"]: the run a checkpoint belongs to


TIME_CHECK_STEPS = 20  # under DDP, LastCheckpoint's clock is consulted every this many steps


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, the state ``resume=`` continues from.

    Written after every training epoch (after validation and the epoch-end hooks: DWA's history,
    the scheduler step) and, inside an epoch, every ``every_n_train_steps`` optimizer steps and every
    ``every_n_minutes`` minutes of training, whichever comes first (0 / null: off). Lightning's own
    ``train_time_interval`` is ignored under manual optimization (which every method here uses), hence
    this class. A step checkpoint is taken after the optimizer step, so it is consistent: parameters,
    optimizer, loop counters and loader position all describe the same finished step.

    ``log_to_mlflow``: also upload ``last.ckpt`` (each time it is written) and the best checkpoint of the
    monitoring ``ModelCheckpoint`` (each time it improves) as the run's artifacts
    ``checkpoints/{last,best}.ckpt``, so ``resume=<run id>`` works on another machine.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 0,
        every_n_minutes: float | None = 5.0,
        log_to_mlflow: bool = False,
    ):
        if int(every_n_train_steps) < 0 or (every_n_minutes is not None and float(every_n_minutes) < 0):
            raise ConfigError(
                "callbacks.last_checkpoint.every_n_train_steps and every_n_minutes must be >= 0 (0 or null: off), "
                f"got {every_n_train_steps} and {every_n_minutes}."
            )
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, enable_version_counter=False)
        self.every_n_steps = int(every_n_train_steps)
        self.every_n_minutes = float(every_n_minutes) if every_n_minutes else None
        self.log_to_mlflow = bool(log_to_mlflow)
        self._last_time = time.monotonic()
        self._saved_at: tuple[int, int] | None = None  # (epoch, batches stepped) of the last save
        self._uploaded_best: str | None = None

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"  # stable when every_n_* change between a run and its resume

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # the epoch's checkpoint follows (after validation); Lightning cannot resume exactly from a
            # checkpoint taken between an epoch's last step and its validation (it skips both)
            return
        by_steps = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        by_time = False
        # under DDP every rank must take the same decision, which costs a collective: ask every TIME_CHECK_STEPS
        # steps, not every step (minutes-scale saving needs no step precision); one process asks every step, free
        if self.every_n_minutes is not None and (
            trainer.world_size == 1 or trainer.global_step % TIME_CHECK_STEPS == 0
        ):
            due = time.monotonic() - self._last_time >= 60 * self.every_n_minutes
            by_time = trainer.strategy.reduce_boolean_decision(due, all=False)
        if by_steps or by_time:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)
        if self.log_to_mlflow:
            self._upload_best(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the epoch's checkpoint is written at the end of the training epoch, after validation."""

    def _save(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        # global_step does not move on a skipped (non-finite) step; this position does
        position = (trainer.current_epoch, trainer.fit_loop.epoch_loop._batches_that_stepped, trainer.global_step)
        if self._saved_at == position:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._saved_at, self._last_time = position, time.monotonic()
        if self.log_to_mlflow and trainer.is_global_zero:
            _upload(trainer, self.last_model_path, "last.ckpt")

    def _upload_best(self, trainer: pl.Trainer) -> None:
        best = next((c.best_model_path for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), "")
        if trainer.is_global_zero and best and best != self._uploaded_best and Path(best).is_file():
            _upload(trainer, best, "best.ckpt")
            self._uploaded_best = best


def _upload(trainer: pl.Trainer, path: str, name: str) -> None:
    """``path`` as the artifact ``checkpoints/<name>`` of the run (through the buffering logger)."""
    import tempfile

    from lightning.pytorch.loggers import MLFlowLogger

    from mtl_experiments import tracking

    loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
    if not loggers:
        log.warning("callbacks.last_checkpoint.log_to_mlflow=true but no MLflow logger is configured.")
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).symlink_to(Path(path).resolve())
        try:
            tracking.log_artifacts(loggers[0], tmp, tracking.CHECKPOINT_ARTIFACTS)
        except Exception as e:  # noqa: BLE001 - the local checkpoint exists; an upload must not stop training
            log.warning("Could not upload %s to MLflow: %s", path, e)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that fail loudly. Lightning's atomic save swallows a ``PermissionError`` (only a
    cross-device one is re-raised), so a run whose checkpoint folder became read-only trained for hours without a
    checkpoint and then failed at test time. Here a local checkpoint is written to a temporary file beside it and
    renamed over it (atomic), and any failure stops the run at once with a ``StorageError`` naming the file, the
    reason and the last good checkpoint (what ``resume=`` would continue from)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_good: str | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # a remote file system: Lightning's fsspec path, then a check that the file is there
            super().save_checkpoint(checkpoint, path, storage_options)
            self.last_good = str(path)
            return
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save(checkpoint, tmp)
            os.replace(tmp, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(
                f"Writing the checkpoint {target} failed ({e.strerror or type(e).__name__}); training stopped so no "
                f"more time is lost without checkpoints. The last good checkpoint is {self.last_good or 'none yet'}. "
                "Free the disk or fix the folder's permissions (or point callbacks.*.dirpath elsewhere), then continue "
                "with resume=<run id>."
            ) from None
        self.last_good = str(target)


def load(path: str | Path) -> dict[str, Any]:
    """A checkpoint as tensors and plain containers (``weights_only=True``: no pickled code runs);
    memory-mapped, so reading its metadata does not read its tensors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated, not a checkpoint, or holding objects we refuse to unpickle
        raise ConfigError(
            f"Cannot load the checkpoint {path} safely: {str(e).splitlines()[0][:300]}. It must be a checkpoint "
            "written by this project (tensors and plain containers, loaded with torch.load(weights_only=True))."
        ) from None


def safe_loading(method) -> dict[str, bool]:
    """``weights_only=True`` for ``Trainer.fit`` / ``test`` where Lightning takes it (2.5+; before, torch's
    default applies, and ``resolve`` has already read the resumed checkpoint with weights_only=True)."""
    return {"weights_only": True} if "weights_only" in inspect.signature(method).parameters else {}


# == the module's own state in a checkpoint: checkpoint["mtl"] (MTLModule.on_save_checkpoint / on_load_checkpoint) ==
# Everything here is tensors and plain containers, so the checkpoint still loads with weights_only=True.
def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, random) as tensors and plain values (weights_only-loadable)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)],
        "random": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (CUDA states only on a machine with as many devices)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))


def logger_run_id(loggers: Sequence[Any]) -> str | None:
    """The MLflow run the first MLflow logger writes to, or None. Lightning's ``MLFlowLogger.run_id`` creates
    the run when it does not exist yet; a logger that says it has not started one (``started``, ours) is not
    asked, so saving a checkpoint never creates a run. On ranks other than 0 Lightning's logger answers None."""
    from lightning.pytorch.loggers import MLFlowLogger

    for lg in loggers:
        if isinstance(lg, MLFlowLogger):
            return lg.run_id if getattr(lg, "started", True) else None
    return None


def check_finite_parameters(named_parameters: Any, step: int) -> None:
    """Refuse to save non-finite parameters: raise, so no NaN model overwrites ``last.ckpt`` or the best one."""
    from mtl_experiments.errors import NonFiniteLossError

    broken = [n for n, p in named_parameters if not torch.isfinite(p).all()]
    if broken:
        raise NonFiniteLossError(
            f"Parameters {broken[:3]} became non-finite by step {step} although the loss was finite "
            "(an exploding update); the checkpoint was not written, the last good one is kept. Lower the "
            "learning rate (optimizer.lr=...) or clip gradients (module.gradient_clip_val=1.0)."
        )


def module_state(
    run_id: str | None,
    train_outputs: dict[str, Any] | None,
    nonfinite: Sequence[int],
    config: str | None,
    meta: dict[str, Any] | None = None,
    train_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``checkpoint["mtl"]``: the MLflow run id (``RUN_ID_KEY``), the RNG states, the epoch's train metrics so far
    (``train_metrics``: their states, ``metric_states``; ``train_outputs``: the rows kept since their last update,
    ``{"outputs", "batch"}``, fewer than ``kept_outputs.FLUSH_ROWS``), the non-finite step counts ``[skipped,
    streak]``, the run's resolved config (YAML) and ``meta``'s items (the run's identity, set by the pipeline)."""
    return {
        "mlflow_run_id": run_id,
        "rng": rng_state(),
        "train_outputs": train_outputs,
        "train_metrics": train_metrics,
        "nonfinite": list(nonfinite),
        "config": config,
        **(meta or {}),
    }


def metric_states(collections: Mapping[str, MetricCollection]) -> dict[str, Any]:
    """``{task: {"updated": bool, "states": {metric: {state: tensor or [tensor]}}}}``: the torchmetrics states of
    one metric set (copies; a list state concatenated into one tensor), weights_only-loadable."""
    out = {}
    for task, metrics in collections.items():
        states = {}
        for name, metric in metrics.items():
            states[name] = {
                k: ([dim_zero_cat(v).clone()] if v else []) if isinstance(v, list) else v.clone()
                for k, v in metric.metric_state.items()
            }
        updated = any(metric.update_called for _, metric in metrics.items())
        out[task] = {"updated": updated, "states": states}
    return out


def load_metric_states(
    collections: Mapping[str, MetricCollection], saved: Mapping[str, Any] | None, device: torch.device
) -> set[str]:
    """Set what ``metric_states`` saved on ``device`` (each state assigned, so the values are exactly the saved
    ones); returns the tasks whose metrics had been updated (torchmetrics' ``update_called`` is not restored)."""
    if not saved:
        return set()
    for task, metrics in collections.items():
        for name, metric in metrics.items():
            metric.reset()
            for k, v in saved[task]["states"][name].items():
                setattr(metric, k, [t.to(device) for t in v] if isinstance(v, list) else v.to(device))
    return {task for task, entry in saved.items() if entry["updated"]}


def compute(metrics: MetricCollection) -> dict[str, Any]:
    """``metrics.compute()`` of states ``load_metric_states`` set and no ``update()`` has changed since, without
    torchmetrics' warning that ``update()`` was not called."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The ``compute`` method of metric", UserWarning)
        return metrics.compute()
