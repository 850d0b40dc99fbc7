"""RLW (Lin et al. 2022): the draws, their scale, reproducibility, RNG isolation, resume, config errors."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from omegaconf import OmegaConf

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.rlw import RLW
from tests.conftest import CONF
from tests.loss.helpers import CTR_CVR_WATCH, method

weighting = functools.partial(method, tasks=CTR_CVR_WATCH)


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
