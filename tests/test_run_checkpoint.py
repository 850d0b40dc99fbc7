"""run_checkpoint.find: a run's best (serving) or last (resume) checkpoint, from its folder else its artifacts, on a
real SQLite MLflow store with small checkpoint files (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_experiments import run_checkpoint, tracking
from mtl_experiments.errors import ConfigError
from tests.conftest import fresh_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_store):
    uri = fresh_store(empty_store, tmp_path_factory.mktemp("store") / "mlflow.db")
    client = MlflowClient(uri)
    return client, uri, client.create_experiment("finder")


def save(path: Path, tag: str, best: Path | None = None) -> Path:
    """A checkpoint file that says which it is; a ``last.ckpt`` may record the monitoring callback's best."""
    path.parent.mkdir(parents=True, exist_ok=True)
    callbacks = {"ModelCheckpoint{'monitor': 'val/mean_auroc'}": {"best_model_path": str(best)}} if best else {}
    torch.save({"tag": tag, "callbacks": callbacks}, path)
    return path


def tag_of(path: Path) -> str:
    return torch.load(path, weights_only=True)["tag"]


def new_run(store, folder: Path | None = None, artifacts: dict[str, str] | None = None, tmp: Path | None = None):
    client, _, experiment = store
    tags = {tracking.CHECKPOINT_DIR_TAG: str(folder)} if folder is not None else {}
    run = client.create_run(experiment, tags=tags)
    for name, tag in (artifacts or {}).items():
        client.log_artifact(run.info.run_id, str(save(tmp / "upload" / name, tag)), tracking.CHECKPOINT_ARTIFACTS)
    return client.get_run(run.info.run_id)


def test_last_prefers_the_local_folder(store, tmp_path):
    folder = tmp_path / "ckpts"
    save(folder / "last.ckpt", "local last")
    run = new_run(store, folder, {"last.ckpt": "artifact last"}, tmp_path)
    path, note = run_checkpoint.find(store[1], run, "last", tmp_path / "down")
    assert (path, note) == (folder / "last.ckpt", None)
    assert not (tmp_path / "down").exists()


def test_last_downloads_last_and_best_artifacts(store, tmp_path):
    run = new_run(store, tmp_path / "gone", {"last.ckpt": "artifact last", "best.ckpt": "artifact best"}, tmp_path)
    path, note = run_checkpoint.find(store[0], run.info.run_id, "last", tmp_path / "down")
    assert (path, note) == (tmp_path / "down" / "last.ckpt", None)
    assert tag_of(path) == "artifact last" and tag_of(tmp_path / "down" / "best.ckpt") == "artifact best"


def test_best_is_the_recorded_best_of_the_folder(store, tmp_path):
    folder = tmp_path / "ckpts"
    best = save(folder / "best-epoch001.ckpt", "local best")
    save(folder / "best-epoch000.ckpt", "older")
    save(folder / "last.ckpt", "local last", best=Path("/elsewhere") / best.name)  # folder moved since
    run = new_run(store, folder, {"best.ckpt": "artifact best"}, tmp_path)
    assert run_checkpoint.find(store[1], run, "best", tmp_path / "down") == (best, None)


def test_best_artifact_beats_a_local_last(store, tmp_path):
    folder = tmp_path / "ckpts"
    save(folder / "last.ckpt", "local last")
    run = new_run(store, folder, {"best.ckpt": "artifact best", "last.ckpt": "artifact last"}, tmp_path)
    path, note = run_checkpoint.find(store[1], run, "best", tmp_path / "down")
    assert tag_of(path) == "artifact best" and note is None
    assert not (tmp_path / "down" / "last.ckpt").exists()  # serving downloads only what it loads


def test_best_falls_back_to_last_with_a_note(store, tmp_path):
    folder = tmp_path / "ckpts"
    save(folder / "last.ckpt", "local last")
    path, note = run_checkpoint.find(store[1], new_run(store, folder), "best", tmp_path / "down")
    assert path == folder / "last.ckpt" and note.startswith(f"no best checkpoint in {folder}: using last.ckpt")
    run = new_run(store, None, {"last.ckpt": "artifact last"}, tmp_path)
    path, note = run_checkpoint.find(store[1], run, "best", tmp_path / "down")
    assert tag_of(path) == "artifact last"
    assert note == f"run {run.info.run_id} has no best checkpoint: using its artifact last.ckpt (the final weights)"


def test_no_checkpoint_names_where_it_looked_and_the_fix(store, tmp_path):
    run = new_run(store, tmp_path / "gone", {"best.ckpt": "artifact best"}, tmp_path)
    fix = "or pass the checkpoint file instead: resume=/path/to/last.ckpt"
    with pytest.raises(ConfigError) as e:
        run_checkpoint.find(store[1], run, "last", tmp_path / "down", fix=fix)
    assert str(e.value).startswith(f"Run {run.info.run_id} has no last checkpoint: none in {tmp_path / 'gone'}")
    assert "no artifact checkpoints/last.ckpt" in str(e.value) and str(e.value).endswith(f"; {fix}.")
    with pytest.raises(ConfigError, match=r"has no checkpoint: no folder tag, and no artifact checkpoints/\{best"):
        run_checkpoint.find(store[1], new_run(store), "best", tmp_path / "down")


def test_an_unlisted_artifact_store_is_said(store, tmp_path, monkeypatch):
    client = store[0]

    def fail(*args, **kwargs):
        raise OSError("artifact store away")

    monkeypatch.setattr(client, "list_artifacts", fail)
    with pytest.raises(ConfigError, match=r"\(its artifacts could not be listed: artifact store away\)"):
        run_checkpoint.find(client, new_run(store), "best", tmp_path / "down")
