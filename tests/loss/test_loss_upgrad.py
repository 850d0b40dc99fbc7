"""UPGrad, MGDA, IMTL-G and Aligned-MTL against hand-computed cases and their defining properties.

Expected values are worked out by hand in the comments (or by an independent brute-force algorithm);
none is copied from running the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.base import GradientAggregation
from tests.conftest import CONF

METHODS = ["upgrad", "mgda", "imtl", "aligned_mtl"]
F64 = torch.float64


def load(name: str, **overrides) -> GradientAggregation:
    """Instantiate conf/loss/<name>.yaml the way the pipeline does: under a root that has ``seed``."""
    cfg = OmegaConf.merge({"seed": 0}, {"loss": OmegaConf.load(CONF / "loss" / f"{name}.yaml")}, {"loss": overrides})
    weighting = instantiate(cfg.loss, _convert_="all")
    weighting.setup({"a": None, "b": None})
    return weighting


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def ill_conditioned(seed: int, num_tasks: int, dim: int) -> torch.Tensor:
    """Random task gradients with norms spread log-uniformly over 1e-3..1e3."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(num_tasks, dim, generator=gen, dtype=F64)
    norms = 10 ** (6 * torch.rand(num_tasks, generator=gen, dtype=F64) - 3)
    return g / g.norm(dim=1, keepdim=True) * norms.unsqueeze(1)


# -- every YAML ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_yaml_instantiates_with_both_gradient_sources(name):
    for source in ("params", "representation"):
        w = load(name, grad_source=source)
        assert isinstance(w, GradientAggregation) and w.needs_task_grads and w.grad_source == source


@pytest.mark.parametrize("name", METHODS)
def test_unknown_gradient_source_is_a_config_error(name):
    with pytest.raises(ConfigError, match="loss.grad_source"):
        load(name, grad_source="embeddings")


@pytest.mark.parametrize("name", METHODS)
def test_reproducible(name):
    g = ill_conditioned(0, 3, 7).float()
    first, second = load(name).aggregate(g), load(name).aggregate(g)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("name", METHODS)
def test_representation_source_backpropagates_the_weighted_losses(name):
    """MGDA-UB style: weights come from gradients of the shared representation h; backward of Σ w_t L_t."""
    torch.manual_seed(0)
    shared, heads = torch.nn.Linear(3, 4), torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(2)])
    x = torch.randn(8, 3)

    def losses():
        h = shared(x)
        return h, torch.stack([heads[0](h).square().mean(), (heads[1](h) - 3).abs().mean()])

    w = load(name, grad_source="representation")
    h, task_losses = losses()
    weights = w.backward(
        task_losses, task_gradients(task_losses, [h]), list(shared.parameters()), torch.Tensor.backward
    )
    _, again = losses()
    expected = torch.autograd.grad((weights * again).sum(), shared.weight)[0]
    assert torch.allclose(shared.weight.grad, expected)


# -- UPGrad ----------------------------------------------------------------------------------------
def test_upgrad_by_hand_on_the_100x_conflict():
    """g1 = (1, 0), g2 = (-100, 1); ⟨g1, g2⟩ = -100 < 0, so each projection lands on the other's hyperplane.

    π(g1) = g1 - (⟨g1,g2⟩/‖g2‖²) g2 = (1, 0) + (100/10001)(-100, 1) = (1, 100)/10001 → λ¹ = (1, 100/10001)
    π(g2) = g2 - (⟨g2,g1⟩/‖g1‖²) g1 = (0, 1)                                      → λ² = (100, 1)
    update = (π(g1) + π(g2))/2 = (1, 10101)/20002,  weights = (50.5, 10101/20002)
    ⟨update, g1⟩ = 1/20002 > 0 (TorchJD 0.18's default UPGrad gives -25 here), ⟨update, g2⟩ = 1/2.
    """
    g = tensor([[1.0, 0.0], [-100.0, 1.0]])
    update, weights = load("upgrad").aggregate(g)
    assert torch.allclose(update, tensor([1.0, 10101.0]) / 20002, rtol=1e-9, atol=0)
    assert torch.allclose(weights, tensor([50.5, 10101 / 20002]), rtol=1e-9, atol=0)
    assert torch.allclose(g @ update, tensor([1 / 20002, 0.5]), rtol=1e-9, atol=0)
    update32, _ = load("upgrad").aggregate(g.float())  # the training dtype keeps the guarantee too
    assert (g.float() @ update32 > 0).all()


def test_upgrad_without_conflict_is_the_mean():
    g = tensor([[1.0, 0.0], [1.0, 1.0]])  # ⟨g1, g2⟩ = 1 ≥ 0: both already lie in the dual cone
    update, weights = load("upgrad").aggregate(g)
    assert torch.allclose(update, tensor([1.0, 0.5])) and torch.allclose(weights, tensor([0.5, 0.5]))


def test_upgrad_opposite_gradients_give_no_update():
    update, _ = load("upgrad").aggregate(tensor([[1.0, 0.0], [-2.0, 0.0]]))  # dual cone = {x : x_1 = 0}
    assert torch.allclose(update, torch.zeros(2, dtype=F64), atol=1e-15)


