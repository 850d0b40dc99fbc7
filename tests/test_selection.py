"""Per-task model selection and task-wise early stopping (mtl_experiments/selection.py): each task's metric, the
merge of the per-task test results, what a stopped task means for every weighting method (its gradient leaves the
aggregation: the update does not depend on it, and a gradient method's update is the method's on the other tasks),
and the real pipeline: heads frozen, weights 0, the epochs logged, test/ from each task's own best checkpoint,
resume exact."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_experiments.checkpoints import load
from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import task_gradients
from mtl_experiments.pipeline import train
from mtl_experiments.selection import (
    PerTaskSelection,
    TaskEarlyStopping,
    TaskGate,
    merge_task_results,
    own_parameters,
    task_monitors,
)
from mtl_experiments.tasks import build_tasks
from tests.conftest import options
from tests.loss.helpers import CTR_CVR_WATCH, assert_fails_before_tracking, method
from tests.test_resume import RESUMABLE, final_state, same


def test_each_task_is_monitored_on_the_optimized_metric_or_its_own_first():
    tasks = build_tasks({"click": {"kind": "binary"}, "watch": {"kind": "regression"}})
    monitors = task_monitors(tasks, "val/mean_auroc")
    assert monitors["click"] == ("val/click/auroc", "max")
    first = next(iter(tasks["watch"].metrics()))  # a regression task logs no AUROC: its own first metric
    assert monitors["watch"][0] == f"val/watch/{first}"
    assert task_monitors(tasks, "val/click/auroc")["click"] == ("val/click/auroc", "max")
    with pytest.raises(ConfigError, match="callbacks.*metric must be a metric every task logs"):
        task_monitors(tasks, "val/mean_auroc", metric="auroc")


def test_per_task_results_take_each_task_from_its_own_checkpoint_and_average_them():
    per_task = {
        "a": {
            "test/a/auroc": 0.9,
            "test/b/auroc": 0.1,
            "test/mean_auroc": 0.5,
            "test/loss": 3.0,
            "test/cold/a/auroc": 0.7,
        },
        "b": {
            "test/a/auroc": 0.2,
            "test/b/auroc": 0.6,
            "test/mean_auroc": 0.4,
            "test/loss": 2.0,
            "test/cold/b/auroc": 0.5,
        },
    }
    assert merge_task_results(per_task) == pytest.approx(
        {
            "test/a/auroc": 0.9,
            "test/b/auroc": 0.6,
            "test/mean_auroc": 0.75,
            "test/cold/a/auroc": 0.7,
            "test/cold/b/auroc": 0.5,
            "test/cold/mean_auroc": 0.6,
        }
    )


def problem(seed: int, stopped_gradient: torch.Tensor):
    """Random float32 losses of a shared ``theta`` plus one own parameter per task (CTR_CVR_WATCH);
    ``stopped_gradient``: an extra gradient cvr's loss has (not its value). Returns (theta, own parameters, losses)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(5, generator=gen).requires_grad_()
    own = {t: torch.randn(1, generator=gen).requires_grad_() for t in CTR_CVR_WATCH}
    scales = torch.rand(3, 5, generator=gen) + 0.1
    losses = [(theta * s).sin().sum() + 2.0 + own[t].square().sum() for s, t in zip(scales, CTR_CVR_WATCH, strict=True)]
    tilt = theta @ stopped_gradient
    losses[1] = losses[1] + tilt - tilt.detach()  # same value, another gradient
    return theta, own, torch.stack(losses)


def gated_step(name: str, stopped_gradient: torch.Tensor, seed: int):
    """One step of ``conf/loss/<name>.yaml`` behind a gate with task ``cvr`` stopped, on ``problem``: (theta's
    gradient, the weights, the own parameters' gradients, the gate, G)."""
    theta, own, losses = problem(seed, stopped_gradient)
    gate = TaskGate(CTR_CVR_WATCH, method(name, CTR_CVR_WATCH), None)
    gate.stop("cvr", epoch=0)
    grads = task_gradients(losses, [theta]) if gate.weighting.needs_task_grads else None
    weights = gate.backward(losses, grads, [theta], lambda total, exclude=(): total.backward())
    return theta.grad, weights, {t: p.grad for t, p in own.items()}, gate, grads


