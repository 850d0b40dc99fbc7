"""The fault drill of issue 18, as a hostile tester ran it: same-second launches, a checkpoint of another run or
configuration, unwritable folders (at start and mid-run), secrets in every file a run writes, a run killed before
its first checkpoint, unsupported strategies. Crafted checkpoints and run artifacts: tests/recommend/
test_safe_loading.py; divergence and counters: tests/module/.

Running as root (CI), a chmod'ed folder stays writable, so "unwritable" here is a path through a regular file:
no user can create a folder there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_experiments import checkpoints
from mtl_experiments.errors import ConfigError, StorageError
from mtl_experiments.pipeline import train
from tests.conftest import ROOT

FAST = ["trainer.max_epochs=2", "callbacks.last_checkpoint.every_n_minutes=null"]


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- one folder per run ---------------------------------------------------------------------------------
def test_runs_launched_in_the_same_second_get_their_own_output_folders(tmp_path):
    # four launches at once that stop early, after Hydra made the folder: a strategy the pipeline refuses at start-up
    # (a bad value is refused before Hydra makes any folder); the folders are the point
    procs = [launch(["+trainer.strategy=fsdp", "hydra.job.name=x"], tmp_path) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err
    folders = sorted(p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir())
    assert len(folders) == 4, folders
    suffixes = {f.name.rsplit("-", 1)[1] for f in folders}
    assert len(suffixes) == 4 and all(len(s) == 6 for s in suffixes), folders  # the same second, told apart


def test_resume_refuses_a_checkpoint_written_by_another_run(make_cfg, mlflow_runs, tracking_uri):
    # the old failure: two runs share one checkpoint folder, the second one's last.ckpt replaces the first's, and
    # resume=<first run> continued from the second run's model
    train(make_cfg(*FAST, "seed=0"))
    train(make_cfg(*FAST, "seed=1"))  # same paths.output_dir (make_cfg's), so the same checkpoints folder
    first = min(mlflow_runs(), key=lambda r: r.info.start_time)
    with pytest.raises(ConfigError, match=r"was written by another run, [0-9a-f]{32}.*mix two models"):
        train(make_cfg(*FAST, "seed=0", f"resume={first.info.run_id}"))


def test_resume_of_a_checkpoint_file_refuses_another_configuration(make_cfg, tmp_path):
    cfg = make_cfg(*FAST)
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    meta = checkpoints.load(last)["mtl"]
    assert len(meta["config_hash"]) == 16 and meta["mlflow_run_id"]
    # a store that does not know the run: only the checkpoint itself can say the settings differ
    other = f"logger.mlflow.tracking_uri=sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(ConfigError, match=r"these differ: .*seed: 0 -> 7"):
        train(make_cfg(*FAST, other, "seed=7", f"resume={last}"))


# -- storage ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["paths.output_dir", "callbacks.last_checkpoint.dirpath"])
def test_unwritable_folders_stop_the_run_before_anything_is_recorded(key, make_cfg, mlflow_runs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match=rf"^{key}=.*a-file/sub cannot be written .*nothing was trained"):
        train(make_cfg(f"{key}={blocker}/sub"))
    assert mlflow_runs() == []


def test_unwritable_hydra_run_dir_is_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "a-file").write_text("")
    p = launch(["hydra.run.dir=a-file/run"], tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2
    assert err.strip().splitlines()[-1].startswith("Error: hydra.run.dir=a-file/run cannot be written")
    assert "Traceback" not in err and not (tmp_path / "mlflow.db").exists()


class BreakCheckpointFolder(pl.Callback):
    """Fault injection: after epoch ``epoch`` ends (its checkpoints written), the checkpoint folder is replaced by a
    regular file, as a disk that turned read-only would refuse the next write."""

    def __init__(self, folder: str, epoch: int = 0):
        self.folder, self.epoch = Path(folder), epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch + 1:
            self.folder.rename(self.folder.with_name("checkpoints.moved"))
            self.folder.write_text("")


def test_a_failed_checkpoint_write_stops_the_run_naming_the_last_good_one(make_cfg, mlflow_runs):
    cfg = make_cfg(*FAST)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    cfg = make_cfg(
        *FAST,
        "+callbacks.breaker._target_=tests.faults.test_fault_drill.BreakCheckpointFolder",
        f"+callbacks.breaker.folder={folder}",
    )
    with pytest.raises(StorageError, match=r"Writing the checkpoint .*checkpoints/.* failed .* last good checkpoint"):
        train(cfg)
    (run,) = mlflow_runs()
    assert run.info.status == "FAILED"  # stopped at the first failed write, not at test time


def test_verified_checkpoint_io_raises_where_lightning_would_swallow(tmp_path):
    io = checkpoints.VerifiedCheckpointIO()
    io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "ok" / "last.ckpt")
    assert torch.load(tmp_path / "ok" / "last.ckpt", weights_only=True)["x"].sum() == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match=r"last good checkpoint is .*ok/last.ckpt"):
        io.save_checkpoint({"x": torch.ones(2)}, tmp_path / "file" / "last.ckpt")
    assert [p.name for p in (tmp_path / "ok").iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the permission case needs a user")
def test_a_read_only_folder_raises_for_a_user(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            checkpoints.VerifiedCheckpointIO().save_checkpoint({}, folder / "last.ckpt")
    finally:
        folder.chmod(0o700)


# -- no secret on disk --------------------------------------------------------------------------------
def test_no_secret_reaches_any_file_the_run_writes(tmp_path):
    # a password in the tracking URI and a secret-named key: Hydra writes its .hydra/*.yaml before our code runs
    p = launch(
        ["logger.mlflow.tracking_uri=http://user:hunter2@127.0.0.1:9", "+logger.mlflow.tags.db_password=hunter3"],
        tmp_path,
    )
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "cannot be reached" in err
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "overrides.yaml" for f in files)  # Hydra did write them
    for f in files:
        text = f.read_text(errors="replace")
        assert "hunter2" not in text and "hunter3" not in text, f
    assert "hunter2" not in out + err and "hunter3" not in out + err


def test_secret_named_keys_are_masked_in_params_artifacts_and_checkpoints(make_cfg, mlflow_runs, tmp_path):
    cfg = make_cfg(*FAST, "+logger.mlflow.tags.api_token=hunter4")
    train(cfg)
    (run,) = mlflow_runs()
    assert run.data.params["logger.mlflow.tags.api_token"] == "***"
    assert run.data.tags["api_token"] == "***"
    for f in [*Path(cfg.paths.output_dir).rglob("*"), *tmp_path.rglob("mlflow.db")]:
        if f.is_file():
            assert b"hunter4" not in f.read_bytes(), f


# -- runs end in a known state ------------------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_is_marked_killed_on_resume(make_cfg, tracking_uri, tmp_path):
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("killed")
    run = client.create_run(exp, tags={"mtl.checkpoint_dir": str(tmp_path / "empty"), "overrides": "seed=3"})
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # what a SIGKILL in epoch 0 leaves
    with pytest.raises(ConfigError, match=r"killed before its first checkpoint.*now marked KILLED.*train.py seed=3"):
        train(make_cfg(f"resume={run.info.run_id}"))
    assert client.get_run(run.info.run_id).info.status == "KILLED"


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed", "xla", "no_such_strategy"])
def test_unsupported_strategies_are_refused_at_start_up(strategy, make_cfg, mlflow_runs):
    with pytest.raises(ConfigError, match=rf"^trainer.strategy={strategy} is not supported: .* one device or with DDP"):
        train(make_cfg(f"+trainer.strategy={strategy}"))
    assert mlflow_runs() == []


def test_strategy_refusal_from_the_command_line_is_one_line(tmp_path):
    p = launch(["+trainer.strategy=fsdp"], tmp_path)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: trainer.strategy=fsdp is not supported")
