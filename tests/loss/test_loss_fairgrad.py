"""FairGrad (Ban & Ji, ICML 2024) against hand-computed roots of G Gᵀ w = w^(-1/α), TorchJD's FairGrad on random
inputs, its solver log and its config errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torchjd.aggregation import FairGrad as TorchJDFairGrad

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.fairgrad import FairGrad
from tests.loss.helpers import F64, ill_conditioned, random_g
from tests.loss.helpers import f64 as tensor
from tests.loss.helpers import method as load


def test_fairgrad_orthogonal_gradients_by_hand():
    """A = diag(1, 4): w_1 = w_1^(-1/α), 4·w_2 = w_2^(-1/α).

    α = 1: w = (1, 1/2), d = (1, 1), each task improves by g_t·d = 1/w_t = (1, 2).
    α = 2: w_1 = 1, w_2^(3/2) = 1/4 → w_2 = 4^(-2/3).
    """
    g = tensor([[1.0, 0.0], [0.0, 2.0]])
    update, weights = load("fairgrad").aggregate(g)
    assert torch.allclose(weights, tensor([1.0, 0.5]), rtol=1e-9)
    assert torch.allclose(update, tensor([1.0, 1.0]), rtol=1e-9)
    _, weights2 = load("fairgrad", alpha=2.0).aggregate(g)
    assert torch.allclose(weights2, tensor([1.0, 4 ** (-2 / 3)]), rtol=1e-9)


def test_fairgrad_conflicting_gradients_by_hand():
    """Unit gradients at 120° (cos = -1/2): A = [[1, -1/2], [-1/2, 1]], the root is symmetric, w/2 = 1/w → w = √2;
    each task improves by g_t·d = 1/√2 > 0 (the mean would give 1/4 each, MGDA's min-norm point too)."""
    g = tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2]])
    update, weights = load("fairgrad").aggregate(g)
    assert torch.allclose(weights, torch.full((2,), math.sqrt(2), dtype=F64), rtol=1e-9)
    assert torch.allclose(g @ update, torch.full((2,), 1 / math.sqrt(2), dtype=F64), rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("seed", range(6))
def test_fairgrad_matches_torchjd_on_random_gradients(alpha, seed):
    g = random_g(seed, shape=(2 + seed % 4, 8)) * (1 + seed)
    update, weights = load("fairgrad", alpha=alpha).aggregate(g)
    expected = TorchJDFairGrad(alpha).gramian_weighting(g @ g.T)
    assert torch.allclose(weights, expected, rtol=1e-6, atol=0)
    assert torch.allclose(update, expected @ g, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_fairgrad_solves_the_equation_at_any_gradient_scale(seed):
    g = ill_conditioned(seed, 2 + seed % 4, dim=8)  # norms over 1e-3..1e3
    w = load("fairgrad")
    _, weights = w.aggregate(g)
    assert torch.allclose((g @ g.T) @ weights, 1 / weights, rtol=1e-6)
    assert bool(w.converged) and float(w.residual) <= 1e-6
    values = w.log_values()
    assert set(values) == {f"weighting/{k}" for k in ("iterations", "residual", "converged", "fallback")}
    assert float(values["weighting/converged"]) == 1 and float(values["weighting/fallback"]) == 0


def test_fairgrad_zero_gradient_task_is_left_out_of_the_solve():
    update, weights = load("fairgrad").aggregate(tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]))
    # the others solve as if alone: (1, 1/2); the zero task reports their mean and moves nothing
    assert torch.allclose(weights, tensor([1.0, 0.75, 0.5]), rtol=1e-9)
    assert torch.allclose(update, tensor([1.0, 1.0]), rtol=1e-9)
    update, weights = load("fairgrad").aggregate(torch.zeros(3, 4, dtype=F64))
    assert (update == 0).all() and torch.allclose(weights, torch.full((3,), 1 / 3, dtype=F64))


def test_fairgrad_without_a_root_logs_and_warns_once(caplog):
    w = load("fairgrad")
    g = tensor([[1.0, 2.0], [-1.0, -2.0]])  # exactly opposite: 0 is in the convex hull, no root
    with caplog.at_level(logging.WARNING, logger="mtl_experiments.loss.solver"):
        update, weights = w.aggregate(g)
        assert torch.isfinite(update).all() and torch.isfinite(weights).all()
        assert not bool(w.converged) and float(w.iterations) >= 1
        assert float(w.log_values()["weighting/fallback"]) == 1
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 2 and any("FairGrad: no root" in m for m in warned)  # not converged + the fallback
        w.aggregate(g)  # the second failure does not warn again
        assert len(caplog.records) == 2


@pytest.mark.parametrize(
    ("key", "value"), [("alpha", 0.0), ("alpha", -1.0), ("tol", 0.0), ("max_iters", 0), ("tol_residual", -1.0)]
)
def test_fairgrad_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"loss\.{key} must .*got {value}"):
        FairGrad(**{key: value})