def brute_force_upgrad(g: torch.Tensor) -> torch.Tensor:
    """The definition, by a different algorithm: project each g_i onto {x : g x ≥ 0} by trying every set of
    active constraints (projection onto that face's subspace) and keeping the closest feasible point."""
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)  # same cone, conditioning free of the norms
    projections = []
    for gi in g:
        best = None
        for size in range(g.shape[0] + 1):
            for active in itertools.combinations(range(g.shape[0]), size):
                x = gi.clone()
                if active:  # remove gi's component in the span of the active rows (least squares, no Gramian)
                    a = unit[list(active)]
                    x = gi - a.T @ torch.linalg.lstsq(a.T, gi.unsqueeze(1)).solution.squeeze(1)
                if (unit @ x >= -1e-12 * x.norm()).all() and (best is None or (x - gi).norm() < best[0]):
                    best = ((x - gi).norm(), x)
        projections.append(best[1])
    return torch.stack(projections).mean(0)


@pytest.mark.parametrize("seed", range(40))
def test_upgrad_never_conflicts_on_ill_conditioned_gradients(seed):
    num_tasks = 2 + seed % 4
    g = ill_conditioned(seed, num_tasks, dim=num_tasks + seed % 3 * 10)
    update, _ = load("upgrad").aggregate(g)
    assert (g @ update >= 0).all(), (g @ update).tolist()
    expected = brute_force_upgrad(g)
    assert (update - expected).norm() <= 1e-9 * expected.norm() + 1e-300


@pytest.mark.parametrize(
    "g",
    [
        tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),  # duplicate gradients: singular Gramian
        ill_conditioned(7, 5, 3),  # more tasks than dimensions
        tensor([[2.0, 1.0], [0.0, 0.0], [-1.0, 1.0]]),  # a task with no gradient
    ],
    ids=["duplicates", "T>P", "zero-row"],
)
def test_upgrad_keeps_the_guarantee_on_singular_gramians(g):
    update, weights = load("upgrad").aggregate(g)
    assert torch.isfinite(update).all() and torch.isfinite(weights).all()
    # on the cone's boundary ⟨update, g_t⟩ is 0 up to rounding
    assert (g @ update >= -1e-12 * g.norm(dim=1) * g.norm(dim=1).max()).all()
    assert torch.allclose(update, brute_force_upgrad(g), atol=1e-10)


def test_upgrad_zero_gradient_keeps_its_lower_bound():
    _, weights = load("upgrad").aggregate(tensor([[2.0, 1.0], [0.0, 0.0], [-1.0, 1.0]]))
    assert weights[1].item() == pytest.approx(1 / 3)


def test_upgrad_is_positively_homogeneous():
    """A(cJ) = c·A(J): TorchJD 0.18's default instead returns the mean when ‖J‖_F² < 1e-4."""
    g = tensor([[1.0, 0.0], [-2.0, 1.0]])
    big, small = load("upgrad").aggregate(g)[0], load("upgrad").aggregate(1e-3 * g)[0]
    assert torch.allclose(small, 1e-3 * big, rtol=1e-12, atol=0)
    assert (g @ small > 0).all()


# -- MGDA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("g", "weights", "update"),
    [
        # symmetric pair: the midpoint (0.5, 0.5) is the closest point of the segment to the origin
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], [0.5, 0.5]),
        # ‖γ(1,0) + (1-γ)(1,1)‖² = 1 + (1-γ)² is smallest at γ = 1: g1 itself
        ([[1.0, 0.0], [1.0, 1.0]], [1.0, 0.0], [1.0, 0.0]),
        # γ² + 4(1-γ)² is smallest where 2γ = 8(1-γ): γ = 0.8 → (0.8, 0.4)
        ([[1.0, 0.0], [0.0, 2.0]], [0.8, 0.2], [0.8, 0.4]),
    ],
)
def test_mgda_min_norm_point_of_a_pair(g, weights, update):
    got_update, got_weights = load("mgda").aggregate(tensor(g))
    assert torch.allclose(got_weights, tensor(weights), atol=1e-12)
    assert torch.allclose(got_update, tensor(update), atol=1e-12)


def test_mgda_three_tasks_within_frank_wolfe_tolerance():
    """(1,1) is dominated: the min-norm point of the hull of (1,0), (0,1), (1,1) is (0.5, 0.5). Frank-Wolfe
    stops when its step falls below epsilon=1e-3, so the answer is approximate; the min-norm optimality
    condition ⟨d, g_t⟩ ≥ ‖d‖² holds to the same accuracy."""
    g = tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    update, weights = load("mgda").aggregate(g)
    assert torch.allclose(update, tensor([0.5, 0.5]), atol=1e-2)
    assert weights.sum().item() == pytest.approx(1.0) and (weights >= 0).all()
    assert (g @ update >= update.dot(update) - 1e-2).all()


