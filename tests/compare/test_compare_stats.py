"""Statistics of the run comparison (mtl_experiments/compare/stats.py): Δm on hand-computed numbers, metric
directions from the task kinds, the Pareto front."""

from __future__ import annotations

import math

import pytest

from mtl_experiments import compare

# ----------------------------------------------------------------------------------------------- Δm


def test_delta_m_on_hand_computed_numbers():
    # auroc 0.80 -> 0.84 is +5 %, log loss 0.50 -> 0.45 is a 10 % improvement: Δm = (5 + 10) / 2 = +7.5
    dirs = {"y1/auroc": True, "y2/logloss": False}
    model = {"y1/auroc": 0.84, "y2/logloss": 0.45}
    base = {"y1/auroc": 0.80, "y2/logloss": 0.50}
    assert compare.delta_m(model, base, dirs) == pytest.approx(7.5)
    assert compare.delta_m(base, model, dirs) == pytest.approx(100 / 2 * (-0.04 / 0.84 - 0.05 / 0.45))  # worse on both
    assert compare.delta_m(base, base, dirs) == 0
    # lower-is-better worse: negative; only the keys of higher_is_better count (K = 1 here)
    assert compare.delta_m({"a/mse": 1.2, "b/x": 5}, {"a/mse": 1.0, "b/x": 1}, {"a/mse": False}) == pytest.approx(-20)
    assert math.isnan(compare.delta_m({"a/mse": 1.0}, {"a/mse": 0.0}, {"a/mse": False}))


def test_directions_come_from_the_task_kinds_metrics():
    dirs = compare.metric_directions()
    assert dirs["auroc"] is True and dirs["accuracy"] is True
    assert dirs["logloss"] is False and dirs["mse"] is False and dirs["mae"] is False
    assert compare.direction({"data.tasks.t.kind": "regression"}, "t/mse") is False
    # metrics a kind logs only with user ids (grouped AUC) and the ranking metrics of retrieval tasks
    assert compare.direction({"data.tasks.t.kind": "binary"}, "t/gauc") is True
    assert compare.direction({"data.tasks.t.kind": "retrieval"}, "t/ndcg_10") is True


def test_pareto_front_respects_directions():
    points = [(0.8, 0.7), (0.85, 0.6), (0.7, 0.65), (0.8, 0.7), (math.nan, 1.0)]
    assert compare.pareto_front(points, (True, True)) == [True, True, False, True, False]
    # y lower is better: (0.85, 0.6) dominates everything but the ties at x
    assert compare.pareto_front(points, (True, False)) == [False, True, False, False, False]
