"""MLflow tracking: URI resolution, fail-fast checks, and a real `mlflow server` process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient

from mtl_experiments import tracking
from mtl_experiments.errors import TrackingError
from mtl_experiments.pipeline import train
from tests.conftest import ROOT, free_port


def test_default_uri_is_an_absolute_sqlite_file_in_the_launch_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # outside a Hydra run: the process's cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_environment_variable_is_read_at_run_time_and_config_wins(monkeypatch, tmp_path):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert tracking.resolve_tracking_uri("sqlite:////data/x.db") == "sqlite:////data/x.db"
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path / 'rel' / 'x.db'}"


def test_unreachable_server_fails_fast_naming_the_uri(make_cfg, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = make_cfg("logger.mlflow.tracking_uri=null")
    start = time.perf_counter()
    with pytest.raises(TrackingError, match=f"tracking server {uri} cannot be reached.*mlflow server"):
        train(cfg)
    assert time.perf_counter() - start < 30  # before any training


def test_unwritable_sqlite_store_fails_fast(make_cfg, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="not_a_dir is not a directory"):
        train(make_cfg(f"logger.mlflow.tracking_uri=sqlite:///{blocker / 'mlflow.db'}"))


def test_file_store_is_refused_with_the_fix():
    with pytest.raises(TrackingError, match="use sqlite:///"):
        tracking.check_tracking_uri("file:///tmp/mlruns")


def test_flatten_gives_dotted_params():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {
        "a.b": 1,
        "a.c": "[1, 2]",
        "d": None,
        "e": "{}",
    }


def test_run_against_a_real_tracking_server(mlflow_server, make_cfg, monkeypatch, tmp_path):
    """A run through a server records its settings for the UI: choices as params, per-run paths as tags, the
    experiment as model training, the dataset as a dataset input, the console log (a root log file, as Hydra's)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    handler = logging.FileHandler(tmp_path / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        train(make_cfg("logger.mlflow.tracking_uri=null", "trainer.max_epochs=1"))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mtl-experiments")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["loss"] == "equal"
    assert "test/y1/auroc" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {
        "config/config.yaml",
        "config/overrides.yaml",
    }
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    params, tags = run.data.params, run.data.tags
    assert (params["data"], params["backbone"], params["loss"]) == ("synthetic", "shared_bottom", "equal")
    assert not [k for k in params if tracking.is_run_path(k)]
    assert tags["paths.output_dir"] == str(tmp_path / "out")
    assert tags["callbacks.model_checkpoint.dirpath"] == str(tmp_path / "out" / "checkpoints")
    check_dataset_input(run)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "logs")] == ["logs/train.log"]
    logged = Path(client.download_artifacts(run.info.run_id, "logs/train.log", str(tmp_path / "dl"))).read_text()
    assert "Loaded model weights from the checkpoint" in logged  # the test of the best checkpoint, near the end
    assert (tmp_path / "train.log").read_text().startswith(logged)


def check_dataset_input(run) -> None:
    """The tiny synthetic data (TINY: 2000 rows of 8 inputs, tasks y1 and y2) as the run's dataset input."""
    (record,) = run.inputs.dataset_inputs
    dataset = record.dataset
    assert (dataset.name, dataset.source_type) == ("synthetic", "code")
    assert json.loads(dataset.source) == {"generator": "mtl_experiments.data.synthetic.SyntheticDataModule"}
    assert len(dataset.digest) == 16 and {t.key: t.value for t in record.tags} == {"mlflow.data.context": "train"}
    columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
    assert columns[-2:] == ["label.y1", "label.y2"] and len(columns) == 10, columns
    profile = json.loads(dataset.profile)
    assert profile["num_rows"] == 2000 == profile["train_rows"] + profile["val_rows"] + profile["test_rows"]


_RACER = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient  # imported before the barrier, so the store calls start together
from mtl_experiments import tracking
Path(sys.argv[3]).touch()
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
print(tracking.ensure_experiment(sys.argv[1], "race"))
"""


def test_concurrent_runs_create_a_new_sqlite_store_once(tmp_path):
    """Sweeps started together on a store that does not exist yet: MLflow creates (migrates) the SQLite schema
    on first use, and unserialised processes fail ('duplicate column name', alembic 'expected to match one
    row'; measured: 3 of 4 failed); under the store lock every process gets the one experiment."""
    uri, go = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, uri, str(go), str(r)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        for r in ready
    ]
    deadline = time.time() + 120
    while not all(r.exists() for r in ready) and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