# -- IMTL-G ----------------------------------------------------------------------------------------
def test_imtl_by_hand_orthogonal():
    """g1 = (1, 0), g2 = (0, 2): G = diag(1, 4), ‖g‖ = (1, 2), G⁻¹‖g‖ = (1, 1/2) → α = (2/3, 1/3);
    update = (2/3, 2/3), whose projections onto u1 = (1, 0) and u2 = (0, 1) are both 2/3."""
    update, weights = load("imtl").aggregate(tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(weights, tensor([2 / 3, 1 / 3])) and torch.allclose(update, tensor([2 / 3, 2 / 3]))


def test_imtl_by_hand_conflicting():
    """g1 = (1, 0), g2 = (-1, 1): G = [[1, -1], [-1, 2]], G⁻¹ = [[2, 1], [1, 1]], ‖g‖ = (1, √2);
    G⁻¹‖g‖ = (2 + √2, 1 + √2), sum (1 + √2)² → α = (2 - √2, √2 - 1), update = (3 - 2√2, √2 - 1);
    projections: ⟨update, u1⟩ = 3 - 2√2, ⟨update, u2⟩ = (-(3 - 2√2) + √2 - 1)/√2 = 3 - 2√2."""
    g = tensor([[1.0, 0.0], [-1.0, 1.0]])
    update, weights = load("imtl").aggregate(g)
    r2 = math.sqrt(2)
    assert torch.allclose(weights, tensor([2 - r2, r2 - 1]))
    assert torch.allclose(update, tensor([3 - 2 * r2, r2 - 1]))
    assert torch.allclose(g @ update / g.norm(dim=1), torch.full((2,), 3 - 2 * r2, dtype=F64))


@pytest.mark.parametrize("num_tasks", [3, 4])
def test_imtl_matches_the_papers_closed_form(num_tasks):
    """α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 - Σ α_{2:T}, U_t = u_1 - u_t, D_t = g_1 - g_t (Liu et al. 2021, §3.2)."""
    g = ill_conditioned(num_tasks, num_tasks, 9)
    u = g / g.norm(dim=1, keepdim=True)
    diff_u, diff_g = u[0] - u[1:], g[0] - g[1:]
    rest = g[0] @ diff_u.T @ torch.linalg.inv(diff_g @ diff_u.T)
    expected = torch.cat([1 - rest.sum().unsqueeze(0), rest])
    _, weights = load("imtl").aggregate(g)
    assert torch.allclose(weights, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("ratio", [1e2, 1e4, 1e6])
def test_imtl_equal_projections_in_float32_whatever_the_norm_ratio(ratio):
    """TorchJD 0.18's IMTLG loses the small task here from ratio 1e4 on (projections 1.04 vs 0.27)."""
    g = torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0 / ratio, 0.5 / ratio]])
    update, _ = load("imtl").aggregate(g)
    proj = g.double() @ update.double() / g.double().norm(dim=1)
    assert proj[0].item() == pytest.approx(proj[1].item(), rel=1e-5)


def test_imtl_direction_does_not_depend_on_loss_scales():
    g = ill_conditioned(3, 3, 6)
    scaled = g * tensor([1.0, 1e3, 1e-2]).unsqueeze(1)  # losses multiplied by 1, 1000, 0.01
    a, b = load("imtl").aggregate(g)[0], load("imtl").aggregate(scaled)[0]
    assert torch.allclose(a / a.norm(), b / b.norm(), atol=1e-10)


# -- Aligned-MTL -----------------------------------------------------------------------------------
def test_aligned_mtl_orthogonal_gradients_are_scaled_to_the_smallest_singular_value():
    """g1 = (3, 0), g2 = (0, 1): singular values 3 and 1. Aligned: both rescaled to σ_min = 1, i.e.
    ĝ1 = (1, 0), ĝ2 = (0, 1); B = σ_min·diag(1/3, 1); with w = 1/2 each: α = Bw = (1/6, 1/2),
    update = (ĝ1 + ĝ2)/2 = (0.5, 0.5)."""
    update, weights = load("aligned_mtl").aggregate(tensor([[3.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(weights, tensor([1 / 6, 1 / 2])) and torch.allclose(update, tensor([0.5, 0.5]))


def test_aligned_mtl_aligned_gramian_is_lambda_min_times_identity():
    """g1 = (1, 0), g2 = (1, 1): G = [[1, 1], [1, 2]], eigenvalues (3 ± √5)/2. The aligned Jacobian BJ has
    every singular value σ_min, i.e. B G Bᵀ = λ_min·I with λ_min = (3 - √5)/2; columns of B via w = e_i."""
    g = tensor([[1.0, 0.0], [1.0, 1.0]])
    w = load("aligned_mtl")
    columns = []
    for i in range(2):
        w.aggregator.pref_vector = torch.eye(2, dtype=F64)[i]
        columns.append(w.aggregate(g)[1])
    b = torch.stack(columns, dim=1)
    assert torch.allclose(b @ g @ g.T @ b.T, (3 - math.sqrt(5)) / 2 * torch.eye(2, dtype=F64))
    w.aggregator.pref_vector = None  # back to 1/T: the update is the mean of the aligned gradients
    assert torch.allclose(w.aggregate(g)[0], (b @ g).mean(0))
