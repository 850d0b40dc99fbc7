"""The simplex points of ``hparams_search=scalarization`` (mtl_experiments/loss/simplex.py), their use by
``loss=fixed``, and the grid sampler that runs every (point, seed) once (mtl_experiments/grid_sampler.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, IntDistribution

from mtl_experiments.errors import ConfigError
from mtl_experiments.grid_sampler import EveryCombination
from mtl_experiments.loss.fixed import Fixed
from mtl_experiments.loss.simplex import SimplexPoint, lattice, triangular_steps
from mtl_experiments.pipeline import build
from mtl_experiments.tasks import build_task
from tests.conftest import compose_cfg


def tasks(*names):
    return {n: build_task(n, {"kind": "binary"}) for n in names}


def test_hand_computed_points_for_two_three_and_four_tasks():
    two = [SimplexPoint(i, points=5).for_tasks(["a", "b"]) for i in range(5)]
    assert [(w["a"], w["b"]) for w in two] == [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    three = [tuple(SimplexPoint(i, points=6).for_tasks(["a", "b", "c"]).values()) for i in range(6)]
    assert three == [(1, 0, 0), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 1, 0), (0, 0.5, 0.5), (0, 0, 1)]
    four = SimplexPoint(0, points=4).for_tasks(["a", "b", "c", "d"])
    assert four == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}  # the centre first, then Dirichlet samples
    assert triangular_steps(10) == 3 and triangular_steps(11) is None


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_point_set_lies_on_the_simplex_without_repeats(dtype):
    """Many random (T, points, seed, alpha): w >= 0, Σw = 1 (also after a float32 cast), no two points equal;
    the lattices hold every vertex and C(n+T-1, T-1) points."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = int(rng.integers(2, 9))
        points = int(rng.choice([3, 6, 10, 15])) if t == 3 else int(rng.integers(2, 25))
        sp = SimplexPoint(0, points=points, seed=int(rng.integers(0, 1000)), alpha=float(rng.uniform(0.2, 3.0)))
        w = sp.all_points(t).astype(dtype)
        assert w.shape == (points, t) and (w >= 0).all()
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-12)
        assert len({tuple(row) for row in w.tolist()}) == points
        if t <= 3:
            assert {tuple(r) for r in np.eye(t).tolist()} <= {tuple(r) for r in w.tolist()}
            steps = points - 1 if t == 2 else triangular_steps(points)
            assert len(lattice(t, steps)) == math.comb(steps + t - 1, t - 1) == points


def test_dirichlet_points_are_reproducible_per_seed_and_independent_of_task_names():
    a = SimplexPoint(3, points=8, seed=1).for_tasks(["click", "like", "watch", "interest"])
    b = SimplexPoint(3, points=8, seed=1).for_tasks(["w", "x", "y", "z"])
    c = SimplexPoint(3, points=8, seed=2).for_tasks(["w", "x", "y", "z"])
    assert list(a.values()) == list(b.values()) != list(c.values())


@pytest.mark.parametrize(
    ("point", "names", "message"),
    [
        (SimplexPoint(5, points=5), ["a", "b"], "loss.weights.index must be < loss.weights.points = 5, got 5"),
        (SimplexPoint(0, points=11), ["a", "b", "c"], "loss.weights.points must be a triangular number"),
        (SimplexPoint(0, points=3), ["a"], "needs at least 2 tasks, got 1"),
    ],
)
def test_bad_points_fail_with_a_one_line_error(point, names, message):
    with pytest.raises(ConfigError, match=message):
        point.for_tasks(names)


@pytest.mark.parametrize(("key", "value"), [("index", -1), ("points", 1), ("alpha", 0.0), ("seed", 1.5)])
def test_bad_settings_fail_when_built(key, value):
    with pytest.raises(ConfigError, match=f"loss.weights.{key} must be"):
        SimplexPoint(**{"index": 0, key: value})


def test_fixed_resolves_a_simplex_point_against_its_tasks():
    loss = Fixed(weights=SimplexPoint(1, points=5))
    loss.setup(tasks("y1", "y2"))
    total, w = loss(torch.tensor([2.0, 4.0]))
    assert w.tolist() == [0.75, 0.25] and total.item() == pytest.approx(2.5)


def test_scalarization_config_gives_every_recsys_task_a_weight():
    """The shipped file with a 4-task dataset: every index resolves to Dirichlet weights over its tasks."""
    cfg = compose_cfg(["hparams_search=scalarization", "data=recsys_synthetic"])
    data_tasks = {name: build_task(name, spec) for name, spec in cfg.data.tasks.items()}
    seen = set()
    for index in range(cfg.loss.weights.points):
        OmegaConf.update(cfg, "loss.weights.index", index)
        loss = build(cfg, "loss")
        loss.setup(data_tasks)
        assert loss.w.sum().item() == pytest.approx(1.0) and len(loss.w) == len(data_tasks) == 4
        seen.add(tuple(loss.w.tolist()))
    assert len(seen) == cfg.loss.weights.points


def test_every_combination_runs_each_grid_point_once_and_never_stops_the_study():
    """Ask and tell as the sweeper does: 5 points × 3 seeds = 15 distinct trials; the last tell does not raise
    (Optuna's BruteForceSampler calls study.stop(), which raises outside study.optimize)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=EveryCombination(seed=0), direction="maximize")
    space = {"loss.weights.index": IntDistribution(0, 4), "seed": CategoricalDistribution([0, 1, 2])}
    seen = []
    for _ in range(15):
        trial = study.ask(space)
        seen.append((trial.params["loss.weights.index"], trial.params["seed"]))
        study.tell(trial, 0.5)
    assert sorted(seen) == sorted(itertools.product(range(5), [0, 1, 2]))
