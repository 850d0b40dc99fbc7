"""GradDrop (Chen et al. 2020) against hand-computed cases; reproducibility and RNG isolation; the
representation variant; config errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.graddrop import GradDrop, sign_dropout
from tests.loss.helpers import F64 as D
from tests.loss.helpers import THREE, TWO, method, random_g, with_yaml_defaults
from tests.loss.helpers import f64 as t


def test_yaml_instantiates_with_the_papers_defaults():
    with_yaml_defaults("graddrop", GradDrop)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seed": 1.5}, "loss.seed must be an integer >= 0"),
    ],
)
def test_bad_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        GradDrop(**overrides)  # raised by the constructor; pipeline.build unwraps Hydra's InstantiationException


@pytest.mark.parametrize(
    ("leak", "message"),
    [
        ({"clicks": 1.0}, r"loss.leak names unknown task\(s\) \['clicks'\]"),
        ({"a": 2.0}, r"loss.leak.a must be a number in \[0, 1\]"),
    ],
)
def test_graddrop_rejects_bad_leaks(leak, message):
    with pytest.raises(ConfigError, match=message):
        method("graddrop", leak=leak)


def test_graddrop_keeps_sign_consistent_components_whatever_the_draw():
    g = t([[1, -2, 3], [2, -1, 0.5]])
    for seed in range(5):
        update, _ = method("graddrop", seed=seed).aggregate(g)
        assert update.tolist() == pytest.approx([3.0, -3.0, 3.5], abs=1e-12)


def test_sign_dropout_by_hand():
    # column 0: (+3, -1) -> P = (1 + 2/4)/2 = 0.75 > U = 0.5: the positive sign survives -> 3
    # column 1: same P = 0.75 < U = 0.9: the negative sign survives -> -1
    # column 2: (+2, 0) -> P = 1: the positive survives, a zero gradient has no sign -> 2
    g = t([[3, 3, 2], [-1, -1, 0]])
    out = sign_dropout(g.unsqueeze(1), g, t([0, 0]), t([0.5, 0.9, 0.99]))[0]
    assert out.tolist() == [3.0, -1.0, 2.0]
    # leak = 1 lets task a through unchanged; task b's -1 survives only where the negative sign is drawn
    out = sign_dropout(g.unsqueeze(1), g, t([1, 0]), t([0.5, 0.9, 0.99]))[0]
    assert out.tolist() == [3.0, 2.0, 2.0]


def test_graddrop_keeps_the_positive_sign_with_probability_p():
    g = t([[3.0], [-1.0]]).repeat(1, 20000)  # P = 0.75 in every column
    update, _ = method("graddrop").aggregate(g)
    assert set(update.tolist()) == {3.0, -1.0}  # exactly one sign survives per element
    assert (update == 3.0).double().mean().item() == pytest.approx(0.75, abs=0.02)  # 7 binomial std


def test_graddrop_is_reproducible_and_isolated_from_the_global_rng():
    g = random_g(3, (3, 50))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    w = method("graddrop", THREE)
    first = [w.aggregate(g)[0] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be consumed or reseeded"
    assert not torch.equal(first[0], first[1]), "fresh U every step"
    torch.manual_seed(2)
    w = method("graddrop", THREE)
    assert all(torch.equal(w.aggregate(g)[0], want) for want in first)


def test_graddrop_on_the_representation_uses_the_sign_of_a_and_the_batch_sum():
    # A = x·W for a batch of 2, x = (2, -1), W = 1: A = (2, -1). Per-example gradients at A:
    # task a: (0, -2) -> Σ_batch sign(A)·∇ = 0 + 2 = +2; task b: (1, 1) -> 1 - 1 = 0 (no sign: dropped).
    # P = (1 + 2/2)/2 = 1, so task a survives for every draw. Without the sign(A) correction task a's
    # batch sum would be -2, in conflict with b's +2, and the result would depend on the draw.
    x = t([[2.0], [-1.0]])
    for seed in range(4):
        weight = torch.ones(1, 1, dtype=D, requires_grad=True)
        heads = [torch.ones((), dtype=D, requires_grad=True) for _ in range(2)]
        rep = x @ weight
        losses = torch.stack([(heads[0] * t([0, -2]) * rep[:, 0]).sum(), (heads[1] * t([1, 1]) * rep[:, 0]).sum()])
        model = SimpleNamespace(backbone=SimpleNamespace(representation=rep, has_representation=True))
        gd = GradDrop(grad_source="representation", seed=seed)
        gd.setup(TWO, model)
        grads = task_gradients(losses, gd.task_grad_inputs(model))
        weights = gd.backward(losses, grads, [weight], lambda total, exclude=(): total.backward())
        assert weights.shape == (2,) and torch.isfinite(weights).all()
        # only task a's gradient reaches W: Σ_b (0, -2)_b·x_b = 2 (the plain sum would give 3)
        assert weight.grad.item() == pytest.approx(2.0, abs=1e-12)
        # heads get their own task's gradient: Σ_b c_b·A_b
        assert heads[0].grad.item() == pytest.approx(2.0) and heads[1].grad.item() == pytest.approx(1.0)
