"""Data-parallel training (``trainer=ddp``) on 2 CPU processes (gloo), against 1 process on the global batch.

One launch of ``tests/ddp_worker.py`` trains every loss method under DDP (Lightning's launcher starts rank 1;
the process group serves all the methods in turn); each rank saves its final state. Checked: the two
replicas are bit-identical (no drift), and for the methods in ``EQUIVALENCE`` the final parameters, the
method's state and the per-step weights and gradient norms equal a 1-process run on the same global batches
(per-rank batch 16, global batch 32, 2 epochs of 4 steps) up to float rounding. Without the all-reduce of the
per-task gradients and losses (measured over 12 steps): PCGrad's parameters differ by 1e-2 and FAMO's by
8e-2, and the replicas differ from each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from mlflow.tracking import MlflowClient

from mtl_experiments.errors import ConfigError
from mtl_experiments.pipeline import train
from tests.conftest import ROOT, compose_cfg, options
from tests.ddp_worker import file_name, run

WORKER = ROOT / "tests" / "ddp_worker.py"
PER_RANK, WORLD, STEPS = 16, 2, 8
# the five (equal, uncertainty, gradnorm and two gradient-level methods), the methods with a loss
# history (FAMO, DWA) and the representation variants (the gathered batch instead of the averaged gradient)
EQUIVALENCE = [
    "equal",
    "uncertainty",
    "gradnorm",
    "pcgrad",
    "upgrad",
    "famo",
    "dwa",
    "mgda:grad_source=representation",
    "graddrop:grad_source=representation",
    # mixture gates gathered over the ranks; lookahead affinity on the global batch's losses (a larger lr makes
    # Z ~2e-4: rank 0's own batch alone is 7e-6 off, float noise 2e-7)
    "upgrad:@backbone=mmoe,@module.conflict.affinity_every_n_steps=3,@optimizer.lr=0.05",
]
OTHERS = [name for name in options("loss") if name not in EQUIVALENCE]  # a new conf/loss/*.yaml enrolls here
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Every method under DDP, then a NaN on rank 1 only (skipped, then stopping: the last spec)."""
    out = tmp_path_factory.mktemp("ddp")
    specs = [*EQUIVALENCE, *OTHERS, "nan_skip", "nan"]
    cmd = [sys.executable, str(WORKER), str(out), str(WORLD), str(PER_RANK), *specs]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def ranks(out: Path, spec: str) -> list[dict]:
    return [torch.load(out / f"{file_name(spec)}-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_identical_replicas(r0: dict, r1: dict) -> None:
    assert r0["state"].keys() == r1["state"].keys()
    drift = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    assert not drift, f"rank 0 and rank 1 differ in {drift}"


@pytest.mark.parametrize("spec", EQUIVALENCE)
def test_two_processes_compute_what_one_process_computes_on_the_global_batch(spec, ddp_runs):
    r0, r1 = ranks(ddp_runs, spec)
    assert (r0["world_size"], r0["steps"], r1["steps"]) == (WORLD, STEPS, STEPS)
    assert_identical_replicas(r0, r1)
    one = run(spec, devices=1, batch_size=WORLD * PER_RANK)
    assert one["steps"] == STEPS and one["state"].keys() == r0["state"].keys()
    for key, value in one["state"].items():  # model, the method's parameters and buffers (DWA/FAMO history)
        torch.testing.assert_close(r0["state"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    # every step's weights and gradient norms (conflict metrics every step, from the synchronised G)
    torch.testing.assert_close(r0["weights"], one["weights"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r0["grad_norms"], one["grad_norms"], atol=1e-5, rtol=1e-4)
    assert r0["log_values"].keys() == one["log_values"].keys()
    for key, value in one["log_values"].items():  # the method's logged state
        torch.testing.assert_close(r0["log_values"][key], value, atol=1e-4, rtol=1e-4, msg=key)
    assert r0["conflict"].keys() == one["conflict"].keys()
    for key, value in one["conflict"].items():  # every conflict metric's sum over the measured steps
        torch.testing.assert_close(r0["conflict"][key], value, atol=2e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("spec", OTHERS)
def test_every_other_method_trains_under_ddp_with_identical_replicas(spec, ddp_runs):
    r0, r1 = ranks(ddp_runs, spec)
    assert (r0["steps"], r1["steps"]) == (STEPS, STEPS)
    assert_identical_replicas(r0, r1)
    assert all(torch.isfinite(v).all() for v in r0["state"].values() if v.is_floating_point())
    assert torch.isfinite(r0["weights"]).all()


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(ddp_runs):
    # rank 1 alone had a NaN input at its third batch; the losses the check sees are the global batch's
    results = _existing(ddp_runs, "nan")
    assert results and results[0]["rank"] == 0
    for r in results:
        assert r["error"] == "NonFiniteLossError" and r["steps"] == 2
        assert "step 3" in r["message"]


def test_a_skipped_nan_step_is_skipped_by_every_rank(ddp_runs):
    r0, r1 = ranks(ddp_runs, "nan_skip")
    assert (r0["skipped"], r1["skipped"]) == (1, 1)
    assert (r0["steps"], r1["steps"]) == (3, 3)  # 4 batches, one skipped
    assert_identical_replicas(r0, r1)


def _existing(out: Path, spec: str) -> list[dict]:
    # rank 1 may be ended by Lightning before it writes its result: rank 0's is required
    paths = [out / f"{file_name(spec)}-rank{r}.pt" for r in range(WORLD)]
    return [torch.load(p, weights_only=False) for p in paths if p.exists()]


def test_train_py_under_ddp_writes_one_mlflow_run_from_rank_zero(tmp_path, tracking_uri):
    uri = tracking_uri
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "trainer=ddp",
        "loss=pcgrad",
        "data.num_samples=400",  # 320 training rows: 5 steps of 2 x 32 per epoch
        "data.input_dim=8",
        "data.batch_size=32",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "module.conflict.every_n_steps=1",
        "trainer.enable_model_summary=false",
        "~callbacks.progress_bar",
        f"logger.mlflow.tracking_uri={uri}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    (run_,) = runs
    assert run_.info.status == "FINISHED"
    assert run_.data.params["trainer.strategy"] == "ddp" and run_.data.params["trainer.devices"] == "2"
    for key in ("train/loss/y1", "train/weight/y2", "train/conflict/cosine/y1-y2"):
        steps = [m.step for m in client.get_metric_history(run_.info.run_id, key)]
        assert sorted(steps) == list(range(5)), key  # each step once: rank 1 logged nothing
    assert {"val/mean_auroc", "test/y1/auroc", "conflict/mean/cosine/y1-y2"} <= set(run_.data.metrics)
    assert proc.stdout.count("test metrics") == 1  # the results table: rank 0 only


@pytest.mark.parametrize("spec", [*options("loss"), "mgda:grad_source=representation"])
def test_bf16_mixed_trains_every_method(spec):
    result = run(spec, devices=1, batch_size=32, precision="bf16-mixed", epochs=1)
    assert result["steps"] == 4
    assert all(torch.isfinite(v).all() for v in result["state"].values() if v.is_floating_point())
    assert torch.isfinite(result["weights"]).all()


def test_bf16_mixed_aggregates_in_float32():
    # MGDA's weights are a convex combination; under autocast its Gramian would be bfloat16 (sum off by ~2e-3)
    weights = run("mgda", devices=1, batch_size=32, precision="bf16-mixed", epochs=1)["weights"]
    torch.testing.assert_close(weights.sum(1), torch.ones(len(weights), dtype=weights.dtype), atol=1e-5, rtol=0)


def test_float16_loss_scaling_is_refused_for_gradient_methods_before_a_run_exists(make_cfg, mlflow_runs):
    plugin = "{_target_:lightning.pytorch.plugins.precision.MixedPrecision,precision:16-mixed,device:cpu}"
    scaler = f"+trainer.plugins=[{plugin}]"  # float16 with a GradScaler (Lightning turns 16-mixed on CPU into bf16)
    with pytest.raises(ConfigError, match="bf16-mixed"):
        train(make_cfg("loss=pcgrad", scaler))
    assert mlflow_runs() == []


def test_ddp_config_leaves_the_backend_to_lightning(tmp_path):
    # gloo on CPU, NCCL on GPUs (trainer.accelerator=gpu): the config names no backend
    cfg = compose_cfg(["trainer=ddp"], tmp_path)
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy._process_group_backend is None
    assert trainer.strategy._get_process_group_backend() == "gloo"
