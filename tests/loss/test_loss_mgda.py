"""MGDA (Sener & Koltun 2018, through TorchJD) against hand-computed min-norm points.

Expected values are worked out by hand in the comments (or by an independent brute-force algorithm);
none is copied from running the code under test.
"""

from __future__ import annotations

import pytest
import torch

from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load


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
