"""Per-task model selection and task-wise early stopping (issue 15.3).

Tasks of one model peak at different epochs (on the recsys cold-start data click after 2-3 epochs, interest after
25-30), so one checkpoint chosen on the mean validation metric serves no task at its best. Two callbacks, both
off by default (``conf/callbacks/default.yaml``):

- ``PerTaskSelection`` (``callbacks.selection.mode=per_task``): one extra ``ModelCheckpoint`` per task keeps the
  checkpoint of that task's own best validation epoch; ``test/<task>/...`` (and ``test/<segment>/<task>/...``)
  are measured on it, ``test/mean_<metric>`` is their mean, ``val_best_epoch/<task>`` says which epoch it was, and the
  joint selection's numbers stay in the run as ``joint/test/...``. Cost: T more checkpoints and T more test passes.
  This is early stopping as model selection (Prechelt, "Early Stopping - But When?", 1998) done per task:
  epoch*_t = argbest_e val_t(e).
- ``TaskEarlyStopping`` (``callbacks.task_early_stopping.patience=<n>``): once a task's validation metric has not
  improved by more than ``min_delta`` for ``patience`` validations, the task stops: its loss leaves the weighting
  (weight 0), the parameters only it reaches (its head; its own tower or gate) are frozen, the other tasks train
  on; ``stopped_epoch/<task>`` is logged. When every task has stopped, training ends. Task-wise early stopping is
  from Zhang et al., "Facial Landmark Detection by Deep Multi-task Learning", ECCV 2014 (there: auxiliary tasks,
  stopped on a criterion of their training and validation loss trends); the variant here is the patience rule of
  Lightning's ``EarlyStopping`` applied to each task's own validation metric, for every task.

What weight 0 means for each kind of weighting (the choice, tested in tests/test_selection.py):
- a method that combines losses (``needs_task_grads`` false: equal, DWA, uncertainty, FAMO, ...) keeps its state
  for all T tasks; the stopped task's loss enters it as a constant (no gradient reaches any parameter), so the
  other tasks keep the weights the method gives them;
- a method that aggregates gradients (MGDA, PCGrad, CAGrad, Nash-MTL, GradNorm, ...) sees only the active tasks:
  the stopped task's row of G leaves the aggregation. Scaling the row by 0 would not do: a zero row is a point of
  MGDA's convex hull, whose min-norm element would then be 0 (no update for anyone). From the stop on the method
  runs as a fresh instance of itself, set up for the remaining tasks (a stateful one, e.g. Nash-MTL or MoCo,
  restarts its state on them).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from mtl_experiments import checkpoints, checks, summary_names
from mtl_experiments.errors import ConfigError
from mtl_experiments.module import metric_directions
from mtl_experiments.tasks import Task

log = logging.getLogger(__name__)
MODES = ("joint", "per_task")


def task_monitors(tasks: Mapping[str, Task], optimized_metric: str, metric: str | None = None) -> dict[str, tuple]:
    """``{task: (val/<task>/<metric>, "max"|"min")}``: each task's own validation metric.

    ``metric`` (null: the optimized metric's, e.g. ``auroc`` for ``val/mean_auroc`` or ``val/click/auroc``); a task
    that does not log it is monitored on its own first metric (a regression task under ``val/mean_auroc``)."""
    name = metric or optimized_metric.rsplit("/", 1)[-1].removeprefix("mean_")
    directions = metric_directions(tasks)
    out = {}
    for task_name, task in tasks.items():
        logged = list(task.metrics())
        if metric is not None and metric not in logged:
            raise ConfigError(
                f"callbacks.*.metric must be a metric every task logs, got {metric!r} (task {task_name} logs "
                f"{logged}; null: the optimized metric's)."
            )
        key = f"val/{task_name}/{name if name in logged else logged[0]}"
        out[task_name] = (key, "max" if directions[key] else "min")
    return out


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Better than ``best`` by more than ``min_delta`` (Lightning's EarlyStopping rule); the first value is."""
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


class TaskCallback(pl.Callback):
    """A callback that needs the run's tasks before any MLflow run exists (``pipeline.build_callbacks``)."""

    def prepare(self, tasks: Mapping[str, Task]) -> list[pl.Callback]:
        """Check the settings against ``tasks``; return the callbacks to add to the trainer."""
        return []


class PerTaskSelection(TaskCallback):
    """``mode=per_task``: each task's test metrics from the checkpoint of its own best validation epoch."""

    def __init__(
        self,
        mode: str = "joint",
        optimized_metric: str = "val/mean_auroc",
        metric: str | None = None,
        dirpath: str | None = None,
    ):
        self.mode = checks.choice("callbacks.selection.mode", mode, MODES)
        self.optimized_metric, self.metric, self.dirpath = optimized_metric, metric, dirpath
        self.task_checkpoints: dict[str, ModelCheckpoint] = {}

    @property
    def per_task(self) -> bool:
        return self.mode == "per_task"

    def prepare(self, tasks: Mapping[str, Task]) -> list[ModelCheckpoint]:
        """One ``ModelCheckpoint`` per task on its own metric (none for ``mode=joint``); added to the trainer."""
        if not self.per_task:
            return []
        self.task_checkpoints = {
            name: ModelCheckpoint(
                dirpath=self.dirpath,
                monitor=key,
                mode=mode,
                save_top_k=1,
                save_last=False,
                filename=f"best-{name}-epoch{{epoch:03d}}",
                auto_insert_metric_name=False,
            )
            for name, (key, mode) in task_monitors(tasks, self.optimized_metric, self.metric).items()
        }
        return list(self.task_checkpoints.values())

    def test(self, trainer: pl.Trainer, module, datamodule, joint_path: str | None) -> dict[str, float]:
        """Test the joint checkpoint and each task's own; log ``test/...`` (per task), ``joint/test/...``,
        ``val_best_epoch/<task>`` and ``val_best/<task>/<metric>`` (``summary_names``); return the per-task results."""
        # read before any test: testing a checkpoint restores the callbacks' states saved in it (an older best)
        best = {t: (c.best_model_path, c.best_model_score, c.monitor) for t, c in self.task_checkpoints.items()}
        loggers, trainer.loggers = trainer.loggers, []  # the values are logged once, below, under their names
        try:
            joint = run_test(trainer, module, datamodule, joint_path)
            per_task = {t: run_test(trainer, module, datamodule, path) for t, (path, _, _) in best.items()}
        finally:
            trainer.loggers = loggers
        results = merge_task_results(per_task)
        values = {**results, **{f"joint/{k}": v for k, v in joint.items()}}
        for task, (path, score, monitor) in best.items():
            if path:
                values[summary_names.best_epoch_key(task)] = float(checkpoints.load(path)["epoch"])
            if score is not None:
                values[summary_names.best_key(monitor)] = float(score)
        for logger in loggers:
            logger.log_metrics(values, step=trainer.global_step)
        return results


def run_test(trainer: pl.Trainer, module, datamodule, ckpt_path: str | None) -> dict[str, float]:
    """``trainer.test`` of one checkpoint (None or "": the current weights) -> its logged values."""
    if not ckpt_path:
        log.warning("No best checkpoint was saved; testing the final weights.")
    results = trainer.test(
        module,
        datamodule=datamodule,
        ckpt_path=ckpt_path or None,
        verbose=False,
        **checkpoints.safe_loading(trainer.test),
    )[0]
    return {k: float(v) for k, v in results.items()}


def merge_task_results(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``test/[<segment>/]<task>/<metric>`` taken from that task's own results; ``test/[<segment>/]mean_<metric>``
    recomputed as their mean over the tasks that have the metric (as ``MTLModule`` averages)."""
    merged: dict[str, float] = {}
    groups: dict[str, list[float]] = {}
    for task, results in per_task.items():
        for key, value in results.items():
            parts = key.split("/")
            if len(parts) < 3 or parts[-2] != task:
                continue  # another task's value, a mean or the summed test/loss (joint quantities)
            merged[key] = value
            groups.setdefault("/".join([*parts[:-2], f"mean_{parts[-1]}"]), []).append(value)
    merged.update({key: sum(vals) / len(vals) for key, vals in groups.items()})
    return merged


def reached_parameters(output: Tensor) -> set[int]:
    """The ids of the parameters ``output`` was computed from (a walk of its autograd graph; no computation)."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf, i.e. a parameter
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def own_parameters(outputs: Mapping[str, Tensor], task: str) -> set[int]:
    """The parameters only ``task``'s output depends on (its head; its tower or gate): what freezing it freezes."""
    others = set().union(*(reached_parameters(out) for name, out in outputs.items() if name != task))
    return reached_parameters(outputs[task]) - others


class TaskGate:
    """Stands in front of the weighting in the training step (``MTLModule.task_gate``) and takes the stopped tasks
    out (module docstring): the ``Weighting`` calls ``backward``, ``after_optimizer_step``, ``on_train_epoch_end``,
    ``log_values``. Built before any step (and, resuming, before the checkpoint is loaded), so the copy it keeps for
    the remaining tasks' fresh instance has the method's initial state."""

    def __init__(self, tasks: Mapping[str, Task], weighting, model: nn.Module | None):
        self.tasks, self.weighting, self.model = dict(tasks), weighting, model
        self.template = copy.deepcopy(weighting) if weighting.needs_task_grads else None
        self.stopped: dict[str, int] = {}  # task -> the epoch whose validation stopped it
        self.subset = None
        self.subset_state: dict | None = None

    def stop(self, task: str, epoch: int) -> None:
        self.stopped[task] = epoch
        self.subset, self.subset_state = None, None  # rebuilt for the remaining tasks at the next step

    def active(self, device: torch.device) -> Tensor:
        return torch.tensor([t not in self.stopped for t in self.tasks], device=device)

    def subset_weighting(self, device: torch.device):
        """The gradient method, set up for the active tasks (a fresh instance: its state is that of the subset)."""
        if self.subset is None:
            subset = copy.deepcopy(self.template)
            subset.setup({t: task for t, task in self.tasks.items() if t not in self.stopped}, self.model)
            if self.subset_state is not None:
                subset.load_state_dict(self.subset_state)
            self.subset = subset.to(device)
        return self.subset

    def backward(self, losses: Tensor, task_grads: Tensor | None, shared: list[nn.Parameter], backward_fn) -> Tensor:
        if not self.stopped:
            return self.weighting.backward(losses, task_grads, shared, backward_fn)
        active = self.active(losses.device)
        if self.template is None:  # combines losses: the stopped task's loss is a constant, weight 0
            weights = self.weighting.backward(
                torch.where(active, losses, losses.detach()), task_grads, shared, backward_fn
            )
            return weights * active
        rows = active.nonzero().squeeze(1)
        grads = task_grads[rows] if task_grads is not None else None
        sub = self.subset_weighting(losses.device).backward(losses[rows], grads, shared, backward_fn)
        weights = torch.zeros(len(active), dtype=sub.dtype, device=sub.device)
        weights[rows] = sub
        return weights

    def after_optimizer_step(self, losses: Tensor) -> None:
        if self.subset is None:
            self.weighting.after_optimizer_step(losses)
        else:
            self.subset.after_optimizer_step(losses[self.active(losses.device)])

    def on_train_epoch_end(self, epoch: int) -> None:
        (self.subset if self.subset is not None else self.weighting).on_train_epoch_end(epoch)

    def log_values(self) -> dict[str, Tensor]:
        return (self.subset if self.subset is not None else self.weighting).log_values()

    def state_dict(self) -> dict[str, Any]:
        subset = self.subset.state_dict() if self.subset is not None else self.subset_state
        return {"stopped": dict(self.stopped), "subset": subset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stopped, self.subset_state, self.subset = dict(state["stopped"]), state["subset"], None


class TaskEarlyStopping(TaskCallback):
    """Stops a task once ``val/<task>/<metric>`` has not improved by more than ``min_delta`` for ``patience``
    validations (Lightning's ``EarlyStopping`` rule, per task); ``patience=null``: off.

    A stopped task leaves the weighting (``TaskGate``) and its own parameters are frozen (module docstring). The
    state (each task's best value and wait, the stop epochs, the remaining tasks' weighting) is saved in
    checkpoints, so ``resume=`` continues.
    """

    def __init__(
        self,
        patience: int | None = None,
        optimized_metric: str = "val/mean_auroc",
        metric: str | None = None,
        min_delta: float = 0.0,
    ):
        hint = "validations without improvement before a task stops; null: off"
        self.patience = checks.optional(
            checks.positive_int, "callbacks.task_early_stopping.patience", patience, hint=hint
        )
        self.min_delta = checks.non_negative_number("callbacks.task_early_stopping.min_delta", min_delta)
        self.optimized_metric, self.metric = optimized_metric, metric
        self.best: dict[str, float] = {}
        self.wait: dict[str, int] = {}
        self.monitors: dict[str, tuple] = {}
        self.gate: TaskGate | None = None
        self.model: nn.Module | None = None
        self.frozen: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    def prepare(self, tasks: Mapping[str, Task]) -> list[pl.Callback]:
        if self.enabled:  # the metric is checked before the run starts
            self.monitors = task_monitors(tasks, self.optimized_metric, self.metric)
        return []

    @property
    def stopped(self) -> dict[str, int]:
        return self.gate.stopped if self.gate is not None else {}

    def check_trainer(self, trainer: pl.Trainer) -> None:
        """One process only: under DDP a frozen task's parameters would get no gradient, which DDP refuses."""
        if self.enabled and trainer.world_size > 1:
            raise ConfigError(
                f"callbacks.task_early_stopping.patience must be null under DDP, got {self.patience} (world size "
                f"{trainer.world_size}); train on one device, or turn task-wise early stopping off."
            )

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if not self.enabled or stage != "fit":
            return
        self.check_trainer(trainer)
        self.monitors = task_monitors(pl_module.tasks, self.optimized_metric, self.metric)
        self.model = pl_module.model
        self.gate = TaskGate(pl_module.tasks, pl_module.weighting, pl_module.model)
        pl_module.task_gate = self.gate

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        for task, (key, mode) in self.monitors.items():
            value = trainer.callback_metrics.get(key)
            if task in self.stopped or value is None:
                continue
            if improved(float(value), self.best.get(task), mode, self.min_delta):
                self.best[task], self.wait[task] = float(value), 0
            else:
                self.wait[task] = self.wait.get(task, 0) + 1
                if self.wait[task] >= self.patience:
                    self.stop(task, trainer.current_epoch, trainer.loggers, trainer.global_step)
        if len(self.stopped) == len(self.monitors):
            trainer.should_stop = True  # nothing left to train

    def stop(self, task: str, epoch: int, loggers=(), step: int = 0) -> None:
        """Stop ``task`` from the next training step on; log ``stopped_epoch/<task>`` = ``epoch``."""
        self.gate.stop(task, epoch)
        log.info("Task-wise early stopping: task %s stopped after epoch %d.", task, epoch)
        for logger in loggers:
            logger.log_metrics({f"stopped_epoch/{task}": float(epoch)}, step=step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch: Any, batch_idx: int) -> None:
        """Freeze the parameters only the stopped tasks reach (once per stop, and again after a resume)."""
        if not self.enabled or self.frozen == set(self.stopped):
            return
        was_training = self.model.training
        # a probe forward in eval mode (no dropout, batch-norm statistics untouched) with the RNG restored after:
        # the training run is the one it would have been without the probe (resume stays exact)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            self.model.eval()
            outputs = self.model(batch["features"])
        self.model.train(was_training)
        own = set().union(*(own_parameters(outputs, task) for task in self.stopped))
        for param in self.model.parameters():
            if id(param) in own:
                param.requires_grad_(False)
        self.frozen = set(self.stopped)

    def state_dict(self) -> dict[str, Any]:
        gate = self.gate.state_dict() if self.gate is not None else None
        return {"best": dict(self.best), "wait": dict(self.wait), "gate": gate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.wait = dict(state_dict["best"]), dict(state_dict["wait"])
        if self.gate is not None and state_dict["gate"] is not None:
            self.gate.load_state_dict(state_dict["gate"])
        self.frozen = set()
