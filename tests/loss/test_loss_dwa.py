"""DWA (Liu et al., CVPR 2019) against hand-computed cases, through a real Lightning fit, across a
state_dict round trip, and its config errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.dwa import DWA
from mtl_experiments.tasks import build_tasks
from tests.loss.helpers import TWO as TASKS
from tests.loss.helpers import assert_fails_before_tracking, fit
from tests.loss.helpers import vec as t


def dwa(**kwargs) -> DWA:
    w = DWA(**kwargs)
    w.setup(TASKS)
    return w


def test_dwa_weights_from_a_loss_history_by_hand():
    w = dwa()  # temperature 2
    # epoch 0: batches [0.5, 1.0] and [1.5, 3.0] -> mean [1.0, 2.0]; epoch 1: mean [0.5, 2.0]
    for losses, epoch_end in [((0.5, 1.0), False), ((1.5, 3.0), True), ((0.5, 2.0), True)]:
        total, weights = w(t(*losses))
        assert weights.tolist() == [1.0, 1.0], "w = 1 during epochs 0 and 1"
        assert total.item() == pytest.approx(sum(losses))
        if epoch_end:
            w.on_train_epoch_end(0)
    # r = [0.5/1.0, 2.0/2.0] = [0.5, 1.0]; w = 2·softmax(r/2) = [2/(1+e^0.25), 2e^0.25/(1+e^0.25)]
    expected = [2 / (1 + math.exp(0.25)), 2 * math.exp(0.25) / (1 + math.exp(0.25))]
    total, weights = w(t(0.25, 1.0))
    assert weights.tolist() == pytest.approx(expected)
    assert total.item() == pytest.approx(expected[0] * 0.25 + expected[1] * 1.0)
    # epoch 2's mean [0.25, 1.0]: the history rolls to (epoch 1, epoch 2), r = [0.5, 0.5] -> equal weights
    w.on_train_epoch_end(2)
    assert w(t(1.0, 1.0))[1].tolist() == pytest.approx([1.0, 1.0])


def test_dwa_zero_epoch_mean_loss_has_rate_one():
    """Issue 14: a task with no labelled row in an epoch has epoch-mean loss 0; L(e-1)/L(e-2) = 0/0 made the weights
    and the total NaN. The documented rule: r_t = 1 where L_t(e-2) = 0. Epoch means (0, 2) then (0, 1):
    r = (1, 0.5), w = 2·softmax(r/2) = (2e^0.5/(e^0.5 + e^0.25), 2e^0.25/(e^0.5 + e^0.25))."""
    w = dwa()
    for losses in [(0.0, 2.0), (0.0, 1.0)]:
        w(t(*losses))
        w.on_train_epoch_end(0)
    total, weights = w(t(0.0, 1.0))
    a, b = math.exp(0.5), math.exp(0.25)
    assert weights.tolist() == pytest.approx([2 * a / (a + b), 2 * b / (a + b)])
    assert total.item() == pytest.approx(2 * b / (a + b))
    w.on_train_epoch_end(2)  # means (0, 1) then (0, 1): r = (1, 1), equal weights
    assert w(t(3.0, 1.0))[1].tolist() == pytest.approx([1.0, 1.0])


def test_dwa_temperature_and_task_count_by_hand():
    w = DWA(temperature=0.5)
    w.setup(build_tasks({"x": {"kind": "binary"}, "y": {"kind": "binary"}, "z": {"kind": "regression"}}))
    for losses in [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)]:
        w(t(*losses))
        w.on_train_epoch_end(0)
    # r = [2, 1, 0.5]; r/τ = [4, 2, 1]; w = 3·e^{r/τ} / Σ e^{r/τ}
    e = [math.exp(4), math.exp(2), math.exp(1)]
    assert w(t(1.0, 1.0, 1.0))[1].tolist() == pytest.approx([3 * v / sum(e) for v in e])


def test_dwa_gradient_is_the_weighted_sum():
    w = dwa()
    for losses in [(1.0, 2.0), (0.5, 2.0)]:
        w(t(*losses))
        w.on_train_epoch_end(0)
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    losses = torch.stack([(theta**2).sum(), (theta - 1).abs().sum()])
    weights = w.backward(losses, None, [theta], lambda total: total.backward())
    w0 = 2 / (1 + math.exp(0.25))
    assert weights.tolist() == pytest.approx([w0, 2 - w0])
    # ∇(w0·Σθ² + w1·Σ|θ-1|) = w0·2θ + w1·sign(θ-1) = [2·w0 + 0, -4·w0 - w1]
    assert theta.grad.tolist() == pytest.approx([2 * w0, -4 * w0 - (2 - w0)])


def test_dwa_skips_an_epoch_without_batches():
    w = dwa()
    w.on_train_epoch_end(0)
    assert int(w.epochs_seen) == 0 and w.weights.tolist() == [1.0, 1.0]


def test_dwa_state_survives_a_state_dict_round_trip():
    w = dwa()
    for losses in [(1.0, 2.0), (0.5, 2.0)]:
        w(t(*losses))
        w.on_train_epoch_end(0)
    w(t(0.3, 1.0))  # mid-epoch: the running sum must travel too
    restored = dwa()
    restored.load_state_dict(w.state_dict())
    assert torch.equal(restored.weights, w.weights) and torch.equal(restored.history, w.history)
    for m in (w, restored):
        m(t(0.1, 3.0))
        m.on_train_epoch_end(2)
    # epoch 2's mean is [0.2, 2.0] from both batches -> r = [0.4, 1.0]
    expected = [2 / (1 + math.exp(0.3)), 2 * math.exp(0.3) / (1 + math.exp(0.3))]
    assert restored.weights.tolist() == pytest.approx(expected)
    assert torch.equal(restored.weights, w.weights)


class RecordingDWA(DWA):
    """DWA that records (epoch, raw losses, weights applied) at every step of a real fit."""

    def setup(self, tasks, model=None):
        super().setup(tasks, model)
        self.seen, self.epoch = [], 0

    def forward(self, losses):
        total, weights = super().forward(losses)
        self.seen.append((self.epoch, losses.detach().clone(), weights.detach().clone()))
        return total, weights

    def on_train_epoch_end(self, epoch):
        assert epoch == self.epoch
        super().on_train_epoch_end(epoch)
        self.epoch += 1


def test_dwa_through_a_lightning_fit():
    w = RecordingDWA()
    fit(w, max_epochs=3)
    means = [torch.stack([loss for e, loss, _ in w.seen if e == epoch]).mean(0) for epoch in range(3)]
    for epoch, _, weights in w.seen:
        if epoch < 2:
            assert weights.tolist() == [1.0, 1.0]
        else:  # Eq. 7 from the epoch means of the losses this fit actually saw
            r = means[1] / means[0]
            assert torch.allclose(weights, 2 * torch.softmax(r / 2, dim=0), atol=1e-6)
    assert not torch.allclose(w.seen[-1][2], torch.ones(2))
    # after the last epoch the buffers hold epochs 1 and 2 and the weights for a next epoch
    assert torch.allclose(w.history, torch.stack(means[1:]), atol=1e-6)
    assert torch.allclose(w.weights, 2 * torch.softmax(means[2] / means[1] / 2, dim=0), atol=1e-6)
    assert int(w.epochs_seen) == 3 and int(w.loss_count) == 0


@pytest.mark.parametrize("temperature", [0, -2.0, float("nan"), float("inf"), "hot", True])
def test_dwa_rejects_a_bad_temperature(temperature):
    with pytest.raises(ConfigError, match="loss.temperature must be a finite number > 0"):
        DWA(temperature=temperature)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=dwa", "loss.temperature=0"], "loss.temperature must be a finite number > 0"),
    ],
)
def test_bad_options_fail_through_the_config(overrides, message, make_cfg, mlflow_runs):
    assert_fails_before_tracking(make_cfg, mlflow_runs, overrides, message)
