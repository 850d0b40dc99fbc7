"""Resume: a run killed (SIGKILL) or crashed mid-epoch continues from last.ckpt into the same MLflow run and
ends exactly where an uninterrupted run ends: same parameters, same metric histories, no step twice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from mtl_experiments import kept_outputs
from mtl_experiments.checkpoints import load
from mtl_experiments.data.base import TensorBatchLoader
from mtl_experiments.errors import ConfigError
from mtl_experiments.pipeline import train
from tests.conftest import ROOT, TINY

# 1600 train rows / 64 = 25 steps per epoch, 3 epochs; last.ckpt every 7 steps and after every epoch
RESUMABLE = [
    "callbacks.last_checkpoint.every_n_train_steps=7",
    "callbacks.last_checkpoint.every_n_minutes=null",
    "module.conflict.every_n_steps=5",  # conflict metrics: their running state must survive too
]


class SigkillAt(pl.Callback):
    """Fault injection for tests: SIGKILL this process after optimizer step ``step`` (or as validation of
    epoch ``val_epoch`` starts): nothing is flushed, closed or marked, as when a machine dies."""

    def __init__(self, step: int | None = None, val_epoch: int | None = None):
        self.step, self.val_epoch = step, val_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.current_epoch == self.val_epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class CrashAt(pl.Callback):
    """Fault injection for tests: raise after optimizer step ``step`` or as validation of epoch
    ``val_epoch`` starts (an in-process crash)."""

    def __init__(self, step: int | None = None, val_epoch: int | None = None):
        self.step, self.val_epoch = step, val_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected crash at step {self.step}")

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking and trainer.current_epoch == self.val_epoch:
            raise RuntimeError(f"injected crash in epoch {self.val_epoch}'s validation")


def histories(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(uri)
    return {
        key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in client.get_run(run_id).data.metrics
    }


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    return load(folder / "checkpoints" / "last.ckpt")["state_dict"]


def same(a, b) -> bool:
    """Exact equality of nested checkpoint contents (tensors bit for bit; extra states are dicts and lists)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_same_run(resumed: dict, reference: dict) -> None:
    assert set(resumed) == set(reference)
    for key, points in reference.items():
        if key == "epoch":  # Lightning logs it with every write, twice at an epoch's last step
            continue
        steps = [s for s, _ in resumed[key]]
        assert steps == sorted(set(steps)), f"{key}: steps repeated or out of order: {steps}"
        assert resumed[key] == points, key


def run_id_of(runs) -> str:
    (run,) = runs
    return run.info.run_id


def test_loader_continues_mid_epoch_with_the_same_batches():
    split = {"features": {"numeric": torch.arange(10.0)[:, None]}, "labels": {"y": torch.arange(10.0)}}

    def labels(loader):
        return [b["labels"]["y"].tolist() for b in loader]

    whole = TensorBatchLoader(split, batch_size=3, shuffle=True, seed=5)
    epochs = [labels(whole) for _ in range(3)]
    assert epochs[0] != epochs[1]  # a new order every epoch
    killed = TensorBatchLoader(split, batch_size=3, shuffle=True, seed=5)
    labels(killed)
    it = iter(killed)
    next(it), next(it)  # epoch 1: two batches trained on, then the process dies
    state = killed.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    resumed = TensorBatchLoader(split, batch_size=3, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    assert labels(resumed) == epochs[1][2:]
    assert resumed.state_dict()["epoch"] == 2 and labels(resumed) == epochs[2]
    other = TensorBatchLoader(split, batch_size=4, shuffle=True, seed=5)
    with pytest.raises(ConfigError, match="batch_size was 3, now 4"):
        other.load_state_dict(state)


def test_crashed_run_resumes_by_run_id_on_another_machine(make_cfg, mlflow_runs, tracking_uri, tmp_path, monkeypatch):
    """last.ckpt and the best checkpoint uploaded to MLflow; the run's folder lost (another machine):
    resume=<run id> downloads them and continues the same MLflow run exactly. The train metrics are updated every
    200 rows (4 steps), so the checkpoint (step 35: epoch 1's 10th step) holds their states and 2 steps' rows."""
    monkeypatch.setattr(kept_outputs, "FLUSH_ROWS", 200)
    ref_dir, run_dir, other = tmp_path / "reference", tmp_path / "run", tmp_path / "other"
    train(make_cfg(*RESUMABLE, "experiment_name=reference", f"paths.output_dir={ref_dir}"))
    crash = ["+callbacks.crash._target_=tests.test_resume.CrashAt", "+callbacks.crash.step=40"]
    upload = "callbacks.last_checkpoint.log_to_mlflow=true"
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_cfg(*RESUMABLE, upload, *crash, f"paths.output_dir={run_dir}"))
    client = MlflowClient(tracking_uri)
    run_id = next(r.info.run_id for r in mlflow_runs() if r.data.params["experiment_name"] != "reference")
    ref_id = next(r.info.run_id for r in mlflow_runs() if r.data.params["experiment_name"] == "reference")
    assert client.get_run(run_id).info.status == "FAILED"
    state = load(run_dir / "checkpoints" / "last.ckpt")["mtl"]
    assert len(state["train_outputs"]["batch"]["labels"]["y1"]) == 128 and state["train_metrics"]["y1"]["updated"]
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    }
    shutil.rmtree(run_dir)

    train(make_cfg(*RESUMABLE, upload, f"resume={run_id}", f"paths.output_dir={other}"))
    assert len(mlflow_runs()) == 2  # no new run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mtl.resume.count"] == "1"
    assert run.data.tags["mtl.checkpoint_dir"] == str(other / "checkpoints")
    reference, resumed = final_state(ref_dir), final_state(other)
    assert [k for k in reference if not same(resumed[k], reference[k])] == []
    assert_same_run(histories(tracking_uri, run_id), histories(tracking_uri, ref_id))


