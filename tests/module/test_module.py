"""The one training step (DESIGN.md §5): weights applied as specified, NaN losses stop the run."""

from __future__ import annotations

import functools

import pytest
import torch

from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.data.synthetic import SyntheticDataModule
from mtl_experiments.errors import NonFiniteLossError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.loss.fixed import Fixed
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule
from tests.conftest import bare_trainer

TASKS = {"a": {"kind": "binary"}, "b": {"kind": "regression"}}


def setup_module_and_batch(weights=None, lr=0.1):
    torch.manual_seed(0)
    dm = SyntheticDataModule(tasks=TASKS, num_samples=400, input_dim=10, batch_size=32)
    dm.setup()
    encoder = FeatureEncoder(dm.feature_spec)
    model = MultiTaskModel(encoder, SharedBottom(encoder.output_dim, list(dm.tasks), (16, 8), (4,)), dm.tasks)
    module = MTLModule(model, dm.tasks, Fixed(weights), functools.partial(torch.optim.SGD, lr=lr))
    return module, dm


def run_steps(module, dm, steps):
    trainer = bare_trainer(max_steps=steps)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_one_step_applies_the_weighted_gradient():
    """After one SGD step, θ' = θ - lr·∇(Σ_t w_t·L_t) on the first batch, for every parameter."""
    module, dm = setup_module_and_batch(weights={"a": 3.0, "b": 0.25})
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    batch = next(iter(dm.train_dataloader()))  # the loader's first batch of epoch 0 is what fit sees
    out = module.model(batch["features"])
    total = 3.0 * module.tasks["a"].loss(out["a"], batch["labels"]["a"]) + 0.25 * module.tasks["b"].loss(
        out["b"], batch["labels"]["b"]
    )
    params = dict(module.model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values())), strict=True))
    module.zero_grad()
    dm = SyntheticDataModule(tasks=TASKS, num_samples=400, input_dim=10, batch_size=32)  # fresh epoch counter
    run_steps(module, dm, steps=1)
    for name, p in module.model.named_parameters():
        assert torch.allclose(p.detach(), before[name] - 0.1 * grads[name], atol=1e-6), name


def test_gradient_clipping_is_applied_by_the_module():
    module, dm = setup_module_and_batch(lr=1.0)
    module.gradient_clip_val = 1e-3
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters()])
    run_steps(module, dm, steps=1)
    after = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)  # lr 1 x clipped norm


def test_nan_loss_stops_training_with_a_clear_message():
    module, dm = setup_module_and_batch()
    with torch.no_grad():
        module.model.heads["b"].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \{'b': nan\}.*lower the learning rate"):
        run_steps(module, dm, steps=3)
