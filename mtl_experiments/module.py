"""MTLModule: the one training step shared by every weighting method (DESIGN.md §5).

Manual optimization, one path, each a call in ``training_step``:
1. forward; per-task losses stacked in config order (the global batch's values under DDP); the non-finite
   and divergence checks (``module.nonfinite``, ``module.divergence``: ``mtl_experiments/divergence.py``);
2. per-task gradients, once, for everything that needs them this step (``grads.plan``: the weighting's
   inputs, the conflict metrics' inputs, the shared parameters for the lookahead affinity);
3. ``weights = weighting.backward(losses, grads, shared, backward_fn)`` (one real backward: ``manual_backward``), then
   gradient clipping (Lightning clips nothing under manual optimization);
4. the conflict metrics and the lookahead affinity (``metrics/conflict.py``, ``grads.lookahead_affinity``),
   measured every ``conflict.every_n_steps`` / ``affinity_every_n_steps`` optimizer steps from that same G;
5. optimizer step; the weighting's hooks; the scheduler (stepped here, Lightning does not under manual
   optimization); logging at Lightning's cadence.

Under DDP (``trainer=ddp``) every rank computes exactly what one process would compute on the global
batch (the ranks' shares together), so every rank applies the same update and the replicas never drift:
- the losses a weighting sees have the global batch's values and this rank's gradients
  (``grads.global_losses``: one all-reduce of T numbers), so loss-level methods, their histories (DWA,
  FAMO), GradNorm's loss ratios, the NaN check and the divergence check agree on every rank;
- ``G`` is taken on this rank's share with ``autograd.grad`` (DDP's hooks do not fire) and made the global
  batch's ``G`` *before* anything aggregates or measures it (``grads.sync_task_gradients``: the mean over
  ranks for parameters, the gathered batch for the representation);
- the one real backward (``manual_backward``, excluding nothing) runs inside DDP, which averages every gradient,
  the non-shared parameters' included; a gradient-level method then overwrites the shared parameters'
  averaged gradient with its aggregate of the global ``G``, after DDP's reduction has finished, so the
  update is neither averaged twice nor lost. Conflict metrics use the same global ``G`` (rank 0 logs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from mtl_experiments import checkpoints, checks, grads
from mtl_experiments.divergence import DivergenceConfig, DivergenceDetector, global_norm
from mtl_experiments.errors import ConfigError, NonFiniteLossError
from mtl_experiments.grads import gather_batch, global_losses, lookahead_affinity, mean_over_ranks, world_size
from mtl_experiments.kept_outputs import KeptOutputs
from mtl_experiments.loss.base import Weighting, backward_for
from mtl_experiments.metrics.conflict import ConflictConfig, ConflictTracker
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.optimizer.sparse_adam import check_sparse_training
from mtl_experiments.tasks import Task

STAGES = ("train", "val", "test")
NONFINITE_POLICIES = ("stop", "skip")
CLIP_ALGORITHMS = ("norm", "value")
log = logging.getLogger(__name__)


def host_values(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """``{key: float}`` of scalar tensors (and numbers), from one copy to the host: one synchronisation per call
    on an accelerator, not one per key."""
    tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in tensors.values()])
        out.update(zip(tensors, stacked.tolist(), strict=True))
    return out


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
    ``divergence``: ``{action, loss_factor, rising_steps, max_param_norm, max_grad_norm}``
    (``mtl_experiments/divergence.py``); None turns the detection off.
    ``segments``: the datamodule's evaluation segments (``warm``, ``cold_user``, ``cold_item``): validation and
    test metrics are also logged per segment, ``{stage}/{segment}/{task}/{metric}``. A task's rows without a
    label (``Task.valid``, ``observed_if``) take no part in its loss or metrics.

    Set by the pipeline, saved in every checkpoint (``checkpoint["mtl"]``): ``run_config``, the run's resolved
    config (YAML, under ``"config"``), and ``checkpoint_meta``, whose items are merged in as they are.
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
        nonfinite: str = "stop",
        max_consecutive_nonfinite: int = 10,
        segments: tuple[str, ...] = (),
        divergence: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.nonfinite = checks.choice("module.nonfinite", nonfinite, NONFINITE_POLICIES)
        self.max_consecutive_nonfinite = checks.positive_int(
            "module.max_consecutive_nonfinite", max_consecutive_nonfinite
        )
        self.run_config: str | None = None  # the run's resolved config (YAML), saved in checkpoints by the pipeline
        self.checkpoint_meta: dict[str, Any] = {}  # merged into checkpoint["mtl"] (the run's identity)
        self.task_gate = None  # set by selection.TaskEarlyStopping (its TaskGate): stopped tasks leave the weighting
        self.nonfinite_skipped, self._nonfinite_streak = 0, 0
        self.automatic_optimization = False
        self.model, self.tasks, self.weighting = model, dict(tasks), weighting
        self.optimizer_factory, self.scheduler_cfg = optimizer, dict(scheduler) if scheduler else None
        self.gradient_clip_val = checks.non_negative_number(
            "module.gradient_clip_val", gradient_clip_val, hint="0: off"
        )
        self.gradient_clip_algorithm = checks.choice(
            "module.gradient_clip_algorithm", gradient_clip_algorithm, CLIP_ALGORITHMS
        )
        # sparse id tables (features.sparse=true): an optimizer or clipping that cannot take their gradients fails now
        check_sparse_training(model, optimizer, self.gradient_clip_val, gradient_clip_algorithm)
        self.train_metrics = checks.boolean("module.train_metrics", train_metrics)
        # the rows since the train metrics' last update, which it makes every kept_outputs.FLUSH_ROWS rows
        self._train_outputs = KeptOutputs(list(self.tasks), self._update_train_metrics)
        self._train_restored: set[str] = set()  # tasks whose train metric states came from a checkpoint
        self.weighting.setup(self.tasks, model)
        self._shares_parameters = bool(model.shared_parameters())
        if weighting.needs_task_grads and not self._shares_parameters:
            # logged, not warnings.warn: Hydra builds the module, so a warning's line would point into Hydra
            log.warning(
                "%s aggregates gradients of shared parameters, but %s shares none: here it acts as equal weighting.",
                type(weighting).__name__,
                type(model.backbone).__name__,
            )
        self.conflict_config = ConflictConfig.from_mapping(conflict)
        self.conflict_tracker = self._conflict_tracker()
        divergence_config = DivergenceConfig.from_mapping(divergence)
        self.divergence = DivergenceDetector(list(self.tasks), divergence_config) if divergence_config.enabled else None
        # nn.ModuleDict keys may not shadow Module attributes ("train"), hence the "on_" prefix
        # evaluation segments (warm / cold_user / cold_item, data/base.py): val and test get one metric set each
        self.segments = tuple(segments)
        keys = [*STAGES, *(f"{stage}_{segment}" for stage in ("val", "test") for segment in self.segments)]
        self.task_metrics = nn.ModuleDict(
            {f"on_{key}": nn.ModuleDict({name: task.metrics() for name, task in self.tasks.items()}) for key in keys}
        )

    def _conflict_tracker(self) -> ConflictTracker | None:
        """The conflict metrics of ``module.conflict``, or None (off, or a backbone that shares nothing)."""
        cfg, backbone = self.conflict_config, self.model.backbone
        if not cfg.enabled:
            return None
        if not self._shares_parameters:
            log.info("%s shares no parameters: no task-conflict metrics.", type(backbone).__name__)
            return None
        if cfg.every_n_steps and cfg.source == "representation" and not backbone.has_representation:
            raise ConfigError(
                "module.conflict.source=representation needs a backbone with one shared representation; "
                f"{type(backbone).__name__} has none. Use module.conflict.source=params."
            )
        layers = grads.shared_layers(self.model, self.model.shared_parameters())
        return ConflictTracker(list(self.tasks), cfg, layers)

    # -- optimisation ---------------------------------------------------------------------------
    @property
    def step_weighting(self):
        """What the training step calls the Weighting methods of: the weighting, or ``task_gate`` in front of it."""
        return self.weighting if self.task_gate is None else self.task_gate

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

    def _label_mask(self, name: str, labels: Mapping[str, Tensor]) -> Tensor | None:
        """Rows that carry a label for task ``name`` (None: all): the task's own rule (a retrieval row without
        a next item) and ``observed_if`` (like only after a click); the rest take no part in loss or metrics."""
        task = self.tasks[name]
        mask = task.valid(labels[name])
        if task.observed_if is not None:
            observed = labels[task.observed_if] > 0.5
            mask = observed if mask is None else mask & observed
        return mask

    def _losses(self, outputs: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
        losses = []
        for name, task in self.tasks.items():
            output, target, mask = outputs[name], labels[name], self._label_mask(name, labels)
            if mask is None:
                losses.append(task.loss(output, target))
            elif mask.any():
                losses.append(task.loss(output[mask], target[mask]))
            else:  # no labelled row in this batch: zero, still connected to the graph (every task has a gradient)
                losses.append(output.sum() * 0.0)
        return torch.stack(losses)

    def _update_metrics(
        self, metrics: nn.ModuleDict, outputs: Mapping[str, Tensor], batch: Mapping, rows: Tensor | None = None
    ) -> None:
        """Update each task's metrics on its labelled rows (of ``rows``, a segment's mask, when given), with the
        batch's user / item ids as context (grouped AUC)."""
        labels = batch["labels"]
        ids = {k: batch[k] for k in ("user_id", "item_id") if k in batch}
        for name, task in self.tasks.items():
            mask = self._label_mask(name, labels)
            if rows is not None:
                mask = rows if mask is None else mask & rows
            if mask is not None and not mask.any():
                continue
            output, target, context = outputs[name], labels[name], ids
            if mask is not None:
                output, target, context = output[mask], target[mask], {k: v[mask] for k, v in ids.items()}
            task.update_metrics(metrics[name], output, target, context or None)

    def _check_finite(self, losses: list[float]) -> bool:
        """True when every task loss (values on the host) is finite; otherwise ``module.nonfinite`` decides.

        ``stop``: raise NonFiniteLossError naming the task(s) and the step (the run ends FAILED; no
        checkpoint is written after it, so ``last.ckpt`` is the last good state). ``skip``: return False
        so the caller skips the step (no backward, no update, no weighting hook), count it
        (``train/nonfinite_skipped``), and raise after ``max_consecutive_nonfinite`` skips in a row (then
        it is not a bad batch but a broken model). Under DDP the losses are the global batch's, so every
        rank takes the same decision.
        """
        if all(math.isfinite(v) for v in losses):
            if self._nonfinite_streak:  # (nn.Module's __setattr__ costs ~1 µs: not every step)
                self._nonfinite_streak = 0
            return True
        bad = {n: v for n, v in zip(self.tasks, losses, strict=True) if not math.isfinite(v)}
        batch = self.trainer.fit_loop.epoch_loop.batch_idx if self._trainer is not None else 0
        where = f"step {self.global_step + 1} (epoch {self.current_epoch}, batch {batch} of the epoch)"
        fixes = (
            "Usual fixes: lower the learning rate (optimizer.lr=...), clip gradients (module.gradient_clip_val=1.0), "
            "or check those tasks' labels and features for extreme values"
        )
        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"Non-finite loss for task(s) {bad} at {where}. Training stopped so no more time is wasted; "
                f"the last checkpoint before it is kept. {fixes} (or module.nonfinite=skip to skip such steps)."
            )
        self.nonfinite_skipped += 1
        self._nonfinite_streak += 1
        if self._nonfinite_streak >= self.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self._nonfinite_streak} consecutive steps had a non-finite loss (the last: task(s) {bad} at "
                f"{where}); stopping, as the model itself is likely broken (module.max_consecutive_nonfinite="
                f"{self.max_consecutive_nonfinite}). {fixes}."
            )
        if self.nonfinite_skipped <= 10 or self.nonfinite_skipped % 100 == 0:
            log.warning(
                "Skipped %s: non-finite loss for task(s) %s (%d skipped so far).", where, bad, self.nonfinite_skipped
            )
        if self._trainer is not None:  # cumulative: the value Lightning re-writes at its later writes stays right
            self.log(
                "train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False, batch_size=1
            )
        return False

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        outputs = self.model(batch["features"])
        local_losses = self._losses(outputs, batch["labels"])
        # under DDP: the global batch's loss values on every rank, this rank's gradients (grads.global_losses);
        # the checks then see the same values everywhere, so every rank takes the same decision
        losses = global_losses(local_losses)
        if not self._check_losses(losses):  # module.nonfinite=skip: this step is skipped
            return
        step = self.global_step + 1  # this step's number once opt.step() has run, as the logging below counts
        weighting = self.weighting if self._shares_parameters else None
        shared = self.model.shared_parameters()  # once a step: a walk over the backbone's modules (~10-20 µs)
        plan = grads.plan(self.model, weighting, self.conflict_tracker, step, shared).compute(local_losses)
        task_grads = plan.columns("weighting")
        gates = self._gates() if plan.conflict is not None else None  # read before any re-forward
        weights = self._backward(opt, losses, task_grads, shared)
        # before opt.step(): the lookahead affinity starts from this step's parameters
        measured = self._measure(opt, plan, weights, step, gates, batch, shared)
        if plan.tracked is not None:  # the function-space estimators, from this step's outputs (no backward)
            masks = {name: self._label_mask(name, batch["labels"]) for name in self.tasks}
            self.conflict_tracker.track_outputs(self.tasks, outputs, batch["labels"], masks)
        opt.step()
        self.step_weighting.after_optimizer_step(losses.detach())
        self._step_scheduler("step")
        if self.train_metrics:  # kept as tensors; the metrics are updated every FLUSH_ROWS rows (cheaper than per step)
            self._train_outputs.append(outputs, batch)
        norms_of = task_grads if plan.weighting_norms else None
        self._log_step(losses.detach(), weights, norms_of, measured, step, batch["labels"])

    def _check_losses(self, losses: Tensor) -> bool:
        """The non-finite check, then the divergence check, from one copy of the T losses on the host (the
        non-finite check's own synchronisation: the divergence check adds none). Checked in Python: on CPU
        ``torch.isfinite(losses).all()`` and its ``bool`` cost ~18 µs, the host copy and ``math.isfinite`` ~1 µs."""
        values = losses.detach().tolist()
        if not self._check_finite(values):
            return False
        if self.divergence is not None:
            self.divergence.check_losses(values, self.global_step + 1, self.current_epoch)
        return True

    def _gates(self) -> Any:
        """A mixture backbone's gates of this forward (``gate_weights``), the global batch's under DDP."""
        gates = getattr(self.model.backbone, "gate_weights", None)
        if isinstance(gates, Mapping) and world_size() > 1:  # the global batch's gates (rank 0 logs them)
            gates = {name: gather_batch(g) for name, g in gates.items()}
        return gates

    def _backward(self, opt, losses: Tensor, task_grads: Tensor | None, shared: list[nn.Parameter]) -> Tensor:
        """The weighting's one real backward (weights ``[T]`` returned), then gradient clipping."""
        opt.zero_grad()
        with self._full_precision():
            weights = self.step_weighting.backward(losses, task_grads, shared, backward_for(self.manual_backward, opt))
        if self.divergence is not None:
            self._check_norms()
        if self.gradient_clip_val > 0:
            self.clip_gradients(
                opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm=self.gradient_clip_algorithm
            )
        return weights

    def _check_norms(self) -> None:
        """``module.divergence.max_param_norm`` / ``max_grad_norm``: the model's parameter and gradient L2 norms
        (before clipping), computed only when a bound is set (one synchronisation for both)."""
        cfg = self.divergence.config
        if cfg.max_param_norm is None and cfg.max_grad_norm is None:
            return
        params = list(self.model.parameters())
        norms = [global_norm([p.detach() for p in params]), global_norm([p.grad for p in params if p.grad is not None])]
        param_norm, grad_norm = torch.stack([n.to(self.device) for n in norms]).tolist()
        self.divergence.check_norm("param", param_norm, self.global_step + 1, self.current_epoch)
        self.divergence.check_norm("grad", grad_norm, self.global_step + 1, self.current_epoch)

    def _measure(self, opt, plan: grads.StepGradients, weights: Tensor, step: int, gates: Any, batch: dict, shared):
        """This step's conflict metrics and lookahead affinity, when due: ``(conflict logs, affinity logs)``."""
        conflict_logs: dict[str, Tensor] = {}
        affinity_logs: dict[str, Tensor] = {}
        if plan.tracked is not None:  # before the measurement, whose logs carry the estimators' latest values
            self.conflict_tracker.track(plan.columns("tracked"))
        if plan.conflict is not None:
            with self._full_precision():
                conflict_logs = self._measure_conflict(plan.columns("conflict"), shared, weights, step, gates)
        if plan.affinity is not None:
            lr = next(g["lr"] for g in opt.optimizer.param_groups if any(p is shared[0] for p in g["params"]))
            z = lookahead_affinity(
                self.model,
                batch["features"],
                batch["labels"],
                lambda out, lab: mean_over_ranks(self._losses(out, lab)),  # the global batch's lookahead losses
                shared,
                plan.columns("affinity"),
                lr,
            )
            affinity_logs = self.conflict_tracker.update_affinity(z)
        return conflict_logs, affinity_logs

    def _log_step(self, losses, weights, norms_of, measured, step: int, labels: Mapping[str, Tensor]) -> None:
        """This step's values, at Lightning's cadence: losses, weights, gradient norms (of ``norms_of``, the
        weighting's G when it is the conflict metrics' quantity), the weighting's state; the conflict metrics
        whenever measured. All of them go to the loggers in one ``log_metrics`` call from one host copy (one store
        write per logged step); ``train/loss`` also goes through ``self.log(logger=False)``, for the progress bar
        and ``callback_metrics``. Lightning's ``self.log`` costs ~1 ms per key and call on CPU (py-spy:
        ``_ResultMetric.to`` walks its state each call), more than the step of a small model.
        """
        # Lightning writes step values only every log_every_n_steps; after opt.step(), global_step is the step
        # number Lightning's logger connector tests
        every = self.trainer.log_every_n_steps
        writes = bool(every) and (self.global_step % every == 0 or self.trainer.should_stop)
        if writes:
            batch_size = len(next(iter(labels.values())))
            total = (weights * losses).sum()
            self.log("train/loss", total, on_step=True, on_epoch=False, batch_size=batch_size, logger=False)
        if not self.loggers:  # nothing would receive the values (bare trainers, benchmarks)
            return
        values = {k: v for logs in measured for k, v in logs.items()}  # the conflict metrics, when measured
        if writes:
            values.update({"train/loss": total, **self._step_values(losses, weights, norms_of)})
        if values:  # at the step number Lightning's connector writes (batches stepped before this one)
            values = host_values(values)
            for logger in self.loggers:
                logger.log_metrics(values, step=step - 1)

    def _step_values(self, losses: Tensor, weights: Tensor, norms_of: Tensor | None) -> dict[str, Tensor]:
        """``train/loss/<task>``, ``train/weight/<task>``, ``train/grad_norm/<task>`` and the weighting's state."""
        values = {}
        norms = norms_of.norm(dim=1) if norms_of is not None else None
        for i, name in enumerate(self.tasks):
            values[f"train/loss/{name}"] = losses[i]
            values[f"train/weight/{name}"] = weights[i]
            if norms is not None:
                values[f"train/grad_norm/{name}"] = norms[i]
        values.update({f"train/{k}": v.detach() for k, v in self.step_weighting.log_values().items()})
        return values

    def _step_scheduler(self, interval: str) -> None:
        """Lightning steps no scheduler under manual optimization: this module does, after each optimizer step
        (``interval: step``) or training epoch (``epoch``; ReduceLROnPlateau with its monitored value)."""
        if not self.scheduler_cfg or self.scheduler_cfg.get("interval", "epoch") != interval:
            return
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitor = self.scheduler_cfg.get("monitor")
            if monitor in self.trainer.callback_metrics:
                scheduler.step(self.trainer.callback_metrics[monitor])
        else:
            scheduler.step()

    def _full_precision(self) -> AbstractContextManager:
        """No autocast: under ``bf16-mixed`` Lightning runs the whole training step in autocast, which would
        compute the aggregators' Gramians and small solves in bfloat16 (~1e-2 relative error); G is float32.
        The one real backward is unaffected (backward ops keep their forward dtypes). Autocast off: nothing to do."""
        device = self.device.type
        return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext()

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

    def check_trainer(self, trainer: pl.Trainer) -> None:
        """Reject trainer settings this training step cannot honour. ``pipeline.train`` calls it before an
        MLflow run exists; ``on_fit_start`` again, for trainers built elsewhere."""
        if self.weighting.needs_task_grads and getattr(trainer.precision_plugin, "scaler", None) is not None:
            # a GradScaler scales the real backward (and unscales .grad before the step) but not the per-task
            # gradients: an update written into .grad from them would be unscaled by the scale it never had
            raise ConfigError(
                f"{type(self.weighting).__name__} computes per-task gradients, which float16 mixed precision "
                f"(trainer.precision={trainer.precision}, loss scaling) would corrupt; use "
                "trainer.precision=bf16-mixed (no loss scaling) or 32."
            )
        strategy = trainer.strategy
        # DeepSpeedStrategy subclasses DDPStrategy but shards like FSDP
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
            # FSDP / DeepSpeed shard parameters and gradients: no rank holds the shared parameters' full
            # gradients, which the per-task gradient path (grads.py) reads and overwrites
            raise ConfigError(
                f"trainer.strategy={type(strategy).__name__} is not supported: MTLModule trains on one device or "
                "with DDP (trainer=ddp, or trainer.strategy=ddp), which every loss method supports."
            )

    def on_fit_start(self) -> None:
        self.check_trainer(self.trainer)

    # -- checkpoints (what resume= restores beyond Lightning's own state; mtl_experiments/checkpoints.py) ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds ``checkpoint["mtl"]`` (``checkpoints.module_state``): the MLflow run id, the RNG states, this
        epoch's train metric states and the rows kept since their last update, the non-finite step counts, the run's
        config and ``checkpoint_meta``; the divergence detector's state. Refuses to save non-finite parameters
        (``checkpoints.check_finite_parameters`` raises), so no NaN model overwrites ``last.ckpt`` or the best one.
        The kept rows are saved as they are, not folded into the metrics: the metrics' chunks, hence a run's train
        metric values, do not depend on when checkpoints were written."""
        checkpoints.check_finite_parameters(self.named_parameters(), self.global_step)
        outputs = metrics = None
        # under DDP only rank 0's checkpoint is written, so its train metrics would stand for every rank's: not kept
        if self.train_metrics and self.trainer.world_size == 1:
            outputs = self._train_outputs.state()
            metrics = checkpoints.metric_states(self.task_metrics["on_train"])
        state = checkpoints.module_state(
            checkpoints.logger_run_id(self.loggers),
            outputs,
            [self.nonfinite_skipped, self._nonfinite_streak],
            self.run_config,
            self.checkpoint_meta,
            metrics,
        )
        if self.divergence is not None:
            state["divergence"] = self.divergence.state_dict()
        checkpoint["mtl"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mtl")
        if not state or self._trainer is None or self.trainer.state.fn != "fit":
            return  # loading the best weights for testing is not resuming
        checkpoints.set_rng_state(state["rng"])
        if self.trainer.world_size == 1:  # (a DDP checkpoint holds none)
            self._train_outputs.load(state.get("train_outputs"), self.device)
            saved = state.get("train_metrics")
            self._train_restored = checkpoints.load_metric_states(self.task_metrics["on_train"], saved, self.device)
        self.nonfinite_skipped, self._nonfinite_streak = (int(x) for x in state["nonfinite"])
        if self.divergence is not None and "divergence" in state:
            self.divergence.load_state_dict(state["divergence"])

    def _update_train_metrics(self, outputs: dict[str, Tensor], batch: dict) -> None:
        self._update_metrics(self.task_metrics["on_train"], outputs, batch)

    def on_train_epoch_start(self) -> None:
        self._train_outputs.clear()
        if self.conflict_tracker is not None:
            self.conflict_tracker.start_epoch()

    def on_train_end(self) -> None:
        # run-level summaries, once, as plain metrics the MLflow UI can sort runs by: the conflict metrics' and
        # the counters' (written whatever trainer.log_every_n_steps is)
        summaries = self.conflict_tracker.summaries() if self.conflict_tracker is not None else {}
        summaries.update(self._counters())
        if summaries:
            for logger in self.loggers:
                logger.log_metrics(summaries, step=self.global_step)

    def _counters(self) -> dict[str, float]:
        """Run counters worth a value at every epoch end and in the summary: ``train/nonfinite_skipped`` (with
        ``module.nonfinite=skip``; step-level writes miss an epoch shorter than ``log_every_n_steps``)."""
        return {"train/nonfinite_skipped": float(self.nonfinite_skipped)} if self.nonfinite == "skip" else {}

    # -- evaluation -----------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> None:
        outputs = self.model(batch["features"])
        labels = batch["labels"]
        losses = self._losses(outputs, labels)
        self._update_metrics(self.task_metrics[f"on_{stage}"], outputs, batch)
        for segment, rows in batch.get("segments", {}).items():
            if segment in self.segments and rows.any():
                self._update_metrics(self.task_metrics[f"on_{stage}_{segment}"], outputs, batch, rows)
        batch_size = len(next(iter(labels.values())))
        # sync_dist: under DDP the epoch's mean over every rank's batches (one all-reduce per epoch, not per step)
        self.log(f"{stage}/loss", losses.sum(), on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> None:
        values = self._compute_metrics(stage, f"{stage}/")
        for segment in self.segments if stage != "train" else ():
            values.update(self._compute_metrics(f"{stage}_{segment}", f"{stage}/{segment}/"))
        if values:
            # torchmetrics' compute() already reduced the states over the ranks, so every rank holds the same
            # values; sync_dist's mean of equal values keeps them (and silences Lightning's warning)
            self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True)

    def _compute_metrics(self, key: str, prefix: str, restored: Collection[str] = ()) -> dict[str, Tensor]:
        """``{prefix}<task>/<metric>`` and ``{prefix}mean_<metric>`` of one metric set, which is then reset; a task
        is left out when nothing updated its metrics (``restored``: tasks whose states a checkpoint set)."""
        values, by_metric = {}, {}
        for name, metrics in self.task_metrics[f"on_{key}"].items():
            updated = metrics[next(iter(metrics.keys()))].update_called
            if not updated and name not in restored:
                continue
            for metric_name, value in (metrics.compute() if updated else checkpoints.compute(metrics)).items():
                values[f"{prefix}{name}/{metric_name}"] = value.float()
                by_metric.setdefault(metric_name, []).append(value.float())
            metrics.reset()
        for metric_name, vals in by_metric.items():
            values[f"{prefix}mean_{metric_name}"] = torch.stack(vals).mean()
        return values

    def on_train_epoch_end(self) -> None:
        values: dict[str, Tensor | float] = {}
        if self.train_metrics:
            self._train_outputs.flush()
            # written with the counters below, in one store write, not through self.log (~1 ms per key and call)
            values.update(self._compute_metrics("train", "train/", self._train_restored))
            self._train_restored = set()
        self.step_weighting.on_train_epoch_end(self.current_epoch)
        self._step_scheduler("epoch")
        if self.divergence is not None:
            self.divergence.end_epoch()
        values.update(self._counters())
        if self.conflict_tracker is not None:  # the per-epoch series conflict/epoch/...
            values.update(self.conflict_tracker.epoch_means())
        if values and self.loggers and not self.trainer.sanity_checking:
            values = host_values(values)
            for logger in self.loggers:
                logger.log_metrics(values, step=self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")