def test_resume_refuses_other_settings_and_names_the_run_overrides(make_cfg, mlflow_runs, tmp_path):
    crash = ["+callbacks.crash._target_=tests.test_resume.CrashAt", "+callbacks.crash.step=8"]
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_cfg(*RESUMABLE, *crash, "loss=uncertainty"))
    (run,) = mlflow_runs()
    with pytest.raises(ConfigError, match=r"these differ: loss\._target_: .*Uncertainty -> .*Equal.*python train\.py "):
        train(make_cfg(*RESUMABLE, f"resume={run.info.run_id}"))
    with pytest.raises(ConfigError, match="no such checkpoint file, and not an MLflow run id"):
        train(make_cfg(f"resume={tmp_path / 'missing.ckpt'}"))
    assert len(mlflow_runs()) == 1 and mlflow_runs()[0].info.status == "FAILED"  # nothing started


@pytest.mark.parametrize(
    ("crash", "checkpoint_step"),
    [("val_epoch=1", 45), ("step=27", 25)],  # killed while validating epoch 1; just after epoch 0's checkpoint
)
def test_resume_around_an_epoch_end(crash, checkpoint_step, make_cfg, tmp_path):
    """No step checkpoint between an epoch's last step and its validation (Lightning would skip both on
    resume): a crash in validation resumes from the step before; one after it from the epoch's checkpoint.
    DWA's epoch history and the epoch's train metrics come out exactly as in an uninterrupted run."""
    common = [*RESUMABLE, "callbacks.last_checkpoint.every_n_train_steps=5", "loss=dwa", "trainer.max_epochs=2"]
    train(make_cfg(*common, f"paths.output_dir={tmp_path / 'reference'}", "experiment_name=reference"))
    with pytest.raises(RuntimeError, match="injected crash"):
        train(
            make_cfg(
                *common,
                "+callbacks.crash._target_=tests.test_resume.CrashAt",
                f"+callbacks.crash.{crash}",
                f"paths.output_dir={tmp_path / 'run'}",
            )
        )
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load(checkpoint)["global_step"] == checkpoint_step
    train(make_cfg(*common, f"resume={checkpoint}", f"paths.output_dir={tmp_path / 'resumed'}"))
    reference, resumed = final_state(tmp_path / "reference"), final_state(tmp_path / "run")
    assert [k for k in reference if not same(resumed[k], reference[k])] == []


# dwa: test_resume_around_an_epoch_end; stch leaves its warm-up (the reference point) after epoch 1
STATEFUL = [
    *("uncertainty", "gradnorm", "famo", "rlw", "stch:loss.warmup_epochs=1", "moco", "excess_mtl", "db_mtl"),
    *("mgda", "upgrad", "cagrad", "nash_mtl", "fairgrad"),  # warm-started solvers: their last solution is state
]


