"""MTLModule: the one training step shared by every weighting method (DESIGN.md §5).

Manual optimization, one path:
1. forward; per-task losses stacked in config order;
2. per-task gradients of the shared dense parameters, only when the weighting asks for them;
3. ``weights = weighting.backward(losses, grads, shared, self.manual_backward)`` (one real backward);
4. gradient clipping and scheduler stepping here (Lightning does neither under manual optimization);
5. optimizer step; the weighting's hooks; logging.

Task-conflict metrics (``module.conflict``, ``mtl_experiments/metrics/conflict.py``) are measured every
``conflict.every_n_steps`` optimizer steps from the same per-task gradients: one ``task_gradients`` call
per step covers everything asked for that step (the weighting's inputs, the metrics' inputs, the shared
parameters for the lookahead affinity), and each consumer takes its columns, so no gradient is computed
twice (PCGrad's G is the metrics' G; GradNorm's last-layer G is a slice of the shared G).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from mtl_experiments.errors import ConfigError, NonFiniteLossError
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.base import Weighting
from mtl_experiments.metrics.conflict import (
    ConflictConfig,
    ConflictTracker,
    lookahead_affinity,
    same_tensors,
    select_columns,
    union_inputs,
)
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.tasks import Task

STAGES = ("train", "val", "test")
log = logging.getLogger(__name__)


def metric_directions(tasks: Mapping[str, Task], stage: str = "val") -> dict[str, bool]:
    """Every metric key the module logs for ``stage`` -> whether higher is better."""
    out = {f"{stage}/loss": False}
    for name, task in tasks.items():
        for metric_name, metric in task.metrics().items():
            out[f"{stage}/{name}/{metric_name}"] = bool(metric.higher_is_better)
            out[f"{stage}/mean_{metric_name}"] = bool(metric.higher_is_better)
    return out


class MTLModule(pl.LightningModule):
    """Trains ``model`` on ``tasks`` with ``weighting``.

    ``optimizer`` is a partial taking parameter groups; ``scheduler`` is ``{"scheduler": partial,
    "interval": "epoch"|"step", "monitor": key}`` or None. Learned weighting parameters get their own
    parameter group without weight decay (decaying log-variances or task weights changes the method).
    ``conflict``: ``{every_n_steps, source, affinity_every_n_steps}`` (``conf/module/default.yaml``);
    None turns the conflict metrics off. A backbone that shares nothing (single_task) has none.
    """

    def __init__(
        self,
        model: MultiTaskModel,
        tasks: Mapping[str, Task],
        weighting: Weighting,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Mapping[str, Any] | None = None,
        gradient_clip_val: float = 0.0,
        gradient_clip_algorithm: str = "norm",
        train_metrics: bool = True,
        conflict: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.tasks, self.weighting = model, dict(tasks), weighting
        self.optimizer_factory, self.scheduler_cfg = optimizer, dict(scheduler) if scheduler else None
        self.gradient_clip_val, self.gradient_clip_algorithm = float(gradient_clip_val), gradient_clip_algorithm
        self.train_metrics = train_metrics
        self._train_outputs = []
        self.weighting.setup(self.tasks, model)
        self._shares_parameters = bool(model.shared_parameters())
        if weighting.needs_task_grads and not self._shares_parameters:
            warnings.warn(
                f"{type(weighting).__name__} aggregates gradients of shared parameters, but "
                f"{type(model.backbone).__name__} shares none: here it acts as equal weighting.",
                stacklevel=2,
            )
        self.conflict_config = ConflictConfig.from_mapping(conflict)
        self.conflict_tracker: ConflictTracker | None = None
        if self.conflict_config.enabled and not self._shares_parameters:
            log.info("%s shares no parameters: no task-conflict metrics.", type(model.backbone).__name__)
        elif self.conflict_config.enabled:
            if (
                self.conflict_config.every_n_steps
                and self.conflict_config.source == "representation"
                and not model.backbone.has_representation
            ):
                raise ConfigError(
                    "module.conflict.source=representation needs a backbone with one shared representation; "
                    f"{type(model.backbone).__name__} has none. Use module.conflict.source=params."
                )
            self.conflict_tracker = ConflictTracker(list(self.tasks), self.conflict_config)
        # nn.ModuleDict keys may not shadow Module attributes ("train"), hence the "on_" prefix
        self.task_metrics = nn.ModuleDict(
            {
                f"on_{stage}": nn.ModuleDict({name: task.metrics() for name, task in self.tasks.items()})
                for stage in STAGES
            }
        )

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = [{"params": list(self.model.parameters())}]
        weighting_params = [p for p in self.weighting.parameters() if p.requires_grad]
        if weighting_params:
            groups.append({"params": weighting_params, "weight_decay": 0.0})
        optimizer = self.optimizer_factory(groups)
        if not self.scheduler_cfg:
            return optimizer
        scheduler = self.scheduler_cfg["scheduler"](optimizer)
        # stepped by this module (interval/monitor are read from scheduler_cfg), not by Lightning
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model(features)

    def _losses(self, outputs: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        return torch.stack([task.loss(outputs[name], labels[name]) for name, task in self.tasks.items()])

    def _check_finite(self, losses: Tensor) -> None:
        if not torch.isfinite(losses).all():
            bad = {n: float(v) for n, v in zip(self.tasks, losses.detach().cpu(), strict=True) if not torch.isfinite(v)}
            raise NonFiniteLossError(
                f"Non-finite loss for task(s) {bad} at epoch {self.current_epoch}, step {self.global_step}. "
                "Training stopped so no more time is wasted. Usual fixes: lower the learning rate "
                "(optimizer.lr=...), clip gradients (module.gradient_clip_val=1.0), or check those tasks' "
                "labels and features for extreme values."
            )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        features, labels = batch["features"], batch["labels"]
        outputs = self.model(features)
        losses = self._losses(outputs, labels)
        self._check_finite(losses)
        shared = self.model.shared_parameters()
        step = self.global_step + 1  # this step's number once opt.step() has run, as the logging below counts
        tracker = self.conflict_tracker
        measure = tracker is not None and tracker.measures(step)
        affinity = tracker is not None and tracker.affinity_due(step)
        weighting_inputs = (
            self.weighting.task_grad_inputs(self.model)
            if self.weighting.needs_task_grads and self._shares_parameters
            else None
        )
        conflict_inputs = tracker.inputs(self.model) if tracker is not None and tracker.config.every_n_steps else None
        # train/grad_norm/<task> means the norm over the conflict metrics' inputs when those are on; the
        # weighting's norms are logged under that name only when they are the same quantity
        weighting_norms = conflict_inputs is None or same_tensors(weighting_inputs, conflict_inputs)
        # one task_gradients call for everything needed this step; each consumer takes its columns
        inputs = union_inputs(weighting_inputs, conflict_inputs if measure else None, shared if affinity else None)
        all_grads = task_gradients(losses, inputs) if inputs else None
        grads = select_columns(all_grads, inputs, weighting_inputs) if weighting_inputs is not None else None
        gates = getattr(self.model.backbone, "gate_weights", None) if measure else None  # read before any re-forward
        opt.zero_grad()
        weights = self.weighting.backward(losses, grads, shared, self.manual_backward)
        if self.gradient_clip_val > 0:
            self.clip_gradients(
                opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm=self.gradient_clip_algorithm
            )
        conflict_logs: dict[str, Tensor] = {}
        affinity_logs: dict[str, Tensor] = {}
        if measure:
            conflict_logs = self._measure_conflict(
                select_columns(all_grads, inputs, conflict_inputs), shared, weights, step, gates
            )
        if affinity:  # before opt.step(): the lookahead starts from this step's parameters
            lr = next(g["lr"] for g in opt.optimizer.param_groups if any(p is shared[0] for p in g["params"]))
            z = lookahead_affinity(
                self.model, features, labels, self._losses, shared, select_columns(all_grads, inputs, shared), lr
            )
            affinity_logs = tracker.update_affinity(z)
        opt.step()
        self.weighting.after_optimizer_step(losses.detach())
        if self.scheduler_cfg and self.scheduler_cfg.get("interval") == "step":
            self.lr_schedulers().step()

        if self.train_metrics:  # kept as tensors; metrics are updated once per epoch (cheaper than per step)
            self._train_outputs.append(({n: o.detach() for n, o in outputs.items()}, labels))
        # Lightning writes step values only every log_every_n_steps; calling self.log on the other steps
        # costs ~0.3 ms per key for nothing (measured with scripts/benchmark.py). After opt.step(),
        # global_step is the step number Lightning's logger connector tests.
        every = self.trainer.log_every_n_steps
        writes = bool(every) and (self.global_step % every == 0 or self.trainer.should_stop)
        # Conflict values ride on Lightning's write only when measured at exactly its cadence: Lightning
        # re-writes every key self.log'd earlier in the epoch at each later write, so a key logged on
        # fewer steps would be re-written with stale values. Otherwise they are written directly to the
        # loggers (one extra store write per measurement, ~25 ms on SQLite).
        merged, direct = {}, {}
        for values, cadence in (
            (conflict_logs, self.conflict_config.every_n_steps),
            (affinity_logs, self.conflict_config.affinity_every_n_steps),
        ):
            (merged if writes and cadence == every else direct).update(values)
        if writes:
            losses = losses.detach()
            logs = {"train/loss": (weights * losses).sum()}
            norms = grads.norm(dim=1) if grads is not None and weighting_norms else None
            for i, name in enumerate(self.tasks):
                logs[f"train/loss/{name}"] = losses[i]
                logs[f"train/weight/{name}"] = weights[i]
                if norms is not None:
                    logs[f"train/grad_norm/{name}"] = norms[i]
            logs.update({f"train/{k}": v.detach() for k, v in self.weighting.log_values().items()})
            logs.update(merged)
            direct = {k: v for k, v in direct.items() if k not in logs}  # e.g. grad norms Lightning writes anyway
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(labels[name]))
        if direct:  # at the step number Lightning's connector would write (batches stepped before this one)
            values = {k: float(v) for k, v in direct.items()}
            for logger in self.loggers:
                logger.log_metrics(values, step=step - 1)

    def _measure_conflict(
        self, grads: Tensor, shared: list[nn.Parameter], weights: Tensor, step: int, gates: Any
    ) -> dict[str, Tensor]:
        """The conflict metrics of this step, from G over the conflict inputs and the applied update."""
        if self.conflict_config.source == "params":
            # what the optimizer receives for the shared parameters (after the weighting and clipping)
            update = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared])
        else:  # the representation's update: the weighted combination of its task gradients
            update = weights.to(grads.dtype) @ grads
        values = self.conflict_tracker.update(grads, update, weights, step)
        if isinstance(gates, Mapping):
            values.update(self.conflict_tracker.update_gates(gates))
        return values

    def on_fit_start(self) -> None:
        if self.weighting.needs_task_grads and str(self.trainer.precision).startswith("16"):
            # a GradScaler scales the real backward but not the per-task gradients we write into .grad
            raise ConfigError(
                f"{type(self.weighting).__name__} computes per-task gradients, which float16 mixed precision "
                "(loss scaling) would corrupt; use trainer.precision=bf16-mixed or 32."
            )

    def on_train_epoch_start(self) -> None:
        self._train_outputs: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        if self.conflict_tracker is not None:
            self.conflict_tracker.start_epoch()

    def on_train_end(self) -> None:
        # run-level conflict summaries, once, as plain metrics the MLflow UI can sort runs by
        summaries = self.conflict_tracker.summaries() if self.conflict_tracker is not None else {}
        if summaries:
            for logger in self.loggers:
                logger.log_metrics(summaries, step=self.global_step)

    # -- evaluation -----------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> None:
        outputs = self.model(batch["features"])
        labels = batch["labels"]
        losses = self._losses(outputs, labels)
        for name, task in self.tasks.items():
            task.update_metrics(self.task_metrics[f"on_{stage}"][name], outputs[name], labels[name])
        self.log(
            f"{stage}/loss", losses.sum(), on_step=False, on_epoch=True, batch_size=len(next(iter(labels.values())))
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        values, by_metric = {}, {}
        for name, metrics in self.task_metrics[f"on_{stage}"].items():
            if not metrics[next(iter(metrics.keys()))].update_called:
                continue
            for metric_name, value in metrics.compute().items():
                values[f"{stage}/{name}/{metric_name}"] = value.float()
                by_metric.setdefault(metric_name, []).append(value.float())
            metrics.reset()
        for metric_name, vals in by_metric.items():
            values[f"{stage}/mean_{metric_name}"] = torch.stack(vals).mean()
        if values:
            self.log_dict(values, on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        if self.train_metrics and self._train_outputs:
            for name, task in self.tasks.items():
                outputs = torch.cat([out[name] for out, _ in self._train_outputs])
                labels = torch.cat([lab[name] for _, lab in self._train_outputs])
                task.update_metrics(self.task_metrics["on_train"][name], outputs, labels)
            self._train_outputs = []
            self._log_epoch_metrics("train")
        self.weighting.on_train_epoch_end(self.current_epoch)
        if self.scheduler_cfg and self.scheduler_cfg.get("interval", "epoch") == "epoch":
            scheduler = self.lr_schedulers()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor = self.scheduler_cfg.get("monitor")
                if monitor in self.trainer.callback_metrics:
                    scheduler.step(self.trainer.callback_metrics[monitor])
            else:
                scheduler.step()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")
