"""The weighting contract, for every conf/loss/*.yaml (a new file is enrolled automatically): its YAML points at the
file of the same name; one real backward and finite weights per task on a toy problem; and a few steps through the
real pipeline, with 2 and 4 tasks and with a sharing, a non-sharing and a mixture-of-experts backbone: finite
losses, weights logged, every model parameter updated."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from mtl_experiments.grads import task_gradients
from mtl_experiments.pipeline import train
from tests.conftest import CONF, options
from tests.loss.helpers import CTR_CVR_WATCH, method, toy_problem


@pytest.mark.parametrize("name", options("loss"))
def test_yaml_points_at_the_file_of_the_same_name(name):
    target = OmegaConf.load(CONF / "loss" / f"{name}.yaml")._target_
    # our own methods live in loss/<name>.py; TorchJD's aggregators come through its one adapter file
    assert target.startswith((f"mtl_experiments.loss.{name}.", "mtl_experiments.loss.torchjd."))


@pytest.mark.parametrize("name", options("loss"))
def test_contract_one_backward_and_weights_per_task(name):
    w = method(name, CTR_CVR_WATCH)
    theta, losses = toy_problem()
    calls = []

    def backward_fn(total, exclude=()):
        calls.append(total)
        total.backward()

    grads = task_gradients(losses, [theta]) if w.needs_task_grads else None
    weights = w.backward(losses, grads, [theta], backward_fn)
    assert len(calls) == 1, "exactly one real backward per step"
    assert weights.shape == (3,) and torch.isfinite(weights).all() and not weights.requires_grad
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


FOUR_TASKS = ["+data.tasks.y3={kind: regression}", "+data.tasks.y4={kind: binary}"]


@pytest.mark.parametrize("loss", options("loss"))
@pytest.mark.parametrize(
    ("backbone", "extra"),
    [("shared_bottom", []), ("shared_bottom", FOUR_TASKS), ("single_task", []), ("mmoe", [])],
    ids=["shared_bottom-2tasks", "shared_bottom-4tasks", "single_task-2tasks", "mmoe-2tasks"],
)
@pytest.mark.filterwarnings("ignore:.*shares none.*:UserWarning")
def test_method_trains_and_logs(loss, backbone, extra, make_cfg, mlflow_runs, tracking_uri, tmp_path):
    snapshot = tmp_path / "parameters.pt"
    cfg = make_cfg(
        f"loss={loss}",
        f"backbone={backbone}",
        *extra,
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=2",
        "data.num_samples=600",
        f"+callbacks.snapshot={{_target_: tests.loss.helpers.ParameterSnapshot, path: '{snapshot}'}}",
    )
    train(cfg)
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    tasks = list(cfg.data.tasks)
    client = MlflowClient(tracking_uri)
    for task in tasks:
        weights = [m.value for m in client.get_metric_history(run.info.run_id, f"train/weight/{task}")]
        losses = [m.value for m in client.get_metric_history(run.info.run_id, f"train/loss/{task}")]
        assert len(weights) >= 2 and all(math.isfinite(w) for w in weights), task
        assert len(losses) >= 2 and all(math.isfinite(v) for v in losses), task
    # parameters moved: every parameter of the model differs between the start and the end of fit (comparing the
    # losses of different batches, as this test did, passes with frozen weights too)
    saved = torch.load(snapshot)
    assert list(saved["before"]) == list(saved["after"]) and saved["before"]
    unmoved = [name for name, before in saved["before"].items() if torch.equal(before, saved["after"][name])]
    assert unmoved == [], unmoved