@pytest.mark.parametrize("name", options("loss"))
def test_a_stopped_task_leaves_every_weighting(name):
    """For every method, on random inputs: the stopped task's weight is 0, its own parameter gets no gradient, and
    the shared update does not depend on its gradient (for MGDA a zero row would instead make the update 0). A
    gradient method's update is exactly the method's on the active tasks' rows of G."""
    for seed in range(2):
        tilt = torch.randn(5, generator=torch.Generator().manual_seed(100 + seed)) * 3
        g1, w1, own1, gate, grads = gated_step(name, torch.zeros(5), seed)
        g2, w2, _, _, _ = gated_step(name, tilt, seed)
        assert w1[1] == 0 and w2[1] == 0 and torch.isfinite(w1).all()
        assert own1["cvr"] is None or not own1["cvr"].any()
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6), (name, seed)
        assert torch.allclose(w1, w2, rtol=1e-5, atol=1e-6), (name, seed)
        if gate.template is None:
            continue
        active = {t: task for t, task in CTR_CVR_WATCH.items() if t != "cvr"}
        reference = method(name, active)
        theta, _, losses = problem(seed, torch.zeros(5))
        expected = reference.backward(
            losses[[0, 2]], grads[[0, 2]], [theta], lambda total, exclude=(): total.backward()
        )
        assert list(gate.subset.task_names) == ["ctr", "watch"]
        assert torch.allclose(w1[[0, 2]].double(), expected.double(), rtol=1e-5, atol=1e-7), (name, seed)
        assert torch.allclose(g1, theta.grad, rtol=1e-5, atol=1e-6), (name, seed)  # the shared update itself


def test_own_parameters_are_those_only_that_task_reaches():
    shared, head_a, head_b = (torch.randn(2, requires_grad=True) for _ in range(3))
    h = shared * 2
    outputs = {"a": (h * head_a).sum(), "b": (h * head_b).sum(), "ab": (h * head_a * head_b).sum()}
    assert own_parameters({"a": outputs["a"], "b": outputs["b"]}, "a") == {id(head_a)}
    assert own_parameters(outputs, "a") == set()  # the combined output also needs head_a


# 480 train rows / 64: 8 steps per epoch, 2 epochs; last.ckpt every 5 steps and after each epoch
SMALL = ["data.num_samples=600", "trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_train_steps=5"]


