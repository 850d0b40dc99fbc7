"""Bad input: one clear error before any training, nothing written to the tracking store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from mtl_experiments.data.base import require_file
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.pipeline import train
from tests.conftest import CONF, ROOT, options

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_option_lists_the_valid_choices(group, make_cfg):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        make_cfg(f"{group}=no_such_option")
    message = str(info.value)
    assert f"Could not find '{group}/no_such_option'" in message
    assert all(option in message for option in options(group))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=fixed", "loss.weights={y1: 1.0, clicks: 1.0}"], r"unknown task\(s\) \['clicks'\]"),
        (["loss=fixed", "loss.weights={y1: -1}"], r"loss.weights.y1 must be a finite number >= 0"),
        (["data.correlation=1.2"], r"data.correlation must be a number in \[-1, 1\], got 1.2"),
        (["data.correlation=-3"], r"data.correlation must be a number in \[-1, 1\], got -3"),
        (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
        (["data.batch_size=-4"], "data.batch_size must be an integer >= 1, got -4"),
        (["data.num_samples=0"], "data.num_samples must be an integer >= 1, got 0"),
        (["data.tasks.y1.kind=ranking"], "valid kinds are"),
        (["optimized_metric=test/mean_auroc"], "never select on test"),
        (["optimized_metric=val/mean_mse"], "is not logged by this run"),
        (["optimized_mode=min"], "contradicts val/mean_auroc"),
        (["loss=aligned_mtl", "loss.aggregator.scale_mode=mean"], r"loss.aggregator \(AlignedMTL\)"),
        (["loss=pcgrad", "loss.grad_source=weights"], "loss.grad_source"),
        (["loss=uncertainty", "loss.init_log_var=nan"], "loss.init_log_var"),
    ],
)
def test_bad_values_fail_before_a_run_exists(overrides, message, make_cfg, mlflow_runs):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*overrides))
    assert mlflow_runs() == []


def test_missing_data_file_names_the_path(tmp_path):
    missing = tmp_path / "census" / "census-income.data.gz"
    with pytest.raises(DataError, match=f"Data file not found: {missing}. Download it from UCI"):
        require_file(missing, "Download it from UCI.")
    missing.parent.mkdir()
    missing.write_text("x")
    assert require_file(missing, "") == missing


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli_unknown_option_exits_nonzero_with_choices():
    result = run_cli("loss=no_such_loss")
    assert result.returncode != 0
    assert "Could not find 'loss/no_such_loss'" in result.stderr
    assert all(f"\t{option}" in result.stderr for option in options("loss"))


def test_cli_config_error_is_one_readable_line(tmp_path):
    db = tmp_path / "mlflow.db"
    result = run_cli(
        "data.correlation=2", f"hydra.run.dir={tmp_path / 'out'}", env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    )
    assert result.returncode == 2
    assert "Error: data.correlation must be a number in [-1, 1], got 2 (it is a cosine)." in result.stderr
    assert "Traceback" not in result.stderr
    assert not db.exists()  # nothing half-written
    assert not (tmp_path / "out").exists()  # refused before Hydra made the run's folder: no .hydra/ copies, no log


def test_console_script_is_the_same_entry_point():
    exe = shutil.which("mtl-train") or str(Path(sys.executable).parent / "mtl-train")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "train is powered by Hydra" in result.stdout
    for group in ("backbone", "data", "loss"):
        assert f"{group}: " + ", ".join(options(group)) in result.stdout
