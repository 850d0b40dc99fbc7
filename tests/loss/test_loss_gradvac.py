"""GradVac (Wang et al. 2021) against hand-computed cases; its targets, granularity and resume; config errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.gradvac import GradVac
from tests.loss.helpers import THREE, TWO, method, random_g, with_yaml_defaults
from tests.loss.helpers import f64 as t


def test_yaml_instantiates_with_the_papers_defaults():
    w = with_yaml_defaults("gradvac", GradVac)
    assert (w.beta, w.granularity) == (0.5, "whole_model")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta": 1.5}, r"loss.beta must be a number in \[0, 1\]"),
        ({"granularity": "all_layer"}, "loss.granularity must be one of"),
        ({"seed": -1}, "loss.seed must be an integer >= 0"),
    ],
)
def test_bad_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GradVac(**overrides)  # raised by the constructor; pipeline.build unwraps Hydra's InstantiationException


def test_gradvac_first_step_is_pcgrad_and_updates_the_targets():
    gv = method("gradvac")
    update, weights = gv.aggregate(t([[1, 0], [-1, 1]]))
    assert update.tolist() == pytest.approx([0.5, 1.5], abs=1e-12)  # targets start at 0: PCGrad
    assert weights.tolist() == pytest.approx([2.0, 1.5], abs=1e-12)
    # φ̂ <- (1 - β)·0 + β·cos(g1, g2), cos = -1/√2, β = 0.5
    assert gv.phi_hat[0].flatten().tolist() == pytest.approx(
        [0, -0.5 / math.sqrt(2), -0.5 / math.sqrt(2), 0], abs=1e-12
    )


def test_gradvac_raises_the_cosine_to_its_target():
    gv = method("gradvac")
    gv.phi_hat.copy_(t([[[0, 0.5], [0.5, 0]]]))
    update, _ = gv.aggregate(t([[1, 0], [0, 1]]))
    # φ = 0 < 0.5: g1' = g1 + |g1|(0.5·1 - 0·√0.75)/(|g2|·√0.75)·g2 = (1, 1/√3), whose cosine with g2 is 0.5;
    # symmetrically g2' = (1/√3, 1)
    assert update.tolist() == pytest.approx([1 + 1 / math.sqrt(3)] * 2, abs=1e-12)
    assert gv.phi_hat[0, 0, 1].item() == pytest.approx(0.25)  # (1 - 0.5)·0.5 + 0.5·0


def test_gradvac_leaves_gradients_above_their_target_untouched():
    update, _ = method("gradvac").aggregate(t([[1, 0], [1, 1]]))  # cos = 1/√2 > 0 = target
    assert update.tolist() == pytest.approx([2.0, 1.0], abs=1e-12)


def test_gradvac_all_matrix_treats_each_parameter_tensor_on_its_own():
    model = SimpleNamespace(shared_parameters=lambda: [torch.zeros(2), torch.zeros(1, 2)])
    gv = GradVac(granularity="all_matrix")
    gv.setup(TWO, model)
    assert gv.phi_hat.shape == (2, 2, 2)
    # component 1 conflicts (PCGrad: (0.5, 1.5)); component 2 does not (sum: (2, 1))
    update, weights = gv.aggregate(t([[1, 0, 1, 0], [-1, 1, 1, 1]]))
    assert update.tolist() == pytest.approx([0.5, 1.5, 2.0, 1.0], abs=1e-12)
    assert gv.phi_hat[1, 0, 1].item() == pytest.approx(0.5 / math.sqrt(2))  # β·cos((1,0), (1,1))


def test_gradvac_resumes_targets_and_order_from_a_checkpoint():
    gs = [random_g(s, (3, 5)) for s in range(6)]
    reference = method("gradvac", THREE)
    expected = [reference.aggregate(g)[0] for g in gs]
    before = method("gradvac", THREE)
    for g in gs[:3]:
        before.aggregate(g)
    resumed = method("gradvac", THREE, seed=99)  # a fresh module: state and generator come from the checkpoint
    resumed.load_state_dict(before.state_dict())
    for g, want in zip(gs[3:], expected[3:], strict=True):
        assert torch.equal(resumed.aggregate(g)[0], want)
