"""SDMGrad (Xiao et al., NeurIPS 2023) against hand-computed cases, its dual's solution, TorchJD's SDMGradWeighting on
random inputs, and resume; config errors."""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import SDMGradWeighting

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.sdmgrad import SDMGrad, project_onto_simplex
from tests.loss.helpers import THREE, ill_conditioned, method, random_g, with_yaml_defaults
from tests.loss.helpers import f64 as t


def test_yaml_instantiates_with_the_authors_defaults():
    w = with_yaml_defaults("sdmgrad", SDMGrad)
    assert (w.lamda, w.lr, w.momentum, w.iterations) == (0.3, 10.0, 0.5, 20)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lamda": -0.1}, "loss.lamda must be a finite number >= 0"),
        ({"lr": 0}, "loss.lr must be a finite number > 0"),
        ({"momentum": 1.0}, r"loss.momentum must be a number in \[0, 1\)"),
        ({"iterations": 0}, "loss.iterations must be an integer >= 1"),
    ],
)
def test_bad_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        SDMGrad(**overrides)


def test_simplex_projection():
    assert project_onto_simplex(t([0.2, 0.3])).tolist() == pytest.approx([0.45, 0.55])
    assert project_onto_simplex(t([-2.0, 3.0, 0.5])).tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_one_inner_step_by_hand():
    # G = diag(1, 2): Gramian diag(1, 4) / (mean norm 1.5)² = diag(4/9, 16/9); w = (½, ½), λ/T = 0.15:
    # grad = a(w + 0.15) = (2.6/9, 10.4/9); w − 0.1·grad = (½ − 0.26/9, ½ − 1.04/9), + 0.65/9 each onto the simplex
    sdm = method("sdmgrad", lr=0.1, iterations=1)
    update, weights = sdm.aggregate(t([[1, 0], [0, 2]]))
    w = [0.5 + 0.39 / 9, 0.5 - 0.39 / 9]
    assert sdm.w.tolist() == pytest.approx(w, abs=1e-12)
    expected = [2 * (wi + 0.15) / 1.3 for wi in w]  # T·(w + λ/T)/(1 + λ)
    assert weights.tolist() == pytest.approx(expected, abs=1e-12)
    assert update.tolist() == pytest.approx([expected[0], 2 * expected[1]], abs=1e-12)


def test_converges_to_the_dual_solution():
    # min over w1 of (w1 + 0.15)² + 4(1.15 − w1)²: w1 = 0.89, weights 2·(0.89 + 0.15, 0.11 + 0.15)/1.3 = (1.6, 0.4)
    sdm = method("sdmgrad", lr=0.2, momentum=0.0, iterations=3000)
    update, weights = sdm.aggregate(t([[1, 0], [0, 2]]))
    assert weights.tolist() == pytest.approx([1.6, 0.4], abs=1e-9)
    assert update.tolist() == pytest.approx([1.6, 0.8], abs=1e-9)


def test_large_lamda_is_equal_weighting_and_zero_gradients_give_zero():
    _, weights = method("sdmgrad", lamda=1e12).aggregate(random_g(0, (2, 6)))
    assert weights.tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    update, weights = method("sdmgrad").aggregate(torch.zeros(2, 4))
    assert update.tolist() == [0.0] * 4 and weights.tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("lamda", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("seed", range(3))
def test_matches_torchjd_over_consecutive_steps(seed, lamda):
    ours, theirs = method("sdmgrad", THREE, lamda=lamda), SDMGradWeighting(lambda_=lamda)
    for step in range(4):  # w is warm-started from the previous step in both
        g = random_g(10 * seed + step, (3, 7)) if step % 2 else ill_conditioned(10 * seed + step, 3, 7)
        _, weights = ours.aggregate(g)
        # both divide the Gramian by the squared mean norm, TorchJD by that + 1e-8, which changes its inner steps for
        # small gradients (and lr 10 amplifies any difference): it gets the Gramian scaled so that its mean squared
        # norm is 1e9, where + 1e-8 is below float64's rounding (the scale itself does not change the weights)
        gram = g @ g.T
        torch.testing.assert_close(weights / 3, theirs(1e9 * gram / gram.diagonal().sqrt().mean() ** 2))


def test_resumes_its_weights_from_a_checkpoint():
    gs = [random_g(s, (3, 5)) for s in range(6)]
    reference = method("sdmgrad", THREE)
    expected = [reference.aggregate(g)[0] for g in gs]
    before = method("sdmgrad", THREE)
    for g in gs[:3]:
        before.aggregate(g)
    resumed = method("sdmgrad", THREE)
    resumed.load_state_dict(before.state_dict())
    for g, want in zip(gs[3:], expected[3:], strict=True):
        assert torch.equal(resumed.aggregate(g)[0], want)
