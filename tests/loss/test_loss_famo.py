"""FAMO (Liu et al., NeurIPS 2023) against hand-computed cases, torch's Adam, through a real Lightning fit,
across a state_dict round trip, and its config errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.famo import FAMO
from tests.loss.helpers import TWO as TASKS
from tests.loss.helpers import assert_fails_before_tracking, fit
from tests.loss.helpers import vec as t


def famo(**kwargs) -> FAMO:
    w = FAMO(**kwargs)
    w.setup(TASKS)
    return w


def test_famo_effective_weights_by_hand():
    w = famo()
    # ξ = 0 -> z = [1/2, 1/2]; z/L = [1/2, 1/8] -> w = [0.8, 0.2]
    total, weights = w(t(1.0, 4.0))
    assert weights.tolist() == pytest.approx([0.8, 0.2])
    assert total.item() == pytest.approx(0.8 * 1 + 0.2 * 4)
    # ξ = [log 3, 0] -> z = [3/4, 1/4]; z/L = [3/4, 1/16] -> w = [12/13, 1/13] (Σ w = 1)
    w.logits.copy_(t(math.log(3.0), 0.0))
    assert w(t(1.0, 4.0))[1].tolist() == pytest.approx([12 / 13, 1 / 13])


def test_famo_gradient_is_that_of_the_normalised_log_losses():
    w = famo()
    w.logits.copy_(t(0.5, -0.5))
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    losses = torch.stack([(theta**2).sum(), (theta - 1).abs().sum()])  # [5, 3]
    w.backward(losses, None, [theta], lambda total: total.backward())
    # paper: ∇ Σ_t c·z_t·log L_t with c = (Σ z_t/L_t)⁻¹ held constant
    z = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]
    c = 1 / (z[0] / 5 + z[1] / 3)
    theta2 = torch.tensor([1.0, -2.0], requires_grad=True)
    losses2 = torch.stack([(theta2**2).sum(), (theta2 - 1).abs().sum()])
    (c * (z[0] * losses2[0].log() + z[1] * losses2[1].log())).backward()
    assert torch.allclose(theta.grad, theta2.grad)


def test_famo_logit_update_by_hand_sgd():
    w = famo(lr=0.1, gamma=0.0, optimizer="sgd")
    w.after_optimizer_step(t(1.0, 4.0))  # first step: only recorded
    assert w.logits.tolist() == [0.0, 0.0] and bool(w.has_prev)
    w.after_optimizer_step(t(0.5, 4.0))
    # δ = [log 2, 0]; z = [1/2, 1/2]; J_zᵀδ = z ⊙ (δ − zᵀδ) = [log2/4, −log2/4]; ξ = −0.1·J_zᵀδ
    # the task whose loss fell more loses weight
    assert w.logits.tolist() == pytest.approx([-0.025 * math.log(2), 0.025 * math.log(2)])
    assert w.prev_losses.tolist() == [0.5, 4.0]


def test_famo_logit_update_with_decay_by_hand_sgd():
    w = famo(lr=0.2, gamma=0.5, optimizer="sgd")
    w.logits.copy_(t(1.0, -1.0))
    w.after_optimizer_step(t(2.0, 1.0))
    w.after_optimizer_step(t(2.0, 0.5))
    # z = [1/(1+e^-2), 1/(1+e^2)]; δ = [0, log 2]; zᵀδ = z1·log2
    z0, z1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    d = math.log(2)
    g = [z0 * (0 - z1 * d) + 0.5 * 1.0, z1 * (d - z1 * d) + 0.5 * -1.0]
    assert w.logits.tolist() == pytest.approx([1.0 - 0.2 * g[0], -1.0 - 0.2 * g[1]])


def test_famo_first_adam_step_moves_each_logit_by_lr():
    w = famo()  # adam, lr 0.025
    w.after_optimizer_step(t(1.0, 4.0))
    w.after_optimizer_step(t(0.5, 4.0))
    # first Adam step: m̂ = g, v̂ = g² -> Δξ = −lr·g/(|g| + 1e-8) ≈ −lr·sign(g), g = [log2/4, −log2/4]
    assert w.logits.tolist() == pytest.approx([-0.025, 0.025], abs=1e-8)


def reference_famo_logits(loss_sequence, lr, gamma):
    """Independent reference: torch.optim.Adam(lr, weight_decay=γ) on ξ, gradient = softmax VJP with δ."""
    xi = torch.zeros(len(loss_sequence[0]), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr, weight_decay=gamma)
    for before, after in zip(loss_sequence[:-1], loss_sequence[1:], strict=True):
        delta = torch.log(before.double() + 1e-8) - torch.log(after.double() + 1e-8)
        (grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
        xi.grad = grad
        opt.step()
    return xi.detach()


def test_famo_adam_matches_torch_adam_over_several_steps():
    sequence = [t(1.0, 4.0), t(0.8, 3.9), t(0.7, 3.0), t(0.69, 2.1), t(0.5, 2.0)]
    w = famo(gamma=0.01)
    for losses in sequence:
        w.after_optimizer_step(losses)
    assert torch.allclose(w.logits.double(), reference_famo_logits(sequence, 0.025, 0.01), atol=1e-6)
    assert int(w.adam_step) == len(sequence) - 1


def test_famo_zero_loss_stays_finite_and_negative_loss_raises():
    w = famo()
    weights = w(t(0.0, 1.0))[1]  # ε keeps log(0 + ε) finite; that task takes (almost) all the weight
    assert torch.isfinite(weights).all() and weights[0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs every task loss >= 0"):
        w(t(-0.1, 1.0))
    with pytest.raises(ValueError, match="needs every task loss >= 0"):
        w.after_optimizer_step(t(1.0, -1.0))


def test_famo_state_survives_a_state_dict_round_trip():
    sequence = [t(1.0, 4.0), t(0.8, 3.9), t(0.7, 3.0)]
    w = famo()
    for losses in sequence:
        w.after_optimizer_step(losses)
    restored = famo()
    restored.load_state_dict(w.state_dict())
    for m in (w, restored):
        m.after_optimizer_step(t(0.6, 2.5))
    assert torch.equal(restored.logits, w.logits)
    assert torch.allclose(w.logits.double(), reference_famo_logits([*sequence, t(0.6, 2.5)], 0.025, 0.001))
    assert list(w.parameters()) == []  # ξ is never handed to the main optimizer


def test_famo_logs_its_logits():
    w = famo()
    w.logits.copy_(t(0.3, -0.3))
    assert {k: round(v.item(), 6) for k, v in w.log_values().items()} == {"famo/logit/a": 0.3, "famo/logit/b": -0.3}


class RecordingFAMO(FAMO):
    """FAMO that records the losses and ξ of every step of a real fit."""

    def setup(self, tasks, model=None):
        super().setup(tasks, model)
        self.seen = []

    def forward(self, losses):
        total, weights = super().forward(losses)
        self.seen.append((losses.detach().clone(), self.logits.clone(), weights.detach().clone()))
        return total, weights


def test_famo_through_a_lightning_fit():
    w = RecordingFAMO()
    fit(w, max_steps=6)
    losses = [loss for loss, _, _ in w.seen]
    assert len(losses) == 6
    for k, (loss, xi, weights) in enumerate(w.seen):
        # ξ at step k is the reference after the hooks of steps 0..k-1; the weights follow from it
        assert torch.allclose(xi.double(), reference_famo_logits(losses[:k] or [loss], 0.025, 0.001), atol=1e-6)
        z = torch.softmax(xi, 0)
        assert torch.allclose(weights, (z / loss) / (z / loss).sum(), atol=1e-6)
    assert torch.allclose(w.logits.double(), reference_famo_logits(losses, 0.025, 0.001), atol=1e-6)
    assert w.logits.abs().max() > 1e-3  # five Adam steps of up to ~0.025 each moved the logits
    assert torch.equal(w.prev_losses, losses[-1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, "loss.lr must be a finite number >= 0"),
        ({"gamma": float("nan")}, "loss.gamma must be a finite number >= 0"),
        ({"eps": 0.0}, "loss.eps must be a finite number > 0"),
        ({"optimizer": "rmsprop"}, r"loss.optimizer must be one of \['adam', 'sgd'\]"),
    ],
)
def test_famo_rejects_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FAMO(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=famo", "loss.optimizer=lbfgs"], "loss.optimizer must be one of"),
    ],
)
def test_bad_options_fail_through_the_config(overrides, message, make_cfg, mlflow_runs):
    assert_fails_before_tracking(make_cfg, mlflow_runs, overrides, message)
