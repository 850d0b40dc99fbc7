"""What the loss tests share: task sets, loaders of conf/loss/<name>.yaml, small tensors, random gradients, a toy
problem and a real Lightning fit."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.data.synthetic import SyntheticDataModule
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule
from mtl_experiments.tasks import build_tasks
from tests.conftest import bare_trainer, load_weighting

F64 = torch.float64
TWO = build_tasks({"a": {"kind": "binary"}, "b": {"kind": "regression"}})
THREE = build_tasks({"a": {"kind": "binary"}, "b": {"kind": "binary"}, "c": {"kind": "regression"}})
CTR_CVR_WATCH = build_tasks({"ctr": {"kind": "binary"}, "cvr": {"kind": "binary"}, "watch": {"kind": "regression"}})


def method(name: str, tasks=TWO, **overrides):
    """``conf/loss/<name>.yaml`` (+ overrides) instantiated as the pipeline does and set up for ``tasks``."""
    return load_weighting(name, tasks, **overrides)


def with_yaml_defaults(name: str, cls: type):
    """``conf/loss/<name>.yaml`` as it ships: an instance of ``cls`` on the shared parameters (checked), returned."""
    w = method(name)
    assert type(w) is cls and w.grad_source == "params"
    return w


def assert_fails_before_tracking(make_cfg, mlflow_runs, overrides: list[str], message: str) -> None:
    """``train.py <overrides>`` stops with a ConfigError matching ``message`` before any MLflow run exists."""
    from mtl_experiments.errors import ConfigError
    from mtl_experiments.pipeline import train

    with pytest.raises(ConfigError, match=message):
        train(make_cfg(*overrides))
    assert mlflow_runs() == []


def vec(*values: float) -> torch.Tensor:
    """A float32 vector of losses: ``vec(1.0, 4.0)``."""
    return torch.tensor(values)


def f64(rows) -> torch.Tensor:
    """A float64 tensor from nested lists: ``f64([[1, 0], [-1, 1]])``."""
    return torch.tensor(rows, dtype=F64)


def random_g(seed: int, shape=(3, 6)) -> torch.Tensor:
    """Standard normal task gradients ``[T, P]`` (float64) from ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ill_conditioned(seed: int, num_tasks: int, dim: int) -> torch.Tensor:
    """Random task gradients with norms spread log-uniformly over 1e-3..1e3."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(num_tasks, dim, generator=gen, dtype=F64)
    norms = 10 ** (6 * torch.rand(num_tasks, generator=gen, dtype=F64) - 3)
    return g / g.norm(dim=1, keepdim=True) * norms.unsqueeze(1)


def toy_problem():
    """Three losses that share the parameter ``theta``."""
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    losses = torch.stack([(theta**2).sum(), (theta - 1).abs().sum(), (theta * 3).sin().sum() + 2])
    return theta, losses


def fit(weighting, max_epochs=None, max_steps=-1):
    """A real MTLModule fit on tiny synthetic data (as tests/test_module.py builds it)."""
    torch.manual_seed(0)
    task_cfg = {"a": {"kind": "binary"}, "b": {"kind": "regression"}}
    dm = SyntheticDataModule(tasks=task_cfg, num_samples=256, input_dim=6, batch_size=64)
    dm.setup()
    encoder = FeatureEncoder(dm.feature_spec)
    model = MultiTaskModel(encoder, SharedBottom(encoder.output_dim, list(dm.tasks), (8,), (4,)), dm.tasks)
    module = MTLModule(model, dm.tasks, weighting, functools.partial(torch.optim.SGD, lr=0.05), train_metrics=False)
    trainer = bare_trainer(max_epochs=max_epochs, max_steps=max_steps)
    trainer.fit(module, datamodule=dm)
    return module


class ParameterSnapshot(pl.Callback):
    """Saves ``{"before": ..., "after": ...}``, the model's parameters at the start and at the end of fit, to ``path``
    (``+callbacks.snapshot={_target_: tests.loss.helpers.ParameterSnapshot, path: ...}``)."""

    def __init__(self, path: str):
        self.path, self.before = path, {}

    @staticmethod
    def parameters(module) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in module.model.named_parameters()}

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = self.parameters(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"before": self.before, "after": self.parameters(pl_module)}, self.path)
