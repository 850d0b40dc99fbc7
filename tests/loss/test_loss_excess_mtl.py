"""ExcessMTL (He et al., ICML 2024) against a hand-computed excess-risk update, TorchJD's ExcessMTL on random inputs,
the one backward of the weighted losses, resume and config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.excess_mtl import ExcessMTL
from tests.loss.helpers import F64, random_g
from tests.loss.helpers import TWO as TASKS
from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load


def excess(**kwargs) -> ExcessMTL:
    w = ExcessMTL(**kwargs)
    w.setup(TASKS)
    return w


def test_excess_mtl_two_steps_by_hand():
    """Step 1 (warm-up), G = [[3, 4], [1, 0]]: H = sqrt(g² + 1e-7) ≈ (3, 4), (1, 3e-4); E = g·H⁻¹g ≈ (3 + 4, 1 + 0) =
    (7, 1), the baseline; weights stay 1.
    Step 2, G = [[3, 4], [2, 0]]: H = (√18, √32), (√5, ~0); E = (9/√18 + 16/√32, 4/√5) = (7/√2, 4/√5);
    E/E(0) = (1/√2, 4/√5); η = 1: w = 2·softmax(1/√2, 4/√5)."""
    w = excess(robust_step_size=1.0)
    update, weights = w.aggregate(tensor([[3.0, 4.0], [1.0, 0.0]]))
    assert weights.tolist() == [1.0, 1.0] and torch.allclose(update, tensor([4.0, 4.0]))
    assert torch.allclose(w.baseline_sum, tensor([7.0, 1.0]), rtol=1e-6)
    _, weights = w.aggregate(tensor([[3.0, 4.0], [2.0, 0.0]]))
    a, b = math.exp(1 / math.sqrt(2)), math.exp(4 / math.sqrt(5))
    assert torch.allclose(weights, tensor([2 * a / (a + b), 2 * b / (a + b)]), rtol=1e-6)


@pytest.mark.parametrize("warmup", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_excess_mtl_matches_torchjd_over_several_steps(warmup, seed):
    """TorchJD's weights sum to 1 (ours to T, as the authors'); its n_warmup_steps = k is our warmup_steps = k."""
    num_tasks = 2 + seed % 3
    ours, theirs = excess(robust_step_size=0.5, warmup_steps=warmup), TorchJDExcessMTL(0.5, n_warmup_steps=warmup)
    ours.setup({f"t{i}": TASKS["a"] for i in range(num_tasks)})
    for step in range(8):
        g = random_g(100 * seed + step, (num_tasks, 6)) * torch.linspace(0.5, 3.0, num_tasks, dtype=F64).unsqueeze(1)
        _, weights = ours.aggregate(g)
        expected = theirs.weighting(g)
        assert torch.allclose(weights, num_tasks * expected, rtol=1e-5), step


def test_excess_mtl_backward_weights_the_losses():
    w = excess(robust_step_size=1.0)
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    head = torch.tensor([2.0], requires_grad=True)
    for step in range(2):  # task a's gradient grows at step 2, so its excess ratio exceeds task b's
        theta.grad = head.grad = None
        losses = torch.stack([(theta**2).sum() * head.squeeze() * (1 + step), (theta - 1).abs().sum()])
        g = torch.stack([torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses])
        weights = w.backward(losses, g, [theta], lambda total: total.backward())
    assert weights[0] > 1 > weights[1] and weights.sum().item() == pytest.approx(2.0)
    assert torch.allclose(theta.grad, weights @ g) and torch.allclose(head.grad, 2 * weights[0] * (theta**2).sum())


def test_excess_mtl_zero_gradient_in_the_warmup_has_no_excess():
    w = excess(robust_step_size=1.0)
    w.aggregate(tensor([[1.0, 0.0], [0.0, 0.0]]))  # task b has no gradient: baseline 0
    _, weights = w.aggregate(tensor([[1.0, 0.0], [0.0, 5.0]]))
    e = 1 / math.sqrt(2)  # task a: 1/√2 over its baseline 1; task b: 0
    assert torch.allclose(weights, tensor([2 * math.exp(e) / (math.exp(e) + 1), 2 / (math.exp(e) + 1)]))


def test_excess_mtl_state_survives_a_state_dict_round_trip():
    w = excess()
    for seed in range(3):
        w.aggregate(random_g(seed, (2, 5)))
    restored = excess()
    restored.load_state_dict(w.state_dict())
    g = random_g(9, (2, 5))
    assert torch.equal(restored.aggregate(g)[1], w.aggregate(g)[1])
    assert int(restored.step) == 4


@pytest.mark.parametrize(("key", "value"), [("robust_step_size", 0.0), ("warmup_steps", 0), ("warmup_steps", 2.5)])
def test_excess_mtl_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"loss\.{key} must .*got {value}"):
        ExcessMTL(**{key: value})


def test_excess_mtl_refuses_the_representation():
    with pytest.raises(ConfigError, match="grad_source"):
        load("excess_mtl", grad_source="representation")
