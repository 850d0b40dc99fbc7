"""What a run prints (mtl_experiments/console.py): the start line, a line per validation, early stopping and the
tested epoch, the final table, the link to the run in the UI; no library noise; a warning when a binary head
predicts one class for every test row."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_experiments import console
from mtl_experiments.errors import ConfigError
from mtl_experiments.tracking import ui


def test_ui_address_is_the_server_else_the_configured_ui():
    assert ui.ui_base("sqlite:////tmp/mlflow.db") == ui.DEFAULT_UI
    assert ui.ui_base("sqlite:////tmp/mlflow.db", "http://box:8080") == "http://box:8080"
    assert ui.ui_base("http://tracking:5000", "http://box:8080") == "http://tracking:5000"  # a server is its UI


def test_sweep_end_lines_link_the_parent_and_give_the_compare_command():
    lines = console.sweep_end_lines("sqlite:////w/mlflow.db", "2", "0123456789abcdef0123456789abcdef")
    assert lines == [
        "Sweep in the MLflow UI: http://127.0.0.1:5000/#/experiments/2/runs/0123456789abcdef0123456789abcdef"
        "?workflowType=machine_learning",
        "Compare its runs: mtl-compare --tracking-uri sqlite:////w/mlflow.db --parent 01234567",
    ]
    secret = console.sweep_end_lines("http://ann:pw@host:5000", "2", "0123456789abcdef0123456789abcdef")
    assert "pw" not in " ".join(secret) and secret[0].startswith("Sweep in the MLflow UI: http://")


def test_a_ui_url_that_is_no_address_is_a_config_error():
    with pytest.raises(ConfigError, match=r"callbacks.progress_bar.ui_url must be an http:// or https:// address"):
        console.ConsoleProgressBar(ui_url="127.0.0.1:5000")


def test_config_line_names_output_choices_overrides_and_selection(tmp_path):
    choices = {"data": "synthetic", "loss": "pcgrad", "hydra/launcher": "basic", "debug": None}
    line = console.config_line(tmp_path, choices, ["loss=pcgrad", "optimizer.lr=0.01"], "val/mean_auroc", "max")
    expected = f"output {tmp_path.resolve()} · data=synthetic loss=pcgrad · optimizer.lr=0.01 · selects on "
    assert line == expected + "val/mean_auroc (max)"
    assert "\n" not in line
    secret = ["logger.mlflow.tracking_uri=http://ann:s3cret@host:5000", "+data.db_password=hunter2"]
    line = console.config_line(tmp_path, choices, secret, "val/mean_auroc", "max")
    assert "s3cret" not in line and "hunter2" not in line and "http://***@host:5000" in line


def test_known_noise_is_filtered_by_its_message_only():
    record = lambda msg: logging.LogRecord("lightning", logging.INFO, "", 0, msg, None, None)  # noqa: E731
    lines = console.LibraryLines()
    assert not lines.filter(record("GPU available: False, used: False"))
    assert not lines.filter(record("💡 Tip: For seamless cloud logging ... litlogger"))
    assert lines.filter(record("`Trainer.fit` stopped: `max_epochs=2` reached."))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_libraries()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn(
            "The number of training batches (3) is smaller than the logging interval", UserWarning, stacklevel=1
        )
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]  # other warnings still show


def test_a_run_prints_validation_lines_early_stopping_the_tested_epoch_and_its_link(make_cfg, tracking_uri, capsys):
    from mtl_experiments.pipeline import train

    # min_delta=1: AUROC can never improve by 1, so early stopping fires after epoch 1 (patience 1)
    cfg = make_cfg(
        "data.num_samples=600", "data.input_dim=4", "data.batch_size=100", "trainer.max_epochs=4",
        "trainer.log_every_n_steps=2",
        "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1.0",
        "callbacks.progress_bar.ui_url=http://ui.example:5000", tiny=False,
    )  # fmt: skip
    train(cfg)
    out = capsys.readouterr().out
    (run,) = MlflowClient(tracking_uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()]
    )
    lines = out.splitlines()
    assert (
        lines[0].startswith("output ")
        and "data=synthetic" in lines[0]
        and "selects on val/mean_auroc (max)" in lines[0]
    )
    validations = [ln for ln in lines if ln.startswith("epoch ")]
    assert [ln.split(" · ")[0] for ln in validations] == ["epoch 0", "epoch 1"]
    assert " · train/loss " in validations[0] and " · val/loss " in validations[0]
    assert "val/mean_auroc" in validations[0] and "(new best)" in validations[0]
    assert "train/loss:" in out and "val/mean_auroc:" in out  # the bar's items
    assert "Early stopping after epoch 1: val/mean_auroc did not improve by more than 1.0 for 1 validations." in out
    tested = next(ln for ln in lines if ln.startswith("Testing the best checkpoint: epoch "))
    best = float(run.data.metrics["val_best/mean_auroc"])
    assert f"(val/mean_auroc {best:.4f})" in tested
    link = f"http://ui.example:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert lines[-1].startswith(f"Run in the MLflow UI: {link} (serve it with: mlflow ui --backend-store-uri sqlite:")
    assert out.index("test metrics") < out.index(link)
    for noise in ("v_num", "FLOPs", "litlogger", "GPU available", "TPU available"):
        assert noise not in out


def test_a_binary_head_predicting_one_class_for_every_test_row_is_warned(make_cfg, caplog):
    """The real model of a run on a real test batch, its heads' output biases set to -100 (y1: p ~ 0 everywhere) and
    +100 (y2: p ~ 1); a task with one row of the other class is not warned."""
    from mtl_experiments.pipeline import build, build_model, build_module

    cfg = make_cfg()
    datamodule = build(cfg, "data")
    datamodule.setup()
    module = build_module(cfg, datamodule, build_model(cfg, datamodule)).eval()
    bar = console.ConsoleProgressBar()
    batch = next(iter(datamodule.test_dataloader()))
    for name, bias in (("y1", -100.0), ("y2", 100.0)):  # p ~ 0 / p ~ 1 for every row
        with torch.no_grad():
            [m for m in module.model.heads[name].modules() if isinstance(m, torch.nn.Linear)][-1].bias.fill_(bias)
    for _ in range(2):  # two batches' counts add up
        bar.count_predictions(module, batch)
    rows = 2 * len(batch["labels"]["y1"])  # synthetic tasks label every row
    assert bar.predicted == {"y1": (0, rows), "y2": (rows, rows)}
    bar.predicted["y3"] = (1, rows)  # one row of the other class: no warning
    with caplog.at_level(logging.WARNING, logger="mtl_experiments.console"):
        bar.warn_one_class()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert f"Task 'y2' predicts 1 for all {rows} test rows (p >= 0.5)" in messages[1]
    assert f"Task 'y1' predicts 0 for all {rows} test rows (p < 0.5)" in messages[0]


def test_the_no_shared_parameters_notice_is_logged_not_a_warning_pointing_into_hydra(make_cfg, caplog):
    """A gradient method on single_task: the notice used warnings.warn(stacklevel=2), which Hydra's instantiate made
    a UserWarning attributed to hydra/_internal/target_policy.py."""
    from mtl_experiments.pipeline import build, build_model, build_module

    cfg = make_cfg("backbone=single_task", "loss=pcgrad")
    datamodule = build(cfg, "data")
    datamodule.setup()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "mtl_experiments.module"):
        warnings.simplefilter("always")
        build_module(cfg, datamodule, build_model(cfg, datamodule))
    assert not [w for w in caught if "hydra" in w.filename]
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.endswith("but SingleTask shares none: here it acts as equal weighting.")
