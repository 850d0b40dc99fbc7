"""GLS (Chennupati et al. 2019) and RLW (Lin et al. 2022) against hand-computed cases."""

from __future__ import annotations

import io
import math

import pytest
import torch
from omegaconf import OmegaConf

from mtl_experiments.errors import ConfigError, NonFiniteLossError
from mtl_experiments.loss.rlw import RLW
from mtl_experiments.tasks import build_tasks
from tests.conftest import CONF, load_weighting

TASKS = build_tasks({"ctr": {"kind": "binary"}, "cvr": {"kind": "binary"}, "watch": {"kind": "regression"}})


def weighting(name: str, **overrides):
    return load_weighting(name, TASKS, **overrides)


# -- GLS --------------------------------------------------------------------------------------------
def test_gls_total_and_weights_by_hand():
    losses = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    total, weights = weighting("gls")(losses)
    assert total.item() == pytest.approx(2.0, abs=1e-12)  # (1 * 4 * 2)^(1/3)
    # total / (T * L_t) = 2/3, 2/12, 2/6
    assert weights.tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 3], abs=1e-12)
    assert not weights.requires_grad


def test_gls_gradient_is_the_weighted_sum_of_task_gradients():
    def problem():
        torch.manual_seed(0)
        theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
        losses = torch.stack([(theta**2).sum(), (theta - 1).abs().sum(), (theta * 3).sin().sum() + 6])
        return theta, losses

    theta, losses = problem()
    weights = weighting("gls").backward(losses, None, [theta], lambda total: total.backward())
    # the weights by the product formula (not the log-space code): (Π L)^(1/T) / (T·L_t)
    values = [v.item() for v in losses]
    geo = math.prod(values) ** (1 / 3)
    expected_w = [geo / (3 * v) for v in values]
    assert weights.tolist() == pytest.approx(expected_w, rel=1e-12)
    theta2, losses2 = problem()
    task_grads = [torch.autograd.grad(loss, theta2, retain_graph=True)[0] for loss in losses2]
    expected = sum(w * g for w, g in zip(expected_w, task_grads, strict=True))
    assert torch.allclose(theta.grad, expected, rtol=1e-10, atol=1e-12)


def test_gls_is_computed_in_log_space():
    # the float32 product of 20 losses of 1e-30 underflows to 0; their geometric mean is 1e-30
    losses = torch.full((20,), 1e-30)
    assert torch.prod(losses).item() == 0.0
    gls = weighting("gls")
    total, weights = gls(losses)
    assert total.item() == pytest.approx(1e-30, rel=1e-4)
    assert weights.tolist() == pytest.approx([1 / 20] * 20, rel=1e-4)


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_gls_rejects_a_loss_that_is_not_positive(bad):
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \{'cvr': " + str(bad) + r"\} have a loss <= 0"):
        weighting("gls")(torch.tensor([1.0, bad, 2.0]))


# -- RLW --------------------------------------------------------------------------------------------
LOSSES = torch.tensor([1.0, 2.0, 3.0])


def test_rlw_weights_are_a_softmax_of_standard_normal_draws():
    w = weighting("rlw", seed=7)
    reference = torch.Generator().manual_seed(7)
    for _ in range(3):  # consecutive steps continue the same stream
        total, weights = w(LOSSES)
        z = torch.randn(3, generator=reference)
        expected = torch.exp(z) / torch.exp(z).sum()
        assert torch.allclose(weights, expected, atol=1e-7)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert total.item() == pytest.approx((expected * LOSSES).sum().item(), rel=1e-6)


def test_rlw_num_tasks_scale_sums_to_t():
    plain, scaled = weighting("rlw", seed=7), weighting("rlw", seed=7, scale="num_tasks")
    for _ in range(3):
        p, s = plain(LOSSES)[1], scaled(LOSSES)[1]
        assert torch.allclose(s, 3 * p)
        assert s.sum().item() == pytest.approx(3.0, abs=1e-5)


def test_rlw_weights_differ_between_steps_and_are_reproducible_for_a_seed():
    w1, w2, other = weighting("rlw", seed=1), weighting("rlw", seed=1), weighting("rlw", seed=2)
    seq1 = [w1(LOSSES)[1] for _ in range(5)]
    seq2 = [w2(LOSSES)[1] for _ in range(5)]
    seq_other = [other(LOSSES)[1] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(seq1, seq2, strict=True))
    assert all(not torch.allclose(seq1[i], seq1[i + 1]) for i in range(4))
    assert not torch.allclose(seq1[0], seq_other[0])


def test_rlw_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    w = weighting("rlw", seed=3)
    w(LOSSES)
    assert torch.equal(torch.get_rng_state(), state)


def test_rlw_generator_state_survives_a_checkpoint():
    w = weighting("rlw", seed=3)
    w(LOSSES)
    w(LOSSES)
    buffer = io.BytesIO()
    torch.save(w.state_dict(), buffer)  # what a Lightning checkpoint holds for the weighting
    following = [w(LOSSES)[1] for _ in range(3)]
    resumed = weighting("rlw", seed=99)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert all(torch.equal(resumed(LOSSES)[1], x) for x in following)


def test_rlw_null_seed_is_the_seed_torch_was_seeded_with():
    """Used directly with seed=None, RLW takes the seed torch was seeded with; the YAML passes ${seed}."""
    assert OmegaConf.to_container(OmegaConf.load(CONF / "loss" / "rlw.yaml"))["seed"] == "${seed}"
    with torch.random.fork_rng():
        torch.manual_seed(11)
        w = RLW(seed=None)
    assert w.seed == 11
    assert torch.equal(w(LOSSES)[1], RLW(seed=11)(LOSSES)[1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scale": "mean"}, r"loss.scale must be one of \['sum_to_one', 'num_tasks'\]"),
        ({"seed": -1}, "loss.seed must be an integer >= 0 or null"),
        ({"seed": "abc"}, "loss.seed must be an integer >= 0 or null"),
    ],
)
def test_rlw_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RLW(**overrides)  # raised by the constructor; pipeline.build unwraps Hydra's InstantiationException
