"""PCGrad (TorchJD, through the adapter), GradDrop, GradVac, CAGrad and Nash-MTL against hand-computed and
closed-form cases; reproducibility and RNG isolation of the randomised ones; resume of their state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torchjd.aggregation import PCGrad

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.cagrad import CAGrad
from mtl_experiments.loss.graddrop import GradDrop, sign_dropout
from mtl_experiments.loss.gradvac import GradVac
from mtl_experiments.loss.nash_mtl import NashMTL, nash_weights
from mtl_experiments.loss.torchjd import TorchJD
from mtl_experiments.tasks import build_tasks
from tests.conftest import compose_cfg, load_weighting

TWO = build_tasks({"a": {"kind": "binary"}, "b": {"kind": "regression"}})
THREE = build_tasks({"a": {"kind": "binary"}, "b": {"kind": "binary"}, "c": {"kind": "regression"}})
D = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


def method(name: str, tasks=TWO, **overrides):
    return load_weighting(name, tasks, **overrides)


def random_g(seed: int, shape=(3, 6)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# -- configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "cls"),
    [("pcgrad", TorchJD), ("graddrop", GradDrop), ("gradvac", GradVac), ("cagrad", CAGrad), ("nash_mtl", NashMTL)],
)
def test_yaml_instantiates_with_the_papers_defaults(name, cls):
    w = method(name)
    assert type(w) is cls and w.grad_source == "params"
    if name == "pcgrad":
        assert isinstance(w.aggregator, PCGrad)
    if name == "cagrad":
        assert (w.c, w.rescale) == (0.4, 1)
    if name == "nash_mtl":
        assert (w.max_norm, w.update_weights_every) == (1.0, 1)
    if name == "gradvac":
        assert (w.beta, w.granularity) == (0.5, "whole_model")


@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "gradvac"])
def test_randomised_methods_take_the_runs_seed(name):
    cfg = compose_cfg([f"loss={name}", "seed=7"])
    GlobalHydra.instance().clear()
    assert instantiate(cfg.loss, _convert_="all").seed == 7


@pytest.mark.parametrize(
    ("cls", "overrides", "message"),
    [
        (CAGrad, {"c": -0.1}, "loss.c must be a finite number >= 0"),
        (CAGrad, {"rescale": 3}, "loss.rescale must be one of"),
        (NashMTL, {"max_norm": -1.0}, "loss.max_norm must be a number >= 0"),
        (NashMTL, {"update_weights_every": 0}, "loss.update_weights_every must be an integer >= 1"),
        (GradVac, {"beta": 1.5}, r"loss.beta .* must be in \[0, 1\]"),
        (GradVac, {"granularity": "all_layer"}, "loss.granularity must be one of"),
        (GradVac, {"seed": -1}, "loss.seed must be an integer >= 0"),
        (GradDrop, {"seed": 1.5}, "loss.seed must be an integer >= 0"),
    ],
)
def test_bad_options_name_the_key(cls, overrides, message):
    with pytest.raises(ConfigError, match=message):
        cls(**overrides)  # raised by the constructor; pipeline.build unwraps Hydra's InstantiationException


@pytest.mark.parametrize(
    ("leak", "message"),
    [
        ({"clicks": 1.0}, r"loss.leak names unknown task\(s\) \['clicks'\]"),
        ({"a": 2.0}, r"loss.leak.a must be in \[0, 1\]"),
    ],
)
def test_graddrop_rejects_bad_leaks(leak, message):
    with pytest.raises(ConfigError, match=message):
        method("graddrop", leak=leak)


# -- PCGrad (TorchJD through the adapter) -----------------------------------------------------------
def test_pcgrad_projects_conflicting_gradients_and_sums():
    # g1' = g1 - (g1·g2/|g2|²) g2 = (1,0) + 0.5·(-1,1) = (0.5, 0.5); g2' = g2 - (g2·g1/|g1|²) g1 = (0, 1)
    # TorchJD's PCGrad sums (the paper's Algorithm 1): update = (0.5, 1.5), i.e. 2·g1 + 1.5·g2
    update, weights = method("pcgrad").aggregate(t([[1, 0], [-1, 1]]))
    assert update.tolist() == pytest.approx([0.5, 1.5], abs=1e-12)
    assert weights.tolist() == pytest.approx([2.0, 1.5], abs=1e-12)


def test_pcgrad_leaves_non_conflicting_gradients_untouched():
    update, weights = method("pcgrad").aggregate(t([[1, 0], [1, 1]]))
    assert update.tolist() == pytest.approx([2.0, 1.0], abs=1e-12)  # the plain sum, as loss=equal
    assert weights.tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def outputs(w, calls: int = 12):
    g = random_g(0, (4, 3))  # 4 tasks in 3-D conflict, so the projection order matters
    return [w.aggregate(g)[0] for _ in range(calls)]


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_random_order_is_reproducible_and_isolated_from_the_global_rng(name):
    four = build_tasks({k: {"kind": "binary"} for k in "abcd"})
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = outputs(method(name, four))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be consumed or reseeded"
    torch.manual_seed(2)  # a different global state gives the same draws
    second = outputs(method(name, four))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert len({tuple(u.tolist()) for u in first}) > 1, "the order is drawn anew every step"
    other = outputs(method(name, four, seed=1))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


# -- GradDrop ---------------------------------------------------------------------------------------
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
        weights = gd.backward(losses, grads, [weight], lambda total: total.backward())
        assert weights.shape == (2,) and torch.isfinite(weights).all()
        # only task a's gradient reaches W: Σ_b (0, -2)_b·x_b = 2 (the plain sum would give 3)
        assert weight.grad.item() == pytest.approx(2.0, abs=1e-12)
        # heads get their own task's gradient: Σ_b c_b·A_b
        assert heads[0].grad.item() == pytest.approx(2.0) and heads[1].grad.item() == pytest.approx(1.0)


# -- GradVac ----------------------------------------------------------------------------------------
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


# -- CAGrad -----------------------------------------------------------------------------------------
G_CONFLICT = t([[1, 0], [-1, 1]])  # g0 = (0, 0.5), |g0| = 0.5


def test_cagrad_with_c_zero_is_equal_weighting():
    g = random_g(1)
    update, weights = method("cagrad", c=0.0).aggregate(g)
    assert weights.tolist() == pytest.approx([1.0] * 3, abs=1e-12)
    assert torch.allclose(update, g.sum(0))


def test_cagrad_boundary_solution_by_hand():
    # c = 0.4, w = (p, 1-p): F(p) = g_w·g0 + 0.2|g_w| = 0.5(1-p) + 0.2√(5p²-6p+2) decreases on [0, 1]
    # (F'(1) = -0.5 + 0.2·2 < 0), so w* = (1, 0), g_w = g1 and d = g0 + (0.2/1)·g1 = (0.2, 0.5).
    # The update is T·d = (0.4, 1.0) = 1.4·g1 + 1.0·g2; rescale=1 divides by 1 + c² = 1.16.
    update, weights = method("cagrad", rescale=0).aggregate(G_CONFLICT)
    assert update.tolist() == pytest.approx([0.4, 1.0], abs=1e-9)
    assert weights.tolist() == pytest.approx([1.4, 1.0], abs=1e-9)
    update, _ = method("cagrad").aggregate(G_CONFLICT)
    assert update.tolist() == pytest.approx([0.4 / 1.16, 1.0 / 1.16], abs=1e-9)
    update, _ = method("cagrad", rescale=2).aggregate(G_CONFLICT)
    assert update.tolist() == pytest.approx([0.4 / 1.4, 1.0 / 1.4], abs=1e-9)


def test_cagrad_interior_solution_by_closed_form():
    # c = 0.8: F'(p) = 0 <=> 0.8(5p - 3) = √(5p² - 6p + 2) <=> 11p² - 13.2p + 3.76 = 0, p > 0.6
    p = (13.2 + math.sqrt(8.8)) / 22
    g0 = G_CONFLICT.mean(0)
    gw = p * G_CONFLICT[0] + (1 - p) * G_CONFLICT[1]
    d = g0 + 0.8 * g0.norm() / gw.norm() * gw
    update, _ = method("cagrad", c=0.8, rescale=0).aggregate(G_CONFLICT)
    assert torch.allclose(update / 2, d, atol=1e-7)


@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
def test_cagrad_maximises_the_worst_improvement_within_the_ball(c):
    g = t([[1, 0], [-1, 1], [0.5, -0.2]])  # 0 is not in their convex hull
    g0 = g.mean(0)
    update, _ = method("cagrad", THREE, c=c, rescale=0).aggregate(g)
    d = update / 3
    radius = c * g0.norm()
    assert (d - g0).norm() <= radius + 1e-9  # the paper's constraint
    # brute force over the ball's boundary (the optimum of a concave min of linear functions lies there)
    angles = torch.linspace(0, 2 * math.pi, 200001, dtype=D)
    candidates = g0 + radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    best = (candidates @ g.T).min(dim=1).values.max()
    assert (g @ d).min() >= best - 1e-7


def test_cagrad_weights_do_not_depend_on_the_gradient_scale():
    g = random_g(2)
    _, w1 = method("cagrad", THREE).aggregate(g)
    _, w2 = method("cagrad", THREE).aggregate(1e-4 * g)
    assert torch.allclose(w1, w2, rtol=1e-6)


# -- Nash-MTL ---------------------------------------------------------------------------------------
def test_nash_mtl_orthogonal_gradients_get_inverse_norms():
    g = t([[2, 0, 0], [0, 0.5, 0]])
    update, alpha = method("nash_mtl", max_norm=0.0).aggregate(g)
    # α_t = 1/|g_t| (to the documented 1e-10 ridge)
    assert alpha.tolist() == pytest.approx([0.5, 2.0], rel=1e-9)
    assert update.tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-9)


def test_nash_mtl_solves_the_bargaining_equations_by_hand():
    # Gram = [[1, 1], [1, 2]]: α1(α1 + α2) = 1 and α2(α1 + 2α2) = 1 give α1² = 2α2², α2 = 1/√(2 + √2)
    g = t([[1, 0], [1, 1]])
    _, alpha = method("nash_mtl", max_norm=0.0).aggregate(g)
    a2 = 1 / math.sqrt(2 + math.sqrt(2))
    assert alpha.tolist() == pytest.approx([math.sqrt(2) * a2, a2], abs=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_nash_mtl_residual_on_random_gradients(seed):
    g = random_g(seed, (4, 10)) * t([[1e-3], [1.0], [10.0], [1e2]])  # norms over five orders of magnitude
    gram = g @ g.T
    alpha = nash_weights(gram)
    assert (alpha > 0).all()
    assert ((alpha * (gram @ alpha)) - 1).abs().max() < 1e-6  # α_t·(GGᵀα)_t = 1, i.e. GGᵀα = 1/α


def test_nash_mtl_max_norm_caps_the_update():
    g = t([[2, 0, 0], [0, 0.5, 0]])
    update, alpha = method("nash_mtl").aggregate(g)  # uncapped |(1, 1, 0)| = √2 > max_norm = 1
    assert update.norm().item() == pytest.approx(1.0)
    assert alpha.tolist() == pytest.approx([0.5 / math.sqrt(2), 2 / math.sqrt(2)], rel=1e-9)


def test_nash_mtl_update_weights_every_reuses_alpha_and_resumes():
    g1, g2, g3 = t([[2, 0], [0, 0.5]]), t([[1, 0], [0, 1]]), t([[1, 0], [1, 1]])
    nash = method("nash_mtl", max_norm=0.0, update_weights_every=2)
    nash.aggregate(g1)
    resumed = method("nash_mtl", max_norm=0.0, update_weights_every=2)
    resumed.load_state_dict(nash.state_dict())
    for w in (nash, resumed):
        update, alpha = w.aggregate(g2)  # step 2: α from step 1 applied to the new gradients
        assert alpha.tolist() == pytest.approx([0.5, 2.0]) and update.tolist() == pytest.approx([0.5, 2.0])
        _, alpha = w.aggregate(g3)  # step 3: recomputed
        a2 = 1 / math.sqrt(2 + math.sqrt(2))
        assert alpha.tolist() == pytest.approx([math.sqrt(2) * a2, a2], abs=1e-8)


def test_nash_mtl_zero_gradient_task_gets_zero_weight():
    _, alpha = method("nash_mtl", max_norm=0.0).aggregate(t([[2, 0], [0, 0]]))
    assert alpha.tolist() == pytest.approx([0.5, 0.0])


# -- every method through the one real backward ------------------------------------------------------
@pytest.mark.parametrize("name", ["pcgrad", "graddrop", "gradvac", "cagrad", "nash_mtl"])
@pytest.mark.parametrize("grad_source", ["params", "representation"])
def test_backward_writes_the_update_into_the_shared_parameters(name, grad_source):
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 4).double()
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1).double() for _ in range(3)])
    x = torch.randn(6, 3, dtype=D)
    rep = torch.relu(shared(x))
    losses = torch.stack([heads[i](rep).square().mean() for i in range(3)])
    model = SimpleNamespace(
        backbone=SimpleNamespace(representation=rep, has_representation=True),
        shared_parameters=lambda: list(shared.parameters()),
    )
    w = method(name, THREE, grad_source=grad_source)
    w.setup(THREE, model)
    grads = task_gradients(losses, w.task_grad_inputs(model))
    weights = w.backward(losses, grads, list(shared.parameters()), lambda total: total.backward())
    assert weights.shape == (3,) and torch.isfinite(weights).all() and not weights.requires_grad
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in shared.parameters())
    if grad_source == "params" and name != "graddrop":  # weighted-sum methods: the update is Gᵀw
        flat = torch.cat([p.grad.flatten() for p in shared.parameters()])
        assert torch.allclose(flat, weights @ grads, atol=1e-10)
