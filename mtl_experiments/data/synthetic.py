"""Synthetic multi-task regression data with controllable task correlation.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018, §3.2. For two tasks: orthogonal unit vectors u1, u2; w1 = c·u1, w2 = c·(p·u1 + sqrt(1-p²)·u2),
so cos(w1, w2) = p; x ~ N(0, I_d); y_k = w_kᵀx + Σ_{i=1..m} sin(α_i·w_kᵀx + β_i) + ε_k with
α_i, β_i ~ N(0, 1) shared by all tasks and ε_k ~ N(0, noise_std²) (the paper: variance 0.01).

Variant for T > 2 tasks (ours): W = c·L·U where U holds T orthonormal rows and L is the Cholesky factor
of the T×T matrix with ones on the diagonal and p elsewhere. Every pair of weight vectors then has
cosine exactly p, and for T = 2 this reduces to the paper's construction (L = [[1, 0], [p, √(1-p²)]]).
It needs p ≥ -1/(T-1) (that matrix must be positive semi-definite) and d ≥ T.

A task of kind ``binary`` thresholds its target at the training split's median (balanced classes);
``regression`` keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.data.spec import FeatureSpec, LabelType, Splits
from mtl_experiments.errors import ConfigError


def task_weight_vectors(
    num_tasks: int, input_dim: int, correlation: float, scale: float, generator: torch.Generator
) -> Tensor:
    """``W[T, d]`` with ||w_k|| = scale and cos(w_i, w_j) = correlation for every i != j."""
    p = float(correlation)
    # orthonormal u_1..u_T: QR of a Gaussian matrix (float64 so the realised cosine is exact)
    u, _ = torch.linalg.qr(torch.randn(input_dim, num_tasks, generator=generator, dtype=torch.float64))
    gram = torch.full((num_tasks, num_tasks), p, dtype=torch.float64)
    gram.fill_diagonal_(1.0)
    return scale * _psd_cholesky(gram) @ u.T


def _psd_cholesky(a: Tensor) -> Tensor:
    """Lower-triangular L with L·Lᵀ = a for a positive *semi*-definite a.

    ``torch.linalg.cholesky`` rejects the singular boundary cases p = 1 and p = -1/(T-1) (e.g. p = -1 for
    two tasks); a zero pivot here just leaves its column zero, which is the limit of the factor.
    """
    n = a.shape[0]
    lower = torch.zeros_like(a)
    for j in range(n):
        pivot = a[j, j] - lower[j, :j].square().sum()
        lower[j, j] = pivot.clamp_min(0).sqrt()
        if lower[j, j] > 1e-12:
            lower[j + 1 :, j] = (a[j + 1 :, j] - lower[j + 1 :, :j] @ lower[j, :j]) / lower[j, j]
    return lower


def make_synthetic(
    num_samples: int,
    num_tasks: int = 2,
    correlation: float = 0.5,
    input_dim: int = 100,
    num_sines: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``x[N, d]`` (float32), continuous targets ``y[N, T]`` (float32) and ``W[T, d]`` (float64)."""
    g = torch.Generator().manual_seed(int(seed))
    w = task_weight_vectors(num_tasks, input_dim, correlation, scale, g)
    alpha = torch.randn(num_sines, generator=g, dtype=torch.float64)
    beta = torch.randn(num_sines, generator=g, dtype=torch.float64)
    x = torch.randn(num_samples, input_dim, generator=g, dtype=torch.float64)
    z = x @ w.T  # [N, T]: w_kᵀx
    y = z + torch.sin(z.unsqueeze(-1) * alpha + beta).sum(-1)
    y = y + noise_std * torch.randn(z.shape, generator=g, dtype=torch.float64)
    return x.float(), y.float(), w


class SyntheticDataModule(TabularDataModule):
    """The MMoE synthetic benchmark, generated in memory; deterministic for ``seed``.

    ``seed`` fixes the dataset itself (so ``seed=0,1,2`` sweeps of the run vary the model, not the
    data); ``val_fraction`` / ``test_fraction`` of the samples form the validation and test splits.
    """

    def __init__(
        self,
        tasks: Mapping,
        num_samples: int = 20000,
        correlation: float = 0.5,
        input_dim: int = 100,
        num_sines: int = 10,
        scale: float = 1.0,
        noise_std: float = 0.1,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        **kwargs,
    ):
        super().__init__(tasks=tasks, **kwargs)
        t = len(self.tasks)
        correlation = checks.number("data.correlation", correlation, low=-1.0, high=1.0, hint="it is a cosine")
        if t > 2 and correlation < -1.0 / (t - 1):
            raise ConfigError(
                f"data.correlation={correlation} is impossible for {t} tasks: equal pairwise "
                f"cosines need correlation >= -1/(T-1) = {-1.0 / (t - 1):.4f}."
            )
        num_samples = checks.positive_int("data.num_samples", num_samples)
        input_dim = checks.positive_int("data.input_dim", input_dim)
        if input_dim < t:
            raise ConfigError(f"data.input_dim={input_dim} must be >= the number of tasks ({t}).")
        checks.non_negative_int("data.num_sines", num_sines)
        checks.non_negative_number("data.noise_std", noise_std)
        checks.positive_number("data.scale", scale)
        for key, value in {"val_fraction": val_fraction, "test_fraction": test_fraction}.items():
            checks.fraction(f"data.{key}", value, open_low=True, open_high=True)
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction must sum to < 1 (the rest trains), got {val_fraction} + "
                f"{test_fraction}."
            )
        n_val, n_test = math.floor(num_samples * val_fraction), math.floor(num_samples * test_fraction)
        if min(n_val, n_test, int(num_samples) - n_val - n_test) < 1:
            raise ConfigError(
                f"data.num_samples={num_samples} is too small to give non-empty train/val/test "
                "splits with these fractions."
            )
        bad = [n for n, task in self.tasks.items() if task.label_type not in (LabelType.BINARY, LabelType.REAL)]
        if bad:
            raise ConfigError(
                f"The synthetic dataset makes binary or regression targets; task(s) {bad} have another kind."
            )
        self.params = dict(
            num_samples=int(num_samples),
            num_tasks=t,
            correlation=float(correlation),
            input_dim=int(input_dim),
            num_sines=int(num_sines),
            scale=float(scale),
            noise_std=float(noise_std),
            seed=int(seed),
        )
        self.n_val, self.n_test = n_val, n_test

    def load(self) -> Splits:
        x, y, self.weight_vectors = make_synthetic(**self.params)
        # the split permutation has its own stream so changing the split leaves the data unchanged
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.params["seed"] + 1))
        parts = {
            "val": order[: self.n_val],
            "test": order[self.n_val : self.n_val + self.n_test],
            "train": order[self.n_val + self.n_test :],
        }
        train_median = y[parts["train"]].median(dim=0).values
        splits = {}
        for split, idx in parts.items():
            labels = {}
            for k, (name, task) in enumerate(self.tasks.items()):
                target = y[idx, k]
                binary = task.label_type is LabelType.BINARY
                labels[name] = (target > train_median[k]).float() if binary else target
            splits[split] = {"features": {"numeric": x[idx].contiguous()}, "labels": labels}
        spec = FeatureSpec(numeric=tuple(f"x{i}" for i in range(self.params["input_dim"])))
        return Splits(splits["train"], splits["val"], splits["test"], spec)
