"""A run-comparison store written straight into a real (temporary) MLflow store: runs as ``pipeline.train``
logs them (choice tags, flattened params, test metrics, histories) without training. Used by
tests/compare/ and tests/test_notebook.py."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from tests.conftest import fresh_store

EXPERIMENT = "cmp"
TEST_KEYS = ("y1/auroc", "y1/logloss", "y2/auroc", "y2/logloss")


def log_run(
    client: MlflowClient,
    exp_id: str,
    backbone: str,
    loss: str,
    seed: int,
    values: tuple[float, ...] = (),
    *,
    correlation: float = 0.5,
    status: str = "FINISHED",
    parent: str | None = None,
    extra_metrics: dict[str, float] | None = None,
    history: dict[str, list[float]] | None = None,
) -> str:
    """One run as ``pipeline.train`` logs it (choice tags, flattened params, test metrics), written directly."""
    tags = {"data": "synthetic", "backbone": backbone, "loss": loss, "optimizer": "adam", "overrides": f"seed={seed}"}
    if parent:
        tags.update({"mlflow.parentRunId": parent, "mtl.sweep_id": parent})
    run = client.create_run(exp_id, tags=tags, run_name=f"{backbone}-{loss}-seed{seed}")
    run_id = run.info.run_id
    params = {
        "data._target_": "mtl_experiments.data.synthetic.SyntheticDataModule",
        "data.correlation": correlation,
        "data.seed": 0,
        "data.shuffle_seed": seed,
        "data.tasks.y1.kind": "binary",
        "data.tasks.y2.kind": "binary",
        "backbone._target_": f"mtl_experiments.backbone.{backbone}.X",
        "loss._target_": f"mtl_experiments.loss.{loss}.X",
        "optimizer.lr": 0.001,
        "experiment_name": EXPERIMENT,
        "optimized_metric": "val/mean_auroc",
        "seed": seed,
        "paths.output_dir": f"/tmp/outputs/{run_id}",  # per run, not configuration
        "callbacks.model_checkpoint.dirpath": f"/tmp/outputs/{run_id}/checkpoints",
    }
    if backbone == "shared_bottom":
        params["backbone.bottom_dims"] = "[16]"
    if loss == "rlw":
        params["loss.seed"] = seed  # follows the seed
    now = int(time.time() * 1000)
    metrics = [Metric(f"test/{k}", v, now, 0) for k, v in zip(TEST_KEYS, values, strict=True)]
    metrics += [Metric(k, v, now, 0) for k, v in (extra_metrics or {}).items()]
    metrics += [Metric(k, v, now, step) for k, series in (history or {}).items() for step, v in enumerate(series)]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, status)
    return run_id


def make_store(tmp_path: Path, empty_store: Path, with_single_task: bool = True) -> dict:
    """A sweep of shared_bottom × {equal, rlw} × seeds {0, 1} (+ a FAILED seed 2), single-task runs of the
    same data (equal × 2 seeds, rlw × 1) and a single-task run of other data (correlation 0.9)."""
    uri = fresh_store(empty_store, tmp_path / "store.db")  # a copy of an empty store (conftest.empty_store)
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp_id, tags={"mtl.role": "sweep_parent"}, run_name="sweep-x").info.run_id
    ids: dict[str, list[str]] = {}

    def add(name, *args, **kwargs):
        ids.setdefault(name, []).append(log_run(client, exp_id, *args, parent=parent, **kwargs))

    def conflict(cos, rate):
        return {
            "conflict/mean/initial_cosine/y1-y2": cos + 0.5,
            "conflict/mean/initial_output_cosine/y1-y2": cos + 0.4,
            "conflict/mean/cosine/y1-y2": cos,
            "conflict/mean/rate/y1-y2": rate,
            "conflict/mean/magnitude/y1-y2": 0.9,
        }

    def curves(seed):
        return {
            "train/weight/y1": [1.0, 0.9 + 0.01 * seed, 0.8],
            "train/weight/y2": [1.0, 1.1, 1.2 - 0.01 * seed],
            "train/conflict/cosine/y1-y2": [0.3, 0.1, -0.1 + 0.05 * seed],
        }

    # y1/auroc, y1/logloss, y2/auroc, y2/logloss
    add(
        "mtl_equal",
        "shared_bottom",
        "equal",
        0,
        (0.84, 0.45, 0.70, 0.60),
        extra_metrics=conflict(0.2, 0.1),
        history=curves(0),
    )
    add(
        "mtl_equal",
        "shared_bottom",
        "equal",
        1,
        (0.86, 0.45, 0.70, 0.66),
        extra_metrics=conflict(0.4, 0.3),
        history=curves(1),
    )
    add("failed", "shared_bottom", "equal", 2, (0.10, 9.0, 0.10, 9.0), status="FAILED")
    add(
        "mtl_rlw",
        "shared_bottom",
        "rlw",
        0,
        (0.80, 0.50, 0.77, 0.54),
        extra_metrics=conflict(-0.1, 0.6),
        history=curves(0),
    )
    add(
        "mtl_rlw",
        "shared_bottom",
        "rlw",
        1,
        (0.80, 0.50, 0.77, 0.54),
        extra_metrics=conflict(0.1, 0.4),
        history=curves(1),
    )
    if with_single_task:
        add("stl_equal", "single_task", "equal", 0, (0.79, 0.49, 0.69, 0.59))
        add("stl_equal", "single_task", "equal", 1, (0.81, 0.51, 0.71, 0.61))
        add("stl_rlw", "single_task", "rlw", 0, (0.50, 0.90, 0.50, 0.90))  # loss=equal is preferred as baseline
        add("other_data", "single_task", "equal", 0, (0.60, 0.70, 0.60, 0.70), correlation=0.9)
    return {"uri": uri, "client": client, "parent": parent, "ids": ids}
