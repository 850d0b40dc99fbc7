"""MoCo (Fernando et al., ICLR 2023) against hand-computed steps; its state across steps and resume; config errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.moco import MoCo
from tests.loss.helpers import THREE, TWO, method, random_g, with_yaml_defaults
from tests.loss.helpers import f64 as t


def test_yaml_instantiates_with_libmtls_defaults():
    w = with_yaml_defaults("moco", MoCo)
    assert (w.beta, w.beta_sigma, w.gamma, w.gamma_sigma, w.rho) == (0.5, 0.5, 0.1, 0.5, 0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta": 0.0}, r"loss.beta must be a number in \(0, 1\]"),
        ({"gamma": 0}, "loss.gamma must be a finite number > 0"),
        ({"rho": -1}, "loss.rho must be a finite number >= 0"),
        ({"beta_sigma": -0.5}, "loss.beta_sigma must be a finite number >= 0"),
    ],
)
def test_bad_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MoCo(**overrides)


def test_representation_gradients_are_refused():
    with pytest.raises(ConfigError, match="loss.grad_source"):
        method("moco", grad_source="representation")


def test_two_steps_by_hand():
    moco = method("moco")
    g = t([[1, 0], [0, 2]])
    # step 1: Y = 0 − 0.5·(0 − G) = G/2, YYᵀ = diag(¼, 1); λ − 0.1·(⅛, ½) = (0.4875, 0.45) → simplex (0.51875, 0.48125)
    update, weights = moco.aggregate(g)
    assert moco.lam.tolist() == pytest.approx([0.51875, 0.48125], abs=1e-12)
    assert weights.tolist() == pytest.approx([1.0375, 0.9625], abs=1e-12)  # T·λ
    assert update.tolist() == pytest.approx([1.0375 * 0.5, 0.9625 * 1.0], abs=1e-12)  # T·Yᵀλ
    # step 2 (β = γ·5 = 0.5/√2, γ = 0.1/√2): Y = G/2 + (0.5/√2)(G − G/2) = c·G; λ ← proj(λ − (0.1/√2)·c²·diag(1, 4)λ)
    c = 0.5 + 0.25 / math.sqrt(2)
    lam = torch.tensor([0.51875, 0.48125], dtype=torch.float64)
    step = lam - 0.1 / math.sqrt(2) * c**2 * torch.tensor([1.0, 4.0], dtype=torch.float64) * lam
    lam = step + (1 - step.sum()) / 2  # both stay positive: the projection shifts them equally
    update, weights = moco.aggregate(g)
    torch.testing.assert_close(moco.y, c * g, rtol=0, atol=1e-12)
    assert weights.tolist() == pytest.approx((2 * lam).tolist(), abs=1e-12)
    assert update.tolist() == pytest.approx((2 * lam @ (c * g)).tolist(), abs=1e-12)
    assert int(moco.steps) == 2


def test_tracked_gradients_follow_a_constant_gradient_and_zero_gives_zero():
    moco = method("moco", THREE, beta_sigma=0.0)
    g = random_g(0, (3, 4))
    for _ in range(60):
        moco.aggregate(g)
    assert torch.allclose(moco.y, g, atol=1e-12)  # Y − G halves every step
    update, weights = method("moco").aggregate(torch.zeros(2, 3))
    assert update.tolist() == [0.0] * 3 and weights.tolist() == [1.0, 1.0]


def test_state_is_sized_by_the_shared_parameters_and_resumes():
    model = SimpleNamespace(shared_parameters=lambda: [torch.zeros(2), torch.zeros(1, 3)])
    moco = MoCo()
    moco.setup(THREE, model)
    assert moco.y.shape == (3, 5)
    gs = [random_g(s, (3, 5)) for s in range(6)]
    expected = [moco.aggregate(g)[0] for g in gs]
    before = method("moco", THREE)  # setup without a model: Y is sized at the first step
    for g in gs[:3]:
        before.aggregate(g)
    resumed = method("moco", THREE)  # a fresh module with an unsized Y takes the checkpoint's
    resumed.load_state_dict(before.state_dict())
    for g, want in zip(gs[3:], expected[3:], strict=True):
        assert torch.equal(resumed.aggregate(g)[0], want)
    assert set(before.state_dict()) == {"y", "lam", "steps"}
    assert set(method("moco", TWO).log_values()) == {"moco/lambda/a", "moco/lambda/b"}
