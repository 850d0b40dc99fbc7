"""Uncertainty weighting (Kendall et al. 2018) against hand-computed and closed-form cases."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.data.synthetic import SyntheticDataModule
from mtl_experiments.errors import ConfigError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.loss.uncertainty import Uncertainty
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule
from mtl_experiments.tasks import Task, build_tasks
from tests.conftest import CONF, bare_trainer

TASKS = build_tasks({"ctr": {"kind": "binary"}, "cvr": {"kind": "binary"}, "watch": {"kind": "regression"}})


def uncertainty(tasks=TASKS, **overrides) -> Uncertainty:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "loss" / "uncertainty.yaml"), overrides)
    w = instantiate(cfg, _convert_="all")
    w.setup(tasks)
    return w


def descend_on_s(w: Uncertainty, losses: torch.Tensor, steps: int = 2000, lr: float = 0.5) -> torch.Tensor:
    """Plain gradient descent on s alone, the losses held fixed."""
    opt = torch.optim.SGD(w.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        total, _ = w(losses)
        total.backward()
        opt.step()
    return w.log_var.detach()


def test_yaml_defaults():
    w = uncertainty()
    assert w.log_var.tolist() == [0.0, 0.0, 0.0] and w.positive_regularizer is False


def test_total_and_weights_by_hand():
    # s = (0, ln 2, -ln 2), L = (1, 2, 3); ctr, cvr classification (e^-s), watch regression (0.5 e^-s)
    w = uncertainty().double()
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.0, math.log(2), -math.log(2)], dtype=torch.float64))
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    total, weights = w(losses)
    assert weights.tolist() == pytest.approx([1.0, 0.5, 1.0], abs=1e-12)
    # 1*1 + 0.5*2 + 1*3 + 0.5*(0 + ln 2 - ln 2) = 5
    assert total.item() == pytest.approx(5.0, abs=1e-12)
    assert not weights.requires_grad


def test_positive_regularizer_total_by_hand():
    w = uncertainty(positive_regularizer=True).double()
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.0, math.log(2), -math.log(2)], dtype=torch.float64))
    total, weights = w(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert weights.tolist() == pytest.approx([1.0, 0.5, 1.0], abs=1e-12)
    # 5 + log(1 + 1) + log(1 + 2) + log(1 + 1/2) = 5 + log 9
    assert total.item() == pytest.approx(5.0 + math.log(9.0), abs=1e-12)


def test_positive_regularizer_keeps_the_total_non_negative():
    w = uncertainty(positive_regularizer=True, init_log_var=-40.0)
    total, _ = w(torch.zeros(3))
    assert total.item() >= 0.0
    paper = uncertainty(init_log_var=-40.0)
    assert paper(torch.zeros(3))[0].item() == pytest.approx(-60.0)  # 3 * 0.5 * (-40): the paper's can go negative


@pytest.mark.parametrize(
    ("kind", "loss", "expected"),
    [
        ("regression", 3.0, math.log(3.0)),  # 0.5 e^-s L + 0.5 s: s* = log L
        ("regression", 1e-3, math.log(1e-3)),  # far below 0: never clamped, weight 0.5/1e-3 = 500
        ("binary", 3.0, math.log(6.0)),  # e^-s L + 0.5 s: s* = log 2L
        ("binary", 50.0, math.log(100.0)),
    ],
)
def test_stationary_point_of_the_paper_form(kind, loss, expected):
    w = uncertainty(build_tasks({"t": {"kind": kind}})).double()
    s = descend_on_s(w, torch.tensor([loss], dtype=torch.float64))
    assert s.item() == pytest.approx(expected, abs=1e-8)
    scale = 0.5 if kind == "regression" else 1.0
    assert w(torch.tensor([loss], dtype=torch.float64))[1].item() == pytest.approx(scale / math.exp(expected))


@pytest.mark.parametrize(
    ("kind", "loss", "sigma2"),
    [
        # d/ds [c e^-s L + log(1 + e^s)] = 0  <=>  c L / x = x / (1 + x) with x = e^s
        #   <=>  x^2 - cLx - cL = 0  <=>  x = (cL + sqrt(c^2 L^2 + 4 cL)) / 2
        ("regression", 4.0, 1.0 + math.sqrt(3.0)),  # c = 0.5, cL = 2: x = (2 + sqrt 12) / 2
        ("binary", 2.0, 1.0 + math.sqrt(3.0)),  # c = 1, cL = 2: the same point
        ("binary", 6.0, 3.0 + math.sqrt(15.0)),  # cL = 6: (6 + sqrt 60) / 2
    ],
)
def test_stationary_point_of_the_positive_regularizer(kind, loss, sigma2):
    w = uncertainty(build_tasks({"t": {"kind": kind}}), positive_regularizer=True).double()
    s = descend_on_s(w, torch.tensor([loss], dtype=torch.float64))
    assert s.item() == pytest.approx(math.log(sigma2), abs=1e-8)


def test_init_log_var_and_log_values():
    w = uncertainty(init_log_var=1.5)
    assert w.log_var.tolist() == [1.5, 1.5, 1.5]
    values = w.log_values()
    assert list(values) == ["uncertainty/log_var/ctr", "uncertainty/log_var/cvr", "uncertainty/log_var/watch"]
    assert all(v.item() == 1.5 and not v.requires_grad for v in values.values())


class RankingTask(Task):
    kind = "ranking"
    loss_type = "ranking"


@pytest.mark.parametrize(
    ("overrides", "tasks", "message"),
    [
        ({"init_log_var": float("nan")}, TASKS, "loss.init_log_var must be a finite number"),
        ({"init_log_var": "zero"}, TASKS, "loss.init_log_var must be a finite number"),
        ({"positive_regularizer": "yes"}, TASKS, "loss.positive_regularizer must be true or false"),
        ({}, {"r": RankingTask("r")}, "task 'r' has 'ranking'"),
    ],
)
def test_config_errors(overrides, tasks, message):
    with pytest.raises(ConfigError, match=message):
        uncertainty(tasks, **overrides)


# -- in the real module ---------------------------------------------------------------------------
MIXED = {"a": {"kind": "binary"}, "b": {"kind": "regression"}}


def build_module(optimizer):
    torch.manual_seed(0)
    dm = SyntheticDataModule(tasks=MIXED, num_samples=400, input_dim=10, batch_size=32)
    dm.setup()
    encoder = FeatureEncoder(dm.feature_spec)
    model = MultiTaskModel(encoder, SharedBottom(encoder.output_dim, list(dm.tasks), (16, 8), (4,)), dm.tasks)
    return MTLModule(model, dm.tasks, Uncertainty(), optimizer), dm


def test_log_vars_are_not_weight_decayed():
    module, _ = build_module(functools.partial(torch.optim.AdamW, lr=0.1, weight_decay=0.1))
    opt = module.configure_optimizers()
    (group,) = [g for g in opt.param_groups if any(p is module.weighting.log_var for p in g["params"])]
    assert group["weight_decay"] == 0.0 and len(group["params"]) == 1
    (model_group,) = [g for g in opt.param_groups if g is not group]
    assert model_group["weight_decay"] == 0.1
    # one AdamW step with zero gradients: only decay moves anything, so s stays where it is
    with torch.no_grad():
        module.weighting.log_var.fill_(1.0)
    weight = module.model.heads["a"].weight
    before = weight.detach().clone()
    for p in [*module.model.parameters(), module.weighting.log_var]:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert module.weighting.log_var.tolist() == [1.0, 1.0]
    assert torch.allclose(weight.detach(), before * (1 - 0.1 * 0.1))


def test_a_run_with_mixed_task_kinds_uses_each_tasks_form():
    """One SGD step: s_t' = -lr·d/ds_t at s = 0, i.e. -lr·(0.5 - L_a) (binary), -lr·(0.5 - 0.5·L_b) (regression)."""
    lr = 0.1
    module, dm = build_module(functools.partial(torch.optim.SGD, lr=lr))
    assert module.weighting.scale.tolist() == [1.0, 0.5]
    batch = next(iter(dm.train_dataloader()))  # the loader's first batch of epoch 0 is what fit sees
    with torch.no_grad():
        out = module.model(batch["features"])
        loss_a = module.tasks["a"].loss(out["a"], batch["labels"]["a"]).item()
        loss_b = module.tasks["b"].loss(out["b"], batch["labels"]["b"]).item()
    dm = SyntheticDataModule(tasks=MIXED, num_samples=400, input_dim=10, batch_size=32)  # fresh epoch counter
    trainer = bare_trainer(max_steps=1)
    trainer.fit(module, datamodule=dm)
    expected = [-lr * (0.5 - loss_a), -lr * (0.5 - 0.5 * loss_b)]
    assert module.weighting.log_var.tolist() == pytest.approx(expected, abs=1e-6)
