"""End to end: the real config composed with hydra.compose, trained, tested and tracked in MLflow."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from mtl_experiments.errors import NonFiniteLossError
from mtl_experiments.pipeline import train
from tests.conftest import options


def test_default_run_is_tracked_completely(make_cfg, mlflow_runs, tracking_uri):
    best = train(make_cfg())
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "synthetic-shared_bottom-equal-seed0"
    tags = run.data.tags
    assert (tags["data"], tags["backbone"], tags["loss"], tags["optimizer"]) == (
        "synthetic",
        "shared_bottom",
        "equal",
        "adam",
    )
    assert "data.num_samples=2000" in tags["overrides"]
    assert tags["loss._target_"] == "mtl_experiments.loss.equal.Equal"  # the method's hyper-parameters as tags
    assert tags["version.torch"]
    params = run.data.params
    assert params["data.num_samples"] == "2000"
    assert params["seed"] == "0"
    assert params["optimized_mode"] == "max"  # derived from AUROC, resolved in the logged config
    assert params["backbone._target_"] == "mtl_experiments.backbone.shared_bottom.SharedBottom"
    m = run.data.metrics
    for key in (
        "train/loss/y1",
        "train/weight/y2",
        "val/y1/auroc",
        "val/mean_auroc",
        "test/y1/auroc",
        "test/y2/logloss",
        "test/y2/accuracy",
        "test/mean_auroc",
        "val_best/mean_auroc",
    ):
        assert key in m, key
    assert m["test/y1/auroc"] > 0.75 and m["test/y2/auroc"] > 0.75  # learnable: clearly above chance
    assert best == pytest.approx(m["val_best/mean_auroc"])
    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(run.info.run_id, "val/y1/auroc")
    assert len(history) == 3  # one point per epoch: metrics over time
    assert len(client.get_metric_history(run.info.run_id, "train/loss/y1")) >= 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert artifacts == {"config/config.yaml", "config/overrides.yaml"}
    config_text = client.download_artifacts(run.info.run_id, "config/config.yaml")
    with open(config_text) as f:
        assert "num_samples: 2000" in f.read()


@pytest.mark.parametrize("data", options("data"))
def test_every_dataset_trains(data, make_cfg, mlflow_runs, tiny_data):
    if data == "synthetic":
        cfg = make_cfg(f"data={data}", "trainer.max_epochs=1")
    else:  # TINY's synthetic keys do not exist; each dataset's tiny overrides (fixture files in its real format)
        dataset = tiny_data(data)
        trainer = ["trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", "~callbacks.progress_bar"]
        cfg = make_cfg(f"data={data}", *dataset, "trainer.max_epochs=1", *trainer, tiny=False)
    train(cfg)
    assert [r.info.status for r in mlflow_runs()] == ["FINISHED"]


def test_regression_tasks_select_on_mse(make_cfg, mlflow_runs):
    cfg = make_cfg("data.tasks.y1.kind=regression", "data.tasks.y2.kind=regression", "optimized_metric=val/mean_mse")
    train(cfg)
    (run,) = mlflow_runs()
    assert run.data.params["optimized_mode"] == "min"
    assert run.data.metrics["test/y1/mse"] < 10


def test_same_seed_gives_identical_test_metrics(make_cfg, mlflow_runs):
    train(make_cfg("experiment_name=a"))
    train(make_cfg("experiment_name=b"))
    train(make_cfg("experiment_name=c", "seed=1"))
    by_exp = {r.data.tags["mlflow.runName"] + r.info.experiment_id: r.data.metrics for r in mlflow_runs()}
    a, b, c = (by_exp[k] for k in sorted(by_exp, key=lambda k: k[-1]))
    tests = [k for k in a if k.startswith("test/")]
    assert tests and all(a[k] == b[k] for k in tests)
    assert any(a[k] != c[k] for k in tests)  # and the seed does matter


def test_nan_loss_marks_the_run_failed(make_cfg, mlflow_runs):
    with pytest.raises(NonFiniteLossError):
        train(make_cfg("optimizer=sgd", "optimizer.lr=1e30", "optimizer.momentum=0"))
    (run,) = mlflow_runs()
    assert run.info.status == "FAILED"


def test_scheduler_options_train(make_cfg, mlflow_runs):
    for scheduler in options("scheduler"):
        train(make_cfg(f"scheduler={scheduler}", "trainer.max_epochs=2", f"run_name={scheduler}"))
    assert sorted(r.info.status for r in mlflow_runs()) == ["FINISHED"] * len(options("scheduler"))


def test_user_tags_with_dotted_keys_are_flattened(make_cfg, mlflow_runs):
    """'logger.mlflow.tags.team.name=x' arrives as a nested dict; MLflow needs flat string tags (a nested one
    used to crash the run inside SQLAlchemy)."""
    train(make_cfg("+logger.mlflow.tags.team.name=recsys", "+logger.mlflow.tags.owner=ana", "trainer.max_epochs=1"))
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags["team.name"] == "recsys" and run.data.tags["owner"] == "ana"
