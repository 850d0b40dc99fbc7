"""UPGrad (Quinton & Rey 2024) against hand-computed cases, a brute-force projection and its guarantee.

Expected values are worked out by hand in the comments (or by an independent brute-force algorithm);
none is copied from running the code under test.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.loss.helpers import F64, ill_conditioned
from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load


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
