"""CAGrad (Liu et al. 2021) against hand-computed and closed-form cases, a brute force over the ball; config errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.cagrad import CAGrad
from tests.loss.helpers import F64 as D
from tests.loss.helpers import THREE, method, random_g, with_yaml_defaults
from tests.loss.helpers import f64 as t


def test_yaml_instantiates_with_the_papers_defaults():
    w = with_yaml_defaults("cagrad", CAGrad)
    assert (w.c, w.rescale) == (0.4, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"c": -0.1}, "loss.c must be a finite number >= 0"),
        ({"rescale": 3}, r"loss.rescale must be an integer in \[0, 2\]"),
        ({"rescale": True}, r"loss.rescale must be an integer in \[0, 2\]"),
    ],
)
def test_bad_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CAGrad(**overrides)  # raised by the constructor; pipeline.build unwraps Hydra's InstantiationException


G_CONFLICT = t([[1, 0], [-1, 1]])  # g0 = (0, 0.5), |g0| = 0.5


def test_cagrad_with_c_zero_is_equal_weighting():
    g = random_g(1)
    update, weights = method("cagrad", c=0.0).aggregate(g)
    assert weights.tolist() == pytest.approx([1.0] * 3, abs=1e-12)
    assert torch.allclose(update, g.sum(0))


def test_cagrad_boundary_solution_by_hand():
    # c = 0.4, w = (p, 1-p): F(p) = g_w·g0 + 0.2|g_w| = 0.5(1-p) + 0.2√(5p²-6p+2) decreases on [0, 1]
    # (F'(1) = -0.5 + 0.2·2 < 0), so w* = (1, 0), g_w = g1 and d = g0 + (0.2/1)·g1 = (0.2, 0.5).
    # The update is T·d = (0.4, 1.0) = 1.4·g1 + 1.0·g2; rescale=1 divides by 1 + c² = 1.16.
    update, weights = method("cagrad", rescale=0).aggregate(G_CONFLICT)
    assert update.tolist() == pytest.approx([0.4, 1.0], abs=1e-9)
    assert weights.tolist() == pytest.approx([1.4, 1.0], abs=1e-9)
    update, _ = method("cagrad").aggregate(G_CONFLICT)
    assert update.tolist() == pytest.approx([0.4 / 1.16, 1.0 / 1.16], abs=1e-9)
    update, _ = method("cagrad", rescale=2).aggregate(G_CONFLICT)
    assert update.tolist() == pytest.approx([0.4 / 1.4, 1.0 / 1.4], abs=1e-9)


def test_cagrad_interior_solution_by_closed_form():
    # c = 0.8: F'(p) = 0 <=> 0.8(5p - 3) = √(5p² - 6p + 2) <=> 11p² - 13.2p + 3.76 = 0, p > 0.6
    p = (13.2 + math.sqrt(8.8)) / 22
    g0 = G_CONFLICT.mean(0)
    gw = p * G_CONFLICT[0] + (1 - p) * G_CONFLICT[1]
    d = g0 + 0.8 * g0.norm() / gw.norm() * gw
    update, _ = method("cagrad", c=0.8, rescale=0).aggregate(G_CONFLICT)
    assert torch.allclose(update / 2, d, atol=1e-7)


@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
def test_cagrad_maximises_the_worst_improvement_within_the_ball(c):
    g = t([[1, 0], [-1, 1], [0.5, -0.2]])  # 0 is not in their convex hull
    g0 = g.mean(0)
    update, _ = method("cagrad", THREE, c=c, rescale=0).aggregate(g)
    d = update / 3
    radius = c * g0.norm()
    assert (d - g0).norm() <= radius + 1e-9  # the paper's constraint
    # brute force over the ball's boundary (the optimum of a concave min of linear functions lies there)
    angles = torch.linspace(0, 2 * math.pi, 200001, dtype=D)
    candidates = g0 + radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    best = (candidates @ g.T).min(dim=1).values.max()
    assert (g @ d).min() >= best - 1e-7


def test_cagrad_weights_do_not_depend_on_the_gradient_scale():
    g = random_g(2)
    _, w1 = method("cagrad", THREE).aggregate(g)
    _, w2 = method("cagrad", THREE).aggregate(1e-4 * g)
    assert torch.allclose(w1, w2, rtol=1e-6)


@pytest.mark.parametrize("c", [0.4, 0.5])
def test_cagrad_with_a_zero_gradient_reaches_worst_value_zero(c):
    """Issue 14: J = [[1, 0], [0, 0], [-1.2, 1]]; g_0 = (-1/15, 1/3). Task 2 always contributes g_2ᵀd = 0, so the
    best worst value is ≤ 0, and d = (0, 1/3) lies in the ball (‖d − g_0‖ = 1/15 ≤ c‖g_0‖ = 0.136 for c = 0.4) with
    g_1ᵀd = 0, g_3ᵀd = 1/3: the optimum is 0. The old code fell back to d = g_0 (worst value -1/15 = -0.0667)."""
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.2, 1.0]])
    w = method("cagrad", THREE, c=c, rescale=0)
    update, weights = w.aggregate(g)
    d = update.double() / 3
    g0 = g.double().mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-6)
    assert float((g.double() @ d).min()) >= -1e-7
    assert torch.isfinite(weights).all() and w.log_values()["weighting/fallback"] == 0
