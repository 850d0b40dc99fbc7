"""Lightning's own floor: the plain loop's training step inside a bare ``LightningModule`` (``lightning_floor``).

``FloorModule`` trains the same model on the same batches as the plain loop, under manual optimization as
``MTLModule`` does, and its ``training_step`` is the plain loop's step: forward, per-task ``task.loss``, sum,
``zero_grad``, ``manual_backward``, ``optimizer.step``. No metrics, no logging, no checks. Trained by
``build.bare_trainer``, what it costs beyond the plain loop is Lightning's own per-step machinery (the fit loop,
its hooks, the batch transfer, the optimizer wrapper): the floor no module run by Lightning can go under, so
``MTLModule``'s own cost is ``lightning`` against ``lightning_floor``, not against ``plain``.

``GradientFloor`` is the floor of the per-task-gradient methods (``--methods``): ``G`` computed as every such
method needs it, then its plain sum applied (equal weights), no aggregation.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from torch import Tensor

from mtl_experiments.bench.build import bare_trainer, build_model, build_optimizer
from mtl_experiments.bench.timing import Seconds, Stopwatch
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.loss.base import GradientAggregation


class FloorModule(pl.LightningModule):
    """The plain loop's step (``throughput.train_step``) under Lightning's manual optimization, nothing else."""

    def __init__(self, model: torch.nn.Module, tasks: dict, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.model, self.tasks, self.optimizer = model, tasks, optimizer
        self.automatic_optimization = False

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        outputs = self.model(batch["features"])
        labels = batch["labels"]
        loss = torch.stack([task.loss(outputs[name], labels[name]) for name, task in self.tasks.items()]).sum()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def floor_fit(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> Seconds:
    """Seconds of ``Trainer.fit`` alone for ``FloorModule`` on a freshly built model (the plain loop's weights)."""
    model = build_model(cfg, datamodule)
    module = FloorModule(model, datamodule.tasks, build_optimizer(cfg, model))
    trainer = bare_trainer(epochs)
    clock = Stopwatch()
    trainer.fit(module, datamodule=datamodule)
    return clock.elapsed()


class GradientFloor(GradientAggregation):
    """Update = Σ_t g_t (the rows of ``G`` summed, weights 1): a gradient method with no aggregation work, so its
    step is forward + T per-task backward passes (``G``) + the one real backward + the optimizer step, the least
    any method that needs ``G`` costs (``--methods`` prints it beside each such method's ratio)."""

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        return grads.sum(dim=0), torch.ones(grads.shape[0], dtype=grads.dtype, device=grads.device)
