"""``mtl-compare --front`` (mtl_experiments/compare/front.py, front_output.py): the signed distance to the front
and the non-dominated mask (hand-computed, and their defining properties on random points), and the whole report
on runs written into a real (temporary) MLflow store: the best static weights chosen on validation, the front,
Δm% against the best static weights and against single-task, the CLI and its errors."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from mtl_experiments.compare import main, pareto_front
from mtl_experiments.compare.front import front_compare, front_distance, non_dominated, units
from mtl_experiments.compare.runs import load_runs
from tests.conftest import fresh_store

# ------------------------------------------------------------------------------------------ the maths


def test_distance_hand_computed():
    front = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert front_distance([0.5, 0.5], front) == 0.5  # neither corner dominates it: beyond the front
    assert front_distance([-1.0, -1.0], front) == -1.0  # behind: (0, 1) is better by 1 on every metric
    assert front_distance([1.0, 0.0], front) == 0.0  # a member
    assert math.isnan(front_distance([0.5, math.nan], front))
    np.testing.assert_allclose(units({"a": 0.9, "b": 2.0}, {"a": 0.8, "b": 4.0}, {"a": True, "b": False}), [112.5, -50])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_distance_and_front_properties_on_random_points(dtype):
    """For random fronts and points: d <= 0 iff a front point weakly dominates m; m - d lies on the boundary (some
    front point weakly dominates it, none dominates m - d + eps); d moves with a shift of m; members have d = 0;
    the mask equals the 2-D Pareto front of compare.stats on 2-D inputs."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        k, n = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        front = rng.normal(size=(n, k)).astype(dtype)
        m = rng.normal(size=k).astype(dtype)
        d = front_distance(m, front)
        dominated = bool((front >= m).all(axis=1).any())
        assert (d <= 0) == dominated
        eps = 1e-5 if dtype == np.float32 else 1e-12
        assert (front >= m.astype(np.float64) - d - eps).all(axis=1).any()
        assert not (front > m.astype(np.float64) - d + eps).all(axis=1).any()
        assert front_distance(m.astype(np.float64) + 0.25, front) == pytest.approx(d + 0.25, abs=1e-6)
        mask = non_dominated(front)
        assert mask.any() and all(front_distance(row, front) == pytest.approx(0.0, abs=0) for row in front[mask])
        if k == 2:
            assert mask.tolist() == pareto_front([tuple(map(float, p)) for p in front])


# ------------------------------------------------------------------------------------------ a real store

TASKS = ("y1", "y2")
# (weights, test y1/y2 AUROC, validation val_best/mean_auroc): S3 is the best on validation although S1
# dominates it on test, so the best static weights must be S3 (chosen on validation, never on test)
STATIC = {
    "S0": ((1.0, 0.0), (0.80, 0.50), 0.60),
    "S1": ((0.5, 0.5), (0.78, 0.78), 0.80),
    "S2": ((0.0, 1.0), (0.50, 0.80), 0.62),
    "S3": ((0.75, 0.25), (0.77, 0.77), 0.85),
}


def log(
    client, exp_id, seed, loss, backbone, test, val, *, params=None, weights=(1.0, 1.0), parent=None, best="val_best"
) -> str:
    tags = {"data": "synthetic", "backbone": backbone, "loss": loss, "overrides": f"seed={seed}"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    p = {
        "data.seed": 0,
        "data.shuffle_seed": seed,
        **{f"data.tasks.{t}.kind": "binary" for t in TASKS},
        "seed": seed,
        "optimized_metric": "val/mean_auroc",
        "optimized_mode": "max",
        "backbone._target_": f"mtl_experiments.backbone.{backbone}.X",
        "loss._target_": f"mtl_experiments.loss.{loss}.X",
        **(params or {}),
    }
    now = int(time.time() * 1000)
    metrics = [Metric(f"test/{t}/auroc", v, now, 0) for t, v in zip(TASKS, test, strict=True)]
    metrics += [Metric(f"train/weight/{t}", w, now, 0) for t, w in zip(TASKS, weights, strict=True)]
    metrics.append(Metric("val_best/mean_auroc" if best == "val_best" else "best/val/mean_auroc", val, now, 0))
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in p.items()])
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_store):
    """Static runs (children of a sweep parent) in experiment ``front``; methods and single-task in ``methods``."""
    tmp = tmp_path_factory.mktemp("front")
    uri = fresh_store(empty_store, tmp / "store.db")
    client = MlflowClient(uri)
    front_exp = client.create_experiment("front", artifact_location=(tmp / "a").as_uri())
    methods_exp = client.create_experiment("methods", artifact_location=(tmp / "b").as_uri())
    parent = client.create_run(front_exp, tags={"mtl.role": "sweep_parent"}).info.run_id
    for seed in (0, 1):
        for i, (w, test, val) in enumerate(STATIC.values()):
            index = {"loss.weights.index": i}
            log(client, front_exp, seed, "fixed", "shared_bottom", test, val, params=index, weights=w, parent=parent)
        log(client, methods_exp, seed, "equal", "shared_bottom", (0.79, 0.79), 0.79)
        log(client, methods_exp, seed, "pcgrad", "shared_bottom", (0.70, 0.70 + 0.02 * seed), 0.70)
        log(client, methods_exp, seed, "equal", "single_task", (0.81, 0.81), 0.81)
    old_exp = client.create_experiment("old", artifact_location=(tmp / "c").as_uri())  # logged before val_best/
    old_parent = client.create_run(old_exp, tags={"mtl.role": "sweep_parent"}).info.run_id
    for i, (w, test, val) in enumerate(STATIC.values()):
        index = {"loss.weights.index": i}
        old = {"params": index, "weights": w, "parent": old_parent, "best": ""}
        log(client, old_exp, 0, "fixed", "shared_bottom", test, val, **old)
    log(client, old_exp, 0, "equal", "shared_bottom", (0.79, 0.79), 0.79, best="")
    return {"uri": uri, "parent": parent, "tmp": tmp, "old_parent": old_parent}


