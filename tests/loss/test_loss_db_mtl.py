"""DB-MTL (Lin et al., 2023) against hand-computed updates, an independent step-by-step reference of its Algorithm 1
(as the authors' and LibMTL's code run it), the one backward of the log-losses, resume and config errors."""

from __future__ import annotations

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.db_mtl import DBMTL
from tests.loss.helpers import F64, random_g
from tests.loss.helpers import TWO as TASKS
from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load


def db_mtl(**kwargs) -> DBMTL:
    w = DBMTL(**kwargs)
    w.setup(TASKS)
    return w


def test_db_mtl_two_steps_by_hand():
    """Log-loss gradients (3, 0) and (0, 1); β = 0.9, σ = 0.
    Step 1: m = 0.1·g = (0.3, 0), (0, 0.1); scales max‖m‖/‖m_t‖ = (1, 3): d = (0.3, 0.3).
    Step 2, same g: m = g + 0.9·(m − g) = 0.19·g: d = (0.57, 0.57)."""
    w = db_mtl()
    g = tensor([[3.0, 0.0], [0.0, 1.0]])
    update, weights = w.aggregate(g)
    assert torch.allclose(update, tensor([0.3, 0.3])) and torch.allclose(weights, tensor([0.1, 0.3]))
    update, _ = w.aggregate(g)
    assert torch.allclose(update, tensor([0.57, 0.57])) and int(w.step) == 2
    # σ = 1: β_2 = 0.9/2, m = g + 0.45·(0.1·g − g) = 0.595·g: m_1 = (1.785, 0), scales (1, 3), d = (1.785, 1.785)
    w = db_mtl(beta_sigma=1.0)
    w.aggregate(g)
    assert torch.allclose(w.aggregate(g)[0], tensor([1.785, 1.785]))


def reference_db_mtl(log_grads: list[torch.Tensor], beta: float, sigma: float) -> torch.Tensor:
    """Algorithm 1 step by step: m ← g + β_k(m − g), d = Σ_t (max‖m‖ / ‖m_t‖)·m_t (the authors add 1e-8 to ‖m_t‖)."""
    m = torch.zeros_like(log_grads[0])
    for k, g in enumerate(log_grads, start=1):
        m = g + beta / k**sigma * (m - g)
        norms = m.norm(dim=1)
        d = sum(norms.max() / (norms[i] + 1e-8) * m[i] for i in range(m.shape[0]))
    return d


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_db_mtl_matches_the_reference_over_several_steps(sigma):
    w = db_mtl(beta=0.8, beta_sigma=sigma)
    grads = [random_g(seed, (2, 7)) for seed in range(5)]
    for g in grads:
        update, _ = w.aggregate(g)
    assert torch.allclose(update, reference_db_mtl(grads, 0.8, sigma), rtol=1e-6)


def test_db_mtl_backward_is_of_the_log_losses_and_the_shared_part_gets_d():
    shared = torch.tensor([1.0, -2.0], requires_grad=True)
    head = torch.tensor([0.5], requires_grad=True)
    losses = torch.stack([(shared**2).sum() * head.squeeze(), (shared - 1).abs().sum()])  # (2.5, 4)
    g = torch.stack([torch.autograd.grad(loss, shared, retain_graph=True)[0] for loss in losses])
    w = db_mtl(eps=1e-12)
    weights = w.backward(losses, g, [shared], lambda total, exclude=(): total.backward())
    log_g = g / losses.detach().unsqueeze(1)
    assert torch.allclose(shared.grad, reference_db_mtl([log_g], 0.9, 0.0), rtol=1e-6)
    # the head is reached by task a only: its gradient is ∇ log L_a = (Σ shared²)/L_a = 1/head
    assert torch.allclose(head.grad, torch.tensor([2.0]))
    assert weights.shape == (2,) and torch.isfinite(weights).all()


def test_db_mtl_state_survives_a_state_dict_round_trip():
    w = db_mtl()
    w.aggregate(random_g(0, (2, 5)))
    restored = db_mtl()
    restored.load_state_dict(w.state_dict())
    assert torch.equal(restored.ema, w.ema) and int(restored.step) == 1
    g = random_g(1, (2, 5))
    assert torch.equal(restored.aggregate(g)[0], w.aggregate(g)[0])
    fresh = db_mtl()
    fresh.load_state_dict(db_mtl().state_dict())  # a checkpoint taken before the first step
    assert fresh.ema is None


def test_db_mtl_zero_gradients_give_no_update():
    update, weights = db_mtl().aggregate(torch.zeros(2, 3, dtype=F64))
    assert (update == 0).all() and torch.isfinite(weights).all()


def test_db_mtl_refuses_the_representation_and_bad_values():
    with pytest.raises(ConfigError, match="grad_source"):
        load("db_mtl", grad_source="representation")
    with pytest.raises(ConfigError, match=r"loss\.beta must .*got 1"):
        DBMTL(beta=1.0)
    with pytest.raises(ConfigError, match=r"loss\.beta_sigma must .*got -1"):
        DBMTL(beta_sigma=-1)
    with pytest.raises(ConfigError, match=r"loss\.eps must .*got 0"):
        DBMTL(eps=0)
