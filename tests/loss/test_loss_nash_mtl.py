"""Nash-MTL (Navon et al. 2022) against hand-computed bargaining solutions, its norm cap and schedule; config errors."""

from __future__ import annotations

import logging
import math

import pytest

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.nash_mtl import NashMTL, nash_weights
from tests.loss.helpers import f64 as t
from tests.loss.helpers import method, random_g, with_yaml_defaults


def test_yaml_instantiates_with_the_papers_defaults():
    w = with_yaml_defaults("nash_mtl", NashMTL)
    assert (w.max_norm, w.update_weights_every) == (1.0, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_norm": -1.0}, "loss.max_norm must be a finite number >= 0"),
        ({"update_weights_every": 0}, "loss.update_weights_every must be an integer >= 1"),
        ({"update_weights_every": 1.5}, "loss.update_weights_every must be an integer >= 1"),
    ],
)
def test_bad_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        NashMTL(**overrides)  # raised by the constructor; pipeline.build unwraps Hydra's InstantiationException


def test_nash_mtl_orthogonal_gradients_get_inverse_norms():
    g = t([[2, 0, 0], [0, 0.5, 0]])
    update, alpha = method("nash_mtl", max_norm=0.0).aggregate(g)
    # α_t = 1/|g_t| (to the documented 1e-10 ridge)
    assert alpha.tolist() == pytest.approx([0.5, 2.0], rel=1e-9)
    assert update.tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-9)


def test_nash_mtl_solves_the_bargaining_equations_by_hand():
    # Gram = [[1, 1], [1, 2]]: α1(α1 + α2) = 1 and α2(α1 + 2α2) = 1 give α1² = 2α2², α2 = 1/√(2 + √2)
    g = t([[1, 0], [1, 1]])
    _, alpha = method("nash_mtl", max_norm=0.0).aggregate(g)
    a2 = 1 / math.sqrt(2 + math.sqrt(2))
    assert alpha.tolist() == pytest.approx([math.sqrt(2) * a2, a2], abs=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_nash_mtl_residual_on_random_gradients(seed):
    g = random_g(seed, (4, 10)) * t([[1e-3], [1.0], [10.0], [1e2]])  # norms over five orders of magnitude
    gram = g @ g.T
    alpha = nash_weights(gram)
    assert (alpha > 0).all()
    assert ((alpha * (gram @ alpha)) - 1).abs().max() < 1e-6  # α_t·(GGᵀα)_t = 1, i.e. GGᵀα = 1/α


def test_nash_mtl_max_norm_caps_the_update():
    g = t([[2, 0, 0], [0, 0.5, 0]])
    update, alpha = method("nash_mtl").aggregate(g)  # uncapped |(1, 1, 0)| = √2 > max_norm = 1
    assert update.norm().item() == pytest.approx(1.0)
    assert alpha.tolist() == pytest.approx([0.5 / math.sqrt(2), 2 / math.sqrt(2)], rel=1e-9)


def test_nash_mtl_update_weights_every_reuses_alpha_and_resumes():
    g1, g2, g3 = t([[2, 0], [0, 0.5]]), t([[1, 0], [0, 1]]), t([[1, 0], [1, 1]])
    nash = method("nash_mtl", max_norm=0.0, update_weights_every=2)
    nash.aggregate(g1)
    resumed = method("nash_mtl", max_norm=0.0, update_weights_every=2)
    resumed.load_state_dict(nash.state_dict())
    for w in (nash, resumed):
        update, alpha = w.aggregate(g2)  # step 2: α from step 1 applied to the new gradients
        assert alpha.tolist() == pytest.approx([0.5, 2.0]) and update.tolist() == pytest.approx([0.5, 2.0])
        _, alpha = w.aggregate(g3)  # step 3: recomputed
        a2 = 1 / math.sqrt(2 + math.sqrt(2))
        assert alpha.tolist() == pytest.approx([math.sqrt(2) * a2, a2], abs=1e-8)


def test_nash_mtl_zero_gradient_task_gets_zero_weight():
    _, alpha = method("nash_mtl", max_norm=0.0).aggregate(t([[2, 0], [0, 0]]))
    assert alpha.tolist() == pytest.approx([0.5, 0.0])


def test_nash_mtl_opposite_gradients_log_the_zero_update_they_apply(caplog):
    """Issue 14: with g_2 = -g_1 the gradients' hull holds 0 (Pareto-stationary): the equations have no positive
    solution and the 1e-10 ridge gave α ≈ (1.16e5, 1.16e5), an update of 0 logged as weights of 1.16e5. What is
    applied is the update 0: α = 0, logged as a fallback with one warning."""
    w = method("nash_mtl")
    g = t([[1, 2, 0], [-1, -2, 0]])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            update, alpha = w.aggregate(g)
            assert update.tolist() == [0.0, 0.0, 0.0] and alpha.tolist() == [0.0, 0.0]
    assert w.log_values()["weighting/fallback"] == 1 and w.log_values()["weighting/converged"] == 1
    assert sum("Pareto-stationary" in r.getMessage() for r in caplog.records) == 1  # warned once
    w.aggregate(t([[1, 0, 0], [0, 1, 0]]))
    assert w.log_values()["weighting/fallback"] == 0
