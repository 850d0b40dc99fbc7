"""STCH (Lin et al., ICML 2024) against hand-computed totals and weights in its warm-up, after it (the authors'
log-normalised form) and with the running-minimum ideal point; its gradient against autograd of the formula; resume
and config errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.stch import STCH
from tests.loss.helpers import TWO as TASKS
from tests.loss.helpers import vec as t


def stch(**kwargs) -> STCH:
    w = STCH(**kwargs)
    w.setup(TASKS)
    return w


def warmed_up(**kwargs) -> STCH:
    """One warm-up epoch of two steps with losses (1, 4) and (3, 12): z = (2, 8)."""
    w = stch(warmup_epochs=1, **kwargs)
    w(t(1.0, 4.0))
    w(t(3.0, 12.0))
    w.on_train_epoch_end(0)
    return w


def test_stch_warmup_trains_the_log_losses():
    total, weights = stch()(t(1.0, 4.0))
    assert total.item() == pytest.approx(math.log(4.0))  # log 1 + log 4
    assert weights.tolist() == pytest.approx([1.0, 0.25])  # ∂ log L / ∂L = 1/L


def test_stch_after_warmup_by_hand():
    """z = (2, 8); losses (2, 16): f = (log 1, log 2) = (0, log 2); μ = 1, T = 2:
    total = 2·log(1 + 2) = 2 log 3, p = (1/3, 2/3), weights = 2·p_t/L_t = (1/3, 1/12)."""
    w = warmed_up()
    assert w.reference_point.tolist() == [2.0, 8.0] and bool(w.has_reference)
    total, weights = w(t(2.0, 16.0))
    assert total.item() == pytest.approx(2 * math.log(3.0))
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 12])
    # μ = 0.5: total = 2·0.5·log(1 + 4) = log 5, p = (1/5, 4/5), weights = (1/5, 1/10)
    total, weights = warmed_up(mu=0.5)(t(2.0, 16.0))
    assert total.item() == pytest.approx(math.log(5.0))
    assert weights.tolist() == pytest.approx([0.2, 0.1])


def test_stch_running_min_by_hand():
    """Losses (1, 3) then (2, 1): the ideal point z = (1, 1), f = (1, 0); μ = 0.5:
    total = 2·0.5·log(e² + 1), weights = 2·softmax((2, 0))."""
    w = stch(reference="running_min", mu=0.5)
    total, weights = w(t(1.0, 3.0))  # z = the losses themselves: f = 0, total = 2·0.5·log 2
    assert total.item() == pytest.approx(math.log(2.0)) and weights.tolist() == pytest.approx([1.0, 1.0])
    total, weights = w(t(2.0, 1.0))
    assert w.reference_point.tolist() == [1.0, 1.0]
    assert total.item() == pytest.approx(math.log(math.e**2 + 1))
    e2 = math.e**2
    assert weights.tolist() == pytest.approx([2 * e2 / (e2 + 1), 2 / (e2 + 1)])


@pytest.mark.parametrize("reference", ["warmup", "running_min"])
def test_stch_weights_are_the_gradient_multipliers(reference):
    w = warmed_up(reference=reference, mu=0.3)
    theta = torch.tensor([0.5, -1.5], requires_grad=True)
    losses = torch.stack([(theta**2).sum() + 0.1, (theta - 1).abs().sum()])
    weights = w.backward(losses, None, [theta], lambda total: total.backward())
    theta2 = theta.detach().clone().requires_grad_(True)
    g = torch.stack([torch.autograd.grad(loss, theta2)[0] for loss in [(theta2**2).sum(), (theta2 - 1).abs().sum()]])
    assert torch.allclose(theta.grad, weights @ g, rtol=1e-5)


def test_stch_a_task_without_labels_in_the_warmup_stays_finite():
    w = stch(warmup_epochs=1)
    w(t(0.0, 4.0))  # a task with no labelled row has loss exactly 0
    w.on_train_epoch_end(0)
    assert w.reference_point[0].item() == pytest.approx(1e-20)
    total, weights = w(t(0.5, 4.0))
    assert torch.isfinite(total) and torch.isfinite(weights).all()


def test_stch_an_epoch_without_batches_does_not_count_as_warmup():
    w = stch(warmup_epochs=1)
    w.on_train_epoch_end(0)
    assert not bool(w.has_reference) and int(w.epochs_seen) == 0


def test_stch_state_survives_a_state_dict_round_trip():
    w = stch(warmup_epochs=2)
    w(t(1.0, 4.0))
    w.on_train_epoch_end(0)
    w(t(3.0, 2.0))  # mid-epoch checkpoint of the second warm-up epoch
    restored = stch(warmup_epochs=2)
    restored.load_state_dict(w.state_dict())
    for m in (w, restored):
        m(t(1.0, 6.0))
        m.on_train_epoch_end(1)
    assert restored.reference_point.tolist() == w.reference_point.tolist() == [2.0, 4.0]
    assert torch.equal(restored(t(1.0, 1.0))[1], w(t(1.0, 1.0))[1])
    assert set(w.log_values()) == {"weighting/stch/z/a", "weighting/stch/z/b"}


@pytest.mark.parametrize(
    ("key", "value"), [("mu", 0.0), ("warmup_epochs", 0), ("warmup_epochs", 1.5), ("reference", "nadir"), ("eps", 0)]
)
def test_stch_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"loss\.{key} must .*got '?{value}"):
        STCH(**{key: value})
