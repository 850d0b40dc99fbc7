"""MetaBalance (He et al., WWW 2022) against hand-computed cases, torch-rechub's MetaBalance optimizer (when installed)
and resume; config errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.metabalance import MetaBalance
from tests.loss.helpers import THREE, TWO, method, random_g, with_yaml_defaults
from tests.loss.helpers import f64 as t


def test_yaml_instantiates_with_torch_rechubs_defaults():
    w = with_yaml_defaults("metabalance", MetaBalance)
    assert (w.relax_factor, w.beta, w.strategy, w.granularity, w.target) == (0.7, 0.9, "both", "all_matrix", 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"relax_factor": 1.5}, r"loss.relax_factor must be a number in \[0, 1\]"),
        ({"beta": 1.0}, r"loss.beta must be a number in \[0, 1\)"),
        ({"strategy": "all"}, "loss.strategy must be one of"),
        ({"granularity": "layer"}, "loss.granularity must be one of"),
    ],
)
def test_bad_options_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MetaBalance(**overrides)


def test_an_unknown_target_task_is_refused_at_setup():
    with pytest.raises(ConfigError, match=r"loss.target_task must be one of \['a', 'b'\], got 'ctr'"):
        method("metabalance", target_task="ctr")


def test_two_steps_by_hand():
    mb = method("metabalance")  # no model: one component
    # m = 0.1·(3, 1): the auxiliary gradient gets r·3 + (1 − r) = 2.4, the target's stays
    update, weights = mb.aggregate(t([[3, 0], [0, 1]]))
    assert update.tolist() == pytest.approx([3.0, 2.4], abs=1e-12)
    assert weights.tolist() == pytest.approx([1.0, 2.4], abs=1e-12)
    # m = 0.9·(0.3, 0.1) + 0.1·(3, 3) = (0.57, 0.39)
    update, _ = mb.aggregate(t([[3, 0], [0, 3]]))
    assert update.tolist() == pytest.approx([3.0, 3 * (0.7 * 0.57 / 0.39 + 0.3)], abs=1e-12)


@pytest.mark.parametrize(("strategy", "aux"), [("both", 2.4), ("enlarge", 2.4), ("reduce", 1.0)])
def test_strategies_and_the_target_task(strategy, aux):
    _, weights = method("metabalance", strategy=strategy).aggregate(t([[3, 0], [0, 1]]))  # aux smaller than target
    assert weights.tolist() == pytest.approx([1.0, aux], abs=1e-12)
    _, weights = method("metabalance", strategy=strategy, target_task="b").aggregate(t([[3, 0], [0, 1]]))
    # now the larger one is auxiliary: ratio 1/3, r/3 + 0.3
    assert weights.tolist() == pytest.approx([1.0 if strategy == "enlarge" else 0.7 / 3 + 0.3, 1.0], abs=1e-12)


def test_relax_factor_zero_is_the_sum_and_a_zero_auxiliary_gradient_stays():
    _, weights = method("metabalance", THREE, relax_factor=0.0).aggregate(random_g(0, (3, 4)))
    assert weights.tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    update, weights = method("metabalance").aggregate(t([[1, 2], [0, 0]]))
    assert update.tolist() == [1.0, 2.0] and weights.tolist() == [1.0, 1.0]


def shared_model(seed: int = 0):
    torch.manual_seed(seed)
    layers = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    return layers, SimpleNamespace(shared_parameters=lambda: list(layers.parameters()))


def three_losses(layers, seed: int):
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    h = layers(x)
    # scaled up so that torch-rechub's m_aux + 1e-5 is negligible
    return torch.stack([100 * h[:, 0].square().mean(), 30 * (h[:, 1] - 1).abs().mean(), 300 * h.sum(1).sin().mean()])


def test_all_matrix_scales_each_shared_tensor_on_its_own():
    layers, model = shared_model()
    mb = method("metabalance", THREE)
    mb.setup(THREE, model)
    assert mb.sizes == [12, 4, 8, 2] and mb.norms.shape == (4, 3)
    g = task_gradients(three_losses(layers, 0), list(layers.parameters())).detach()
    update, weights = mb.aggregate(g)
    scaled = torch.zeros_like(g)  # each task's rescaled gradient
    for k, part in enumerate(torch.split(g, mb.sizes, dim=1)):
        norms = part.norm(dim=1)
        coef = torch.tensor([1.0, *(0.7 * norms[0] / norms[1:] + 0.3)], dtype=torch.float64)
        start = sum(mb.sizes[:k])
        torch.testing.assert_close(update[start : start + mb.sizes[k]], coef @ part)
        scaled[:, start : start + mb.sizes[k]] = coef.unsqueeze(1) * part
    # the weight logged: the factor each task's gradient was scaled by, ⟨scaled_t, g_t⟩/‖g_t‖²; the target's is 1
    torch.testing.assert_close(weights, (scaled * g).sum(1) / g.square().sum(1))
    assert weights[0] == 1.0


def test_matches_torch_rechubs_metabalance_over_consecutive_steps():
    metaoptimizer = pytest.importorskip("torch_rechub.basic.metaoptimizer")
    layers, model = shared_model()
    ours = method("metabalance", THREE)
    ours.setup(THREE, model)
    theirs = metaoptimizer.MetaBalance(list(layers.parameters()), relax_factor=0.7, beta=0.9)
    for step in range(4):
        losses = three_losses(layers, step)
        update, _ = ours.aggregate(task_gradients(losses, list(layers.parameters())).detach())
        theirs.step(list(losses))  # writes the balanced sum into each .grad (a list: it iterates under no_grad)
        expected = torch.cat([p.grad.flatten() for p in layers.parameters()])
        # the only difference, rechub's m_aux + 1e-5, shrinks as 1/(the gradients' scale): ~1e-6 relative here
        assert (update - expected).norm() <= 1e-5 * expected.norm()
        layers.zero_grad()


def test_resumes_its_moving_averages_from_a_checkpoint():
    gs = [random_g(s, (3, 5)) for s in range(6)]
    reference = method("metabalance", THREE)
    expected = [reference.aggregate(g)[0] for g in gs]
    before = method("metabalance", THREE)
    for g in gs[:3]:
        before.aggregate(g)
    resumed = method("metabalance", THREE)
    resumed.load_state_dict(before.state_dict())
    for g, want in zip(gs[3:], expected[3:], strict=True):
        assert torch.equal(resumed.aggregate(g)[0], want)
    assert set(method("metabalance", TWO).log_values()) == {"metabalance/norm/a", "metabalance/norm/b"}