def test_front_best_static_on_validation_distances_and_delta_m(store):
    f = front_compare(load_runs(store["uri"], experiment="methods"), "front")
    by = {e.label: e for e in f.entries}
    assert f.keys == ["y1/auroc", "y2/auroc"] and f.selection_metric == "val/mean_auroc"
    assert f.best.label == "w=(0.75, 0.25)"  # S3: best on validation, dominated on test
    assert {e.label for e in f.role("front") if e.on_front} == {"w=(1.00, 0.00)", "w=(0.50, 0.50)", "w=(0.00, 1.00)"}
    # distances in % of the best static weights' values (0.77, 0.77)
    assert by["w=(0.75, 0.25)"].distance == pytest.approx(-100 * 0.01 / 0.77)  # S1 beats it by 0.01 on both
    equal, pcgrad, stl = by["shared_bottom/equal"], by["shared_bottom/pcgrad"], by["single_task/equal"]
    assert equal.distance == pytest.approx(100 * 0.01 / 0.77)  # beyond S1 by 0.01 on both metrics
    assert pcgrad.distance == pytest.approx(-100 * 0.07 / 0.77)  # mean (0.70, 0.71): S1 better by >= 0.07
    assert pcgrad.distance_runs == pytest.approx([-100 * 0.08 / 0.77, -100 * 0.06 / 0.77])
    assert stl.role == "single-task" and stl.distance == pytest.approx(100 * 0.03 / 0.77)
    assert equal.dm_best == pytest.approx([100 * 0.02 / 0.77] * 2)
    assert equal.group.delta_m_values == pytest.approx([100 * (0.79 - 0.81) / 0.81] * 2)  # vs single-task
    assert by["w=(0.75, 0.25)"].dm_best == pytest.approx([0.0, 0.0])


def test_front_reads_the_best_score_of_an_older_store(store):
    """Runs logged before the rename (``best/val/mean_auroc``): the best static weights are still chosen on it."""
    f = front_compare(load_runs(store["uri"], experiment="old"), store["old_parent"])
    assert f.best.label == "w=(0.75, 0.25)"


def test_cli_front_writes_the_report_table_and_plot(store, capsys):
    out = store["tmp"] / "out"
    assert main(["--tracking-uri", store["uri"], "--experiment", "methods", "--front", "front", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "**Best static weights** (chosen on validation: best mean `val_best/mean_auroc`): w=(0.75, 0.25)" in text
    assert "| shared_bottom/equal | method | 2 |" in text and "behind the front" in text
    table = pd.read_csv(out / "front.csv")
    assert sorted(table["role"].value_counts().items()) == [("front", 4), ("method", 2), ("single-task", 1)]
    assert table.loc[table["best_static"], "label"].tolist() == ["w=(0.75, 0.25)"]
    assert (out / "front.png").stat().st_size > 10_000
    # the same front from the sweep's parent run id, and from the whole store without naming it
    for args in (["--experiment", "methods", "--front", store["parent"]], ["--front"]):
        assert main(["--tracking-uri", store["uri"], *args]) == 0
        assert "w=(0.75, 0.25) (n=2)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "methods", "--front"], "--front found no FINISHED static-weight runs (loss=fixed)"),
        (["--front", "--pareto", "y1/auroc,y3/auroc"], "--pareto takes two of"),
    ],
)
def test_cli_front_errors_are_one_line(store, capsys, args, message):
    assert main(["--tracking-uri", store["uri"], *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_front_refuses_log_to_parent(store, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--tracking-uri", store["uri"], "--front", "--latest-sweep", "--log-to-parent"])
    assert info.value.code == 2 and "--log-to-parent is not available with --front" in capsys.readouterr().err
