"""The MMoE synthetic generator (Ma et al., KDD 2018 §3.2) and its datamodule."""

from __future__ import annotations

import pytest
import torch

from mtl_experiments.data.synthetic import SyntheticDataModule, make_synthetic, task_weight_vectors
from mtl_experiments.errors import ConfigError

TWO = {"y1": {"kind": "regression"}, "y2": {"kind": "regression"}}


def cosines(w: torch.Tensor) -> torch.Tensor:
    wn = w / w.norm(dim=1, keepdim=True)
    return wn @ wn.T


@pytest.mark.parametrize("p", [-1.0, -0.5, 0.0, 0.3, 0.9, 1.0])
def test_two_task_weight_cosine_equals_correlation(p):
    _, _, w = make_synthetic(num_samples=10, correlation=p, input_dim=20, scale=3.0, seed=1)
    assert w.shape == (2, 20)
    assert torch.allclose(w.norm(dim=1), torch.full((2,), 3.0, dtype=w.dtype), atol=1e-10)
    assert cosines(w)[0, 1].item() == pytest.approx(p, abs=1e-10)


def test_two_task_construction_is_the_papers():
    """w1 = c·u1 and w2 = c·(p·u1 + sqrt(1-p²)·u2) with orthonormal u1, u2."""
    g = torch.Generator().manual_seed(0)
    w = task_weight_vectors(2, 8, 0.6, 2.0, g)
    u1 = w[0] / 2.0
    u2 = (w[1] / 2.0 - 0.6 * u1) / 0.8
    assert u1.norm().item() == pytest.approx(1.0)
    assert u2.norm().item() == pytest.approx(1.0)
    assert (u1 @ u2).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("p", [-0.25, 0.0, 0.5, 1.0])
def test_more_tasks_have_equal_pairwise_cosines(p):
    _, y, w = make_synthetic(num_samples=10, num_tasks=5, correlation=p, input_dim=16, seed=3)
    c = cosines(w)
    off = c[~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, p), atol=1e-10)
    assert y.shape == (10, 5)


def test_targets_follow_the_formula():
    """y_k = w_kᵀx + Σ_i sin(α_i·w_kᵀx + β_i) + ε_k, recomputed by hand from the same random stream."""
    n, d, m, seed = 7, 6, 3, 11
    x, y, w = make_synthetic(num_samples=n, correlation=0.2, input_dim=d, num_sines=m, noise_std=0.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w_ref = task_weight_vectors(2, d, 0.2, 1.0, g)
    alpha = torch.randn(m, generator=g, dtype=torch.float64)
    beta = torch.randn(m, generator=g, dtype=torch.float64)
    x_ref = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert torch.equal(w, w_ref)
    for k in range(2):
        z = x_ref @ w_ref[k]
        expected = z + sum(torch.sin(alpha[i] * z + beta[i]) for i in range(m))
        assert torch.allclose(y[:, k].double(), expected, atol=1e-5)
    assert torch.allclose(x.double(), x_ref, atol=1e-6)


def test_noise_has_configured_std():
    _, y_clean, _ = make_synthetic(num_samples=20000, noise_std=0.0, seed=5)
    _, y_noisy, _ = make_synthetic(num_samples=20000, noise_std=0.1, seed=5)
    assert (y_noisy - y_clean).std().item() == pytest.approx(0.1, rel=0.03)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = make_synthetic(num_samples=50, seed=4)
    b = make_synthetic(num_samples=50, seed=4)
    c = make_synthetic(num_samples=50, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_datamodule_splits_and_binary_labels_at_train_median():
    dm = SyntheticDataModule(tasks={"a": {"kind": "binary"}, "b": {"kind": "regression"}}, num_samples=1000, seed=2)
    dm.setup()
    sizes = {k: v["labels"]["a"].shape[0] for k, v in dm.splits.items()}
    assert sizes == {"train": 800, "val": 100, "test": 100}
    train_a = dm.splits["train"]["labels"]["a"]
    assert set(train_a.unique().tolist()) == {0.0, 1.0}
    assert train_a.mean().item() == pytest.approx(0.5, abs=0.01)  # thresholded at the train median
    assert dm.splits["train"]["labels"]["b"].unique().numel() > 100  # regression stays continuous
    assert dm.feature_spec.num_numeric == 100
    assert dm.splits["train"]["features"]["numeric"].shape == (800, 100)


def test_loader_serves_whole_batches_and_covers_the_split_once():
    dm = SyntheticDataModule(tasks=TWO, num_samples=1000, batch_size=64, seed=2)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 13  # 800 rows / 64, last batch partial
    assert batches[0]["features"]["numeric"].shape == (64, 100)
    seen = torch.cat([b["labels"]["y1"] for b in batches])
    assert torch.equal(seen.sort().values, dm.splits["train"]["labels"]["y1"].sort().values)
    second_epoch = next(iter(loader))["labels"]["y1"]
    assert not torch.equal(second_epoch, batches[0]["labels"]["y1"])  # reshuffled each epoch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"correlation": 1.5}, "correlation must be a number in [-1, 1], got 1.5"),
        ({"correlation": -1.01}, "correlation must be a number in [-1, 1], got -1.01"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"num_samples": -10}, "num_samples must be an integer >= 1, got -10"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"input_dim": 0}, "input_dim must be an integer >= 1, got 0"),
        ({"num_samples": 5}, "too small"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum to < 1"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SyntheticDataModule(tasks=TWO, **kwargs)


def test_impossible_correlation_for_many_tasks():
    tasks = {f"t{i}": {"kind": "regression"} for i in range(4)}
    with pytest.raises(ConfigError, match=r"-1/\(T-1\)"):
        SyntheticDataModule(tasks=tasks, correlation=-0.5)