@pytest.mark.parametrize("spec", STATEFUL)
def test_weighting_state_survives_a_crash(spec, make_cfg, tmp_path):
    """Learned weights, inner optimisers, loss histories, tracked gradients, generators: the resumed run matches
    exactly."""
    loss, *extra = spec.split(":")
    common = [*RESUMABLE, f"loss={loss}", *extra, "trainer.max_epochs=2"]
    train(make_cfg(*common, f"paths.output_dir={tmp_path / 'reference'}"))
    crash = ["+callbacks.crash._target_=tests.test_resume.CrashAt", "+callbacks.crash.step=30"]
    with pytest.raises(RuntimeError, match="injected crash"):
        train(make_cfg(*common, *crash, f"paths.output_dir={tmp_path / 'run'}"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load(checkpoint)["global_step"] == 28  # the last step checkpoint before the crash
    train(make_cfg(*common, f"resume={checkpoint}", f"paths.output_dir={tmp_path / 'resumed'}"))
    reference, resumed = final_state(tmp_path / "reference"), final_state(tmp_path / "run")
    assert set(resumed) == set(reference)
    assert [k for k in reference if not same(resumed[k], reference[k])] == []


def _train_py(*overrides: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_sigkilled_training_process_resumes_exactly(tracking_uri, tmp_path):
    """A real `python train.py` process SIGKILLed mid-epoch, resumed by run id; then killed again while
    validating, resumed again: one MLflow run, FINISHED, the same as an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking_uri}
    common = [*TINY, *RESUMABLE]

    def launch(name: str, *extra: str) -> subprocess.CompletedProcess:
        return _train_py(*common, f"hydra.run.dir={tmp_path / name}", *extra, env=env)

    done = launch("reference", "experiment_name=reference")
    assert done.returncode == 0, done.stderr[-3000:]
    killed = launch("run", "+callbacks.kill._target_=tests.test_resume.SigkillAt", "+callbacks.kill.step=40")
    assert killed.returncode == -signal.SIGKILL
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mtl-experiments").experiment_id])
    assert run.info.status == "RUNNING"  # what `mlflow ui` shows for a killed run until it is resumed
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 35

    again = launch(
        "resume1",
        f"resume={run.info.run_id}",
        "+callbacks.kill._target_=tests.test_resume.SigkillAt",
        "+callbacks.kill.val_epoch=2",
    )
    assert again.returncode == -signal.SIGKILL
    final = launch("resume2", f"resume={run.info.run_id}")
    assert final.returncode == 0, final.stderr[-3000:]

    (run,) = client.search_runs([client.get_experiment_by_name("mtl-experiments").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mtl.resume.count"] == "2"
    (ref,) = client.search_runs([client.get_experiment_by_name("reference").experiment_id])
    reference = final_state(tmp_path / "reference")
    resumed = final_state(tmp_path / "run")
    assert [k for k in reference if not same(resumed[k], reference[k])] == []
    assert_same_run(histories(tracking_uri, run.info.run_id), histories(tracking_uri, ref.info.run_id))


class _SeesLastCheckpoint(pl.Callback):
    """Records, before each training batch of the first epoch, whether last.ckpt exists yet."""

    def __init__(self, path: Path):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.seen.append(self.path.exists())


@pytest.mark.parametrize("minutes, written_mid_epoch", [(1e-9, True), (None, False)])
def test_time_based_last_checkpoint_is_written_inside_an_epoch(minutes, written_mid_epoch, tmp_path):
    """every_n_minutes (Lightning ignores its own time interval under manual optimization): with a clock that is
    always due, last.ckpt exists from the second batch on; without it, only after the epoch."""
    from mtl_experiments.checkpoints import LastCheckpoint
    from tests.conftest import bare_trainer
    from tests.module.test_module import setup_module_and_batch

    module, dm = setup_module_and_batch()
    seen = _SeesLastCheckpoint(tmp_path / "last.ckpt")
    callbacks = [LastCheckpoint(dirpath=str(tmp_path), every_n_minutes=minutes), seen]
    bare_trainer(max_epochs=1, enable_checkpointing=True, callbacks=callbacks).fit(module, datamodule=dm)
    assert seen.seen[0] is False and all(s is written_mid_epoch for s in seen.seen[1:])
    assert (tmp_path / "last.ckpt").exists()  # the epoch-end checkpoint either way


def test_a_run_logged_without_a_config_compares_its_settings_not_its_group_choices(tracking_uri, tmp_path):
    """Old checkpoints carry no config: the run's params are the settings, less the group choices that mirror
    their tags (``loss: equal``), which no flattened config has and which must not read as changed."""
    from mtl_experiments.resume import Resume

    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("old-run"), tags={"loss": "equal"}).info.run_id
    for key, value in {"loss": "equal", "seed": "0", "loss._target_": "mtl_experiments.loss.equal.Equal"}.items():
        client.log_param(run_id, key, value)
    old = Resume(checkpoint=tmp_path / "last.ckpt", run_id=run_id, run=client.get_run(run_id))
    same = {"seed": 0, "loss._target_": "mtl_experiments.loss.equal.Equal"}
    old.check(same)  # the choice param is not a difference
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1"):
        old.check({**same, "seed": 1})
