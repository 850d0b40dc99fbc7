"""The module steps the learning-rate scheduler (Lightning does not under manual optimization): the learning rate
after each epoch is the one each ``conf/scheduler/*.yaml`` promises, computed by the same torch scheduler on its
own optimizer (a new YAML enrolls here). Without the module's scheduler stepping, every non-constant schedule
would stay at ``optimizer.lr`` and fail."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from mtl_experiments import pipeline
from tests.conftest import compose_cfg, options

EPOCHS = 3
# plateau.yaml: every epoch after the first is a plateau (no improvement can beat a threshold of 1e9), so with
# patience 0 the rate halves at each of them instead of depending on how the validation metric moves
PINNED = {"plateau": ["scheduler.scheduler.patience=0", "+scheduler.scheduler.threshold=1e9"]}


class LearningRates(pl.Callback):
    """The optimizer's learning rate after each epoch's scheduler step, the steps taken per epoch and the
    monitored value the scheduler saw (callbacks run before the module's ``on_train_epoch_end``)."""

    def __init__(self, monitor: str | None):
        self.monitor, self.rates, self.steps, self.monitored = monitor, [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        if trainer.current_epoch > 0:
            self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.monitored.append(trainer.callback_metrics.get(self.monitor) if self.monitor else None)

    def on_train_end(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def expected_rates(schedule: dict, lr: float, steps: list[int], monitored: list) -> list[float]:
    """The rates the configured schedule gives after each epoch, stepped as the module promises to step it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = schedule["scheduler"](optimizer)
    rates = []
    for epoch in range(EPOCHS):
        if schedule.get("interval", "epoch") == "step":
            for _ in range(steps[epoch + 1] - steps[epoch]):
                scheduler.step()
        elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(monitored[epoch])
        else:
            scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("name", options("scheduler"))
def test_each_scheduler_gives_the_learning_rate_it_promises(name, tmp_path):
    cfg = compose_cfg(
        [
            f"scheduler={name}",
            *PINNED.get(name, []),
            "data.num_samples=600",  # 480 training rows: 8 steps of 64 per epoch
            "data.input_dim=8",
            "data.batch_size=64",
            f"trainer.max_epochs={EPOCHS}",
        ],
        tmp_path,
    )
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule = pipeline.build(cfg, "data")
    datamodule.setup()
    pipeline.resolve_optimized_metric(cfg, datamodule.tasks)  # optimized_mode=auto -> max for val/mean_auroc
    module = pipeline.build_module(cfg, datamodule, pipeline.build_model(cfg, datamodule))
    schedule = pipeline.build(cfg, "scheduler")
    seen = LearningRates(schedule.get("monitor"))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[seen],
    )
    trainer.fit(module, datamodule=datamodule)
    lr = float(cfg.optimizer.lr)
    expected = expected_rates(schedule, lr, seen.steps, seen.monitored)
    assert seen.rates == pytest.approx(expected, rel=1e-12), (seen.rates, expected)
    if name == "constant":  # the one schedule that must not move
        assert expected == [lr] * EPOCHS
    else:
        assert len(set(expected)) == EPOCHS and expected[-1] < lr, expected  # it moved after every epoch