class StopTask(pl.Callback):
    """Test helper: stops ``task`` at the end of epoch ``epoch``'s validation (through the gate's public ``stop``)
    and saves the model's parameters then and at the end of fit to ``path``."""

    def __init__(self, task: str, epoch: int, path: str | None = None):
        self.task, self.epoch, self.path, self.at_stop = task, epoch, path, {}

    @staticmethod
    def parameters(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.model.named_parameters()}

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.current_epoch != self.epoch:
            return
        gate = next(c for c in trainer.callbacks if isinstance(c, TaskEarlyStopping))
        gate.stop(self.task, trainer.current_epoch, trainer.loggers, trainer.global_step)
        self.at_stop = self.parameters(pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.path:
            torch.save({"at_stop": self.at_stop, "end": self.parameters(pl_module)}, self.path)


def test_task_stopping_and_per_task_selection_in_a_real_run_that_resumes_exactly(
    make_cfg, mlflow_runs, tracking_uri, tmp_path
):
    """MoCo (tracked gradients: the remaining tasks' fresh instance has state), y1 stopped after epoch 0 of 2: y1's
    head is frozen, y2's and the shared layers keep training, y1's weight is 0, the stop epoch is logged, test/
    comes from each task's own best checkpoint, chosen on its own validation history. A crash in epoch 1 resumes
    to the parameters of the uninterrupted run, y1 still stopped."""
    snapshot = tmp_path / "params.pt"
    common = [
        *RESUMABLE,
        *SMALL,
        "loss=moco",
        "callbacks.selection.mode=per_task",
        "callbacks.task_early_stopping.patience=100",
        "~callbacks.early_stopping",
    ]
    stopper = f"+callbacks.stopper={{_target_: tests.test_selection.StopTask, task: y1, epoch: 0, path: '{snapshot}'}}"
    train(make_cfg(*common, stopper, f"paths.output_dir={tmp_path / 'reference'}", "experiment_name=reference"))
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["stopped_epoch/y1"] == 0 and "stopped_epoch/y2" not in m
    saved = torch.load(snapshot)
    moved = {n for n, p in saved["at_stop"].items() if not torch.equal(p, saved["end"][n])}
    assert not any(n.startswith("heads.y1.") for n in moved)
    assert any(n.startswith("heads.y2.") for n in moved) and any(n.startswith("backbone.") for n in moved)
    client = MlflowClient(tracking_uri)
    history = {k: client.get_metric_history(run.info.run_id, k) for k in ("train/weight/y1", "val/y1/auroc")}
    stop_step = client.get_metric_history(run.info.run_id, "stopped_epoch/y1")[0].step
    after = [p.value for p in history["train/weight/y1"] if p.step > stop_step]
    assert after and all(v == 0 for v in after)
    val = [p.value for p in sorted(history["val/y1/auroc"], key=lambda p: p.step)]
    assert m["val_best_epoch/y1"] == max(range(len(val)), key=lambda e: (val[e], -e))
    assert m["val_best/y1/auroc"] == pytest.approx(max(val))
    for metric in (
        "test/y1/auroc",
        "test/y2/auroc",
        "joint/test/y1/auroc",
        "joint/test/mean_auroc",
        "val_best_epoch/y2",
    ):
        assert math.isfinite(m[metric]), metric
    assert m["test/mean_auroc"] == pytest.approx((m["test/y1/auroc"] + m["test/y2/auroc"]) / 2)
    assert run.data.params["callbacks.selection.mode"] == "per_task"

    stopper = "+callbacks.stopper={_target_: tests.test_selection.StopTask, task: y1, epoch: 0}"
    crash = ["+callbacks.crash._target_=tests.test_resume.CrashAt", "+callbacks.crash.step=12"]  # in epoch 1
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_cfg(*common, stopper, *crash, f"paths.output_dir={tmp_path / 'run'}"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = next(v for k, v in load(checkpoint)["callbacks"].items() if "TaskEarlyStopping" in k)
    assert state["gate"]["stopped"] == {"y1": 0} and state["gate"]["subset"] is not None
    train(make_cfg(*common, stopper, f"resume={checkpoint}", f"paths.output_dir={tmp_path / 'resumed'}"))
    reference, resumed = final_state(tmp_path / "reference"), final_state(tmp_path / "run")
    assert [k for k in reference if not same(resumed[k], reference[k])] == []


def test_task_stopping_is_refused_under_ddp():
    """Under DDP a frozen task's parameters would get no gradient; the pipeline asks this before a run exists."""
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="callbacks.task_early_stopping.patience must be null under DDP"):
        TaskEarlyStopping(patience=2).check_trainer(trainer)
    TaskEarlyStopping(patience=None).check_trainer(trainer)  # off: nothing to refuse


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="callbacks.selection.mode must be one of"):
        PerTaskSelection(mode="best")
    with pytest.raises(ConfigError, match="callbacks.task_early_stopping.patience must be"):
        TaskEarlyStopping(patience=0)
    with pytest.raises(ConfigError, match="callbacks.task_early_stopping.min_delta must be"):
        TaskEarlyStopping(patience=2, min_delta=-1)


def test_a_metric_some_task_lacks_fails_before_a_run_exists(make_cfg, mlflow_runs):
    overrides = ["callbacks.task_early_stopping.patience=2", "callbacks.task_early_stopping.metric=mse"]
    assert_fails_before_tracking(make_cfg, mlflow_runs, overrides, "callbacks.*metric must be a metric every task logs")
