"""The Gramian path (``loss.base.gramian``/``combine``/``GramianAggregation``, issue 17): the methods whose weights
depend on G only through K = G Gᵀ solve the T×T problem and form the update once, without a float64 copy of G.

Checked by hand, then against the previous path (K and the update from ``G.double()`` in one piece; MGDA's coordinates
from the QR of Gᵀ) on many random Jacobians, float32 and float64, with more columns than one block so the blocked
sums really run. Every ``conf/loss/*.yaml`` whose method is a ``GramianAggregation`` is enrolled.
"""

from __future__ import annotations

import pytest
import torch
from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator

from mtl_experiments.loss import base
from mtl_experiments.loss.base import BLOCK, GramianAggregation, combine, gramian
from mtl_experiments.loss.mgda import coordinates, min_norm_weights
from mtl_experiments.loss.torchjd import TorchJD
from tests.conftest import CONF
from tests.loss.property_testers import fresh

DTYPES = (torch.float32, torch.float64)
METHODS = sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))
GRAMIAN_METHODS = [m for m in METHODS if isinstance(fresh(m, 2), GramianAggregation)]
# TorchJD's aggregators that weight the rows from the Gramian alone (Aligned-MTL, PCGrad, ...)
TORCHJD_GRAMIAN = [
    m
    for m in METHODS
    if isinstance(fresh(m, 2), TorchJD) and isinstance(fresh(m, 2).aggregator, GramianWeightedAggregator)
]


@pytest.fixture
def blocks(monkeypatch):
    """Column blocks from one block's width on (the code's threshold is 512k columns: too wide for a unit test)."""
    monkeypatch.setattr(base, "BLOCKED_ABOVE", BLOCK)


def random_jacobian(seed: int, dtype: torch.dtype, columns: int | None = None) -> torch.Tensor:
    """T = 2..5 Gaussian rows with norms log-uniform over 1e-3..1e3 and a common component (correlated tasks, as
    in training), more columns than one block unless ``columns`` is given."""
    gen = torch.Generator().manual_seed(seed)
    t, p = 2 + seed % 4, columns or BLOCK + 1 + seed * 97
    g = torch.randn(t, p, generator=gen, dtype=torch.float64) + torch.randn(p, generator=gen, dtype=torch.float64)
    norms = 10 ** (6 * torch.rand(t, 1, generator=gen, dtype=torch.float64) - 3)
    return (g / g.norm(dim=1, keepdim=True) * norms).to(dtype)


def test_gramian_and_combine_by_hand():
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert gramian(g).tolist() == [[5.0, 11.0], [11.0, 25.0]] and gramian(g).dtype == torch.float64
    update = combine(torch.tensor([0.5, -1.0], dtype=torch.float64), g)
    assert update.tolist() == [-2.5, -3.0] and update.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_gramian_and_combine_equal_the_float64_copy(dtype, blocks):
    """Over several column blocks, K and wᵀG equal those of ``G.double()`` to float64 rounding (the products of
    float32 entries are exact in float64), and the update is rounded to G's dtype once."""
    for seed in range(10):
        g = random_jacobian(seed, dtype, columns=3 * BLOCK + 7 * seed)
        g64 = g.double()
        scale = torch.outer(g64.norm(dim=1), g64.norm(dim=1))
        assert ((gramian(g) - g64 @ g64.T).abs() <= 1e-13 * scale).all()
        w = torch.randn(g.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = w @ g64
        got = combine(w, g)
        assert got.dtype == dtype
        bound = 1e-13 * (w.abs() @ g64.abs()) + torch.finfo(dtype).eps * expected.abs()
        assert ((got.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mgda_coordinates_from_the_gramian_are_the_qr_ones(dtype):
    """L Lᵀ = K, each row keeps its gradient's norm, and Wolfe's weights on them are the weights on the QR coordinates
    of Gᵀ (the previous path), on random Jacobians with norms over six decades."""
    for seed in range(100):
        g64 = random_jacobian(seed, dtype, columns=3 + seed % 5).double()
        gram = g64 @ g64.T
        points = torch.from_numpy(coordinates(gram.numpy()))
        scale = torch.outer(g64.norm(dim=1), g64.norm(dim=1))
        assert ((points @ points.T - gram).abs() <= 1e-12 * scale).all(), seed
        assert torch.allclose(points.norm(dim=1), g64.norm(dim=1), rtol=1e-14)
        w_new, _, converged = min_norm_weights(points.numpy(), 1e-8, 100)
        w_old, _, _ = min_norm_weights(torch.linalg.qr(g64.T, mode="r").R.T.numpy(), 1e-8, 100)
        d_new, d_old = torch.from_numpy(w_new) @ g64, torch.from_numpy(w_old) @ g64
        assert converged and float((d_new - d_old).norm()) <= 1e-6 * max(float(d_old.norm()), 1e-9 * float(scale.max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_gramian_path_equals_the_float64_copy_path(name, dtype, blocks):
    """``aggregate(G)`` (blocked K, ``weigh``, blocked wᵀG) = the previous path: K and the update from ``G.double()``
    in one piece, the same weighting; on random Jacobians, each call on a fresh instance (no state carried)."""
    for seed in range(8):
        g = random_jacobian(seed, dtype)
        update, weights = fresh(name, g.shape[0]).aggregate(g)
        g64 = g.double()
        w_ref = fresh(name, g.shape[0]).weigh(g64 @ g64.T)
        u_ref = (w_ref @ g64).to(dtype)
        assert update.dtype == dtype and weights.dtype == dtype
        assert torch.allclose(weights.double(), w_ref, rtol=1e-6, atol=1e-9 * float(w_ref.abs().max())), (seed, name)
        tol = (1e-5 if dtype == torch.float32 else 1e-9) * float(g64.norm(dim=1).max() * w_ref.abs().sum())
        assert float((update.double() - u_ref.double()).norm()) <= tol, (seed, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TORCHJD_GRAMIAN)
def test_torchjd_gramian_path_equals_its_jacobian_path(name, dtype):
    """The adapter hands a ``GramianWeightedAggregator`` our blocked K; the previous path (its weighting composed with
    TorchJD's own Gramian of ``G.double()``, as a plain ``WeightedAggregator``) gives the same update and weights
    (both instances fresh: the same seeded draws)."""
    for seed in range(8):
        g = random_jacobian(seed, dtype)
        update, weights = fresh(name, g.shape[0]).aggregate(g)
        ref = fresh(name, g.shape[0])
        ref.aggregator = WeightedAggregator(ref.aggregator.weighting)
        u_ref, w_ref = ref.aggregate(g)
        assert torch.allclose(weights.double(), w_ref.double(), rtol=1e-5), (seed, name)
        tol = (1e-5 if dtype == torch.float32 else 1e-9) * float(g.double().norm(dim=1).max() * w_ref.abs().sum())
        assert float((update.double() - u_ref.double()).norm()) <= tol, (seed, name)
