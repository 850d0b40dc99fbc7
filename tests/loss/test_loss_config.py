"""ConFIG (Liu et al., ICLR 2025) against hand-computed cases and TorchJD's ConFIG on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torchjd.aggregation import ConFIG as TorchJDConFIG

from mtl_experiments.loss.config import ConFIG
from mtl_experiments.tasks import build_tasks
from tests.loss.helpers import THREE, ill_conditioned, method, random_g, with_yaml_defaults
from tests.loss.helpers import f64 as t


def test_yaml_instantiates():
    with_yaml_defaults("config", ConFIG)


def test_orthogonal_gradients_take_the_diagonal_with_their_summed_projections():
    # U = I, d_u = (1, 1)/√2, length = (2 + 1)/√2: update = 1.5·(1, 1) = 0.75·g_1 + 1.5·g_2
    update, weights = method("config").aggregate(t([[2, 0], [0, 1]]))
    assert update.tolist() == pytest.approx([1.5, 1.5], abs=1e-12)
    assert weights.tolist() == pytest.approx([0.75, 1.5], abs=1e-12)


def test_the_direction_has_equal_cosines_with_every_gradient():
    # u_1 = (1, 0), u_2 = (1, 1)/√2; U d = 1: d = (1, √2 − 1), ‖d‖² = 4 − 2√2; length = (1 + √2)/‖d‖
    update, _ = method("config").aggregate(t([[1, 0], [1, 1]]))
    d = torch.tensor([1.0, math.sqrt(2) - 1], dtype=torch.float64)
    expected = (1 + math.sqrt(2)) / (4 - 2 * math.sqrt(2)) * d
    assert update.tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    cos = t([[1, 0], [1, 1]]) @ update / (update.norm() * t([1, math.sqrt(2)]))
    assert cos[0].item() == pytest.approx(cos[1].item(), abs=1e-12) and cos[0] > 0


def test_opposite_gradients_have_no_direction_and_a_zero_row_is_ignored():
    update, weights = method("config").aggregate(t([[1, 2], [-1, -2]]))
    assert update.tolist() == [0.0, 0.0] and weights.tolist() == [0.0, 0.0]
    update, _ = method("config", THREE).aggregate(t([[1, 0], [0, 0], [-1.2, 1]]))
    expected = TorchJDConFIG()(t([[1, 0], [0, 0], [-1.2, 1]]))
    assert update.tolist() == pytest.approx(expected.tolist(), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("seed", "shape"), [(0, (2, 5)), (1, (3, 6)), (2, (4, 9)), (3, (6, 40)), (4, (5, 5))])
def test_matches_torchjd_on_random_inputs(seed, shape, dtype):
    for g in (random_g(seed, shape), ill_conditioned(seed, *shape)):
        g = g.to(dtype)
        update, weights = method(
            "config", build_tasks({f"t{i}": {"kind": "binary"} for i in range(shape[0])})
        ).aggregate(g)
        expected = TorchJDConFIG()(g.double())  # TorchJD in float64: our float32 result is computed in float64 too
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(update.double(), expected, rtol=tol, atol=tol * float(g.double().norm()))
        torch.testing.assert_close((weights.double() @ g.double()), update.double(), rtol=tol, atol=tol)
