"""The one training step (DESIGN.md §5): weights applied as specified, NaN losses stop the run, counters reach
MLflow whatever the cadence, the module's checkpoint state."""

from __future__ import annotations

import csv
import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger
from mlflow.tracking import MlflowClient

from mtl_experiments import checkpoints
from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.data.synthetic import SyntheticDataModule
from mtl_experiments.errors import ConfigError, NonFiniteLossError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.loss.fixed import Fixed
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule, host_values
from mtl_experiments.pipeline import train
from mtl_experiments.tracking import ResilientMLFlowLogger
from tests.conftest import bare_trainer

TASKS = {"a": {"kind": "binary"}, "b": {"kind": "regression"}}


def setup_module_and_batch(weights=None, lr=0.1):
    torch.manual_seed(0)
    dm = SyntheticDataModule(tasks=TASKS, num_samples=400, input_dim=10, batch_size=32)
    dm.setup()
    encoder = FeatureEncoder(dm.feature_spec)
    model = MultiTaskModel(encoder, SharedBottom(encoder.output_dim, list(dm.tasks), (16, 8), (4,)), dm.tasks)
    module = MTLModule(model, dm.tasks, Fixed(weights), functools.partial(torch.optim.SGD, lr=lr))
    return module, dm


def run_steps(module, dm, steps):
    trainer = bare_trainer(max_steps=steps)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_one_step_applies_the_weighted_gradient():
    """After one SGD step, θ' = θ - lr·∇(Σ_t w_t·L_t) on the first batch, for every parameter."""
    module, dm = setup_module_and_batch(weights={"a": 3.0, "b": 0.25})
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    batch = next(iter(dm.train_dataloader()))  # the loader's first batch of epoch 0 is what fit sees
    out = module.model(batch["features"])
    total = 3.0 * module.tasks["a"].loss(out["a"], batch["labels"]["a"]) + 0.25 * module.tasks["b"].loss(
        out["b"], batch["labels"]["b"]
    )
    params = dict(module.model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values())), strict=True))
    module.zero_grad()
    dm = SyntheticDataModule(tasks=TASKS, num_samples=400, input_dim=10, batch_size=32)  # fresh epoch counter
    run_steps(module, dm, steps=1)
    for name, p in module.model.named_parameters():
        assert torch.allclose(p.detach(), before[name] - 0.1 * grads[name], atol=1e-6), name


def test_gradient_clipping_is_applied_by_the_module():
    module, dm = setup_module_and_batch(lr=1.0)
    module.gradient_clip_val = 1e-3
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters()])
    run_steps(module, dm, steps=1)
    after = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)  # lr 1 x clipped norm


def test_nan_loss_stops_training_with_a_clear_message():
    module, dm = setup_module_and_batch()
    with torch.no_grad():
        module.model.heads["b"].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \{'b': nan\}.*lower the learning rate"):
        run_steps(module, dm, steps=3)


