"""Every conf/loss/*.yaml trains for a few steps through the real pipeline, with 2 and 4 tasks and
with a sharing, a non-sharing and a mixture-of-experts backbone: finite losses, weights logged, parameters updated."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from mtl_experiments.pipeline import train
from tests.conftest import options

FOUR_TASKS = ["+data.tasks.y3={kind: regression}", "+data.tasks.y4={kind: binary}"]


@pytest.mark.parametrize("loss", options("loss"))
@pytest.mark.parametrize(
    ("backbone", "extra"),
    [("shared_bottom", []), ("shared_bottom", FOUR_TASKS), ("single_task", []), ("mmoe", [])],
    ids=["shared_bottom-2tasks", "shared_bottom-4tasks", "single_task-2tasks", "mmoe-2tasks"],
)
@pytest.mark.filterwarnings("ignore:.*shares none.*:UserWarning")
def test_method_trains_and_logs(loss, backbone, extra, make_cfg, mlflow_runs, tracking_uri):
    cfg = make_cfg(
        f"loss={loss}",
        f"backbone={backbone}",
        *extra,
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=2",
        "data.num_samples=600",
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
    # parameters moved: the training loss of every task changed between the first and last logged step
    for task in tasks:
        history = client.get_metric_history(run.info.run_id, f"train/loss/{task}")
        assert history[0].value != history[-1].value, task