# -- counters whatever the logging cadence ---------------------------------------------------------------
class NaNLabels(pl.Callback):
    """NaN labels for task ``y1`` in the run's training batch number ``batch`` (counted from 0)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx == self.batch:
            batch["labels"]["y1"].fill_(float("nan"))


def test_nonfinite_skipped_reaches_mlflow_at_each_epoch_end_and_in_the_summary(make_cfg, mlflow_runs, tracking_uri):
    # 25 steps per epoch, fewer than log_every_n_steps=50: Lightning writes no step-level value in this run
    nan = ["+callbacks.nan._target_=tests.module.test_module.NaNLabels", "+callbacks.nan.batch=3"]
    train(make_cfg("module.nonfinite=skip", "trainer.log_every_n_steps=50", "trainer.max_epochs=2", *nan))
    (run,) = mlflow_runs()
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train/nonfinite_skipped")
    # after epoch 0 (24 optimizer steps: one batch skipped), after epoch 1, and the run summary
    assert sorted((m.step, m.value) for m in history) == [(24, 1.0), (49, 1.0), (49, 1.0)]
    assert run.data.metrics["train/nonfinite_skipped"] == 1.0


# -- checkpoint state ------------------------------------------------------------------------------------
def test_checkpoint_state_carries_the_run_config_and_checkpoint_meta():
    module, dm = setup_module_and_batch()
    run_steps(module, dm, steps=2)
    module.run_config = "seed: 0\n"
    module.checkpoint_meta = {"config_hash": "abc123", "recipe": {"loss": "fixed"}}
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    state = checkpoint["mtl"]
    assert state["config"] == "seed: 0\n" and state["mlflow_run_id"] is None and state["nonfinite"] == [0, 0]
    assert state["config_hash"] == "abc123" and state["recipe"] == {"loss": "fixed"}
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "random"}
    assert state["train_outputs"] is None  # fit ended the epoch: no train outputs are pending


def test_saving_a_checkpoint_never_creates_an_mlflow_run(tracking_uri):
    ours = ResilientMLFlowLogger(experiment_name="e", tracking_uri=tracking_uri)
    assert checkpoints.logger_run_id([ours]) is None and not ours.started  # not started: not asked
    plain = MLFlowLogger(experiment_name="e", tracking_uri=tracking_uri)
    plain.log_metrics({"x": 1.0}, step=0)  # the run exists once something was logged
    assert checkpoints.logger_run_id([plain]) == plain.run_id
    assert checkpoints.logger_run_id([]) is None
    assert len(MlflowClient(tracking_uri).search_runs([plain.experiment_id])) == 1


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"nonfinite": "ignore"}, r"module.nonfinite must be one of \['stop', 'skip'\], got 'ignore'"),
        ({"max_consecutive_nonfinite": 0}, "module.max_consecutive_nonfinite must be an integer >= 1, got 0"),
        ({"gradient_clip_val": -1.0}, r"module.gradient_clip_val must be a finite number >= 0, got -1.0 \(0: off\)"),
        ({"gradient_clip_algorithm": "l2"}, r"module.gradient_clip_algorithm must be one of \['norm', 'value'\]"),
        ({"train_metrics": "yes"}, "module.train_metrics must be true or false, got 'yes'"),
        ({"divergence": {"action": "halt"}}, "module.divergence.action must be one of"),
    ],
)
def test_bad_module_options_are_refused_naming_the_key(option, message):
    dm = SyntheticDataModule(tasks=TASKS, num_samples=100, input_dim=4, batch_size=32)
    dm.setup()
    encoder = FeatureEncoder(dm.feature_spec)
    model = MultiTaskModel(encoder, SharedBottom(encoder.output_dim, list(dm.tasks), (8,), (4,)), dm.tasks)
    with pytest.raises(ConfigError, match=message):
        MTLModule(model, dm.tasks, Fixed(None), functools.partial(torch.optim.SGD, lr=0.1), **option)


def test_host_values_converts_scalar_tensors_and_numbers_exactly():
    values = {"a": torch.tensor(0.25), "b": torch.tensor([1.5], dtype=torch.float64), "c": 3, "d": torch.tensor(7)}
    assert host_values(values) == {"a": 0.25, "b": 1.5, "c": 3.0, "d": 7.0}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        random = {f"k{i}": torch.randn((), generator=g).to(dtype) for i in range(20)}
        assert host_values(random) == {k: float(v) for k, v in random.items()}  # same as one float() per key


def test_step_values_reach_the_logger_in_one_write_per_logged_step(tmp_path):
    """Every step value of a logged step (losses, weights, train/loss) in one ``log_metrics`` call at Lightning's
    step number; ``train/loss`` is also in ``callback_metrics`` (the progress bar reads it there)."""
    module, dm = setup_module_and_batch(weights={"a": 2.0, "b": 1.0})
    logger = CSVLogger(tmp_path)
    trainer = bare_trainer(max_steps=6, log_every_n_steps=2, logger=logger)
    trainer.fit(module, datamodule=dm)
    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert steps == [1, 3, 5]  # Lightning's own cadence and step numbers
    for r in rows:
        if r["train/loss"]:  # the same row: one write holds train/loss and the per-task values
            total = 2.0 * float(r["train/loss/a"]) + float(r["train/loss/b"])
            assert float(r["train/loss"]) == pytest.approx(total, rel=1e-6)
            assert (float(r["train/weight/a"]), float(r["train/weight/b"])) == (2.0, 1.0)
    assert "train/loss" in trainer.callback_metrics
