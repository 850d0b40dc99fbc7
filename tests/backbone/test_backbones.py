"""Backbone contract, parametrized over every conf/backbone/*.yaml (a new file is enrolled automatically)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import CONF, backbone_task_names, options

TASKS = ["a", "b", "c"]  # for backbones that take any task set; others get the ones they require


def build(name: str, input_dim: int = 12):
    cfg = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
    names = backbone_task_names(name, TASKS)
    return instantiate(cfg, _partial_=True, _convert_="all")(input_dim=input_dim, task_names=names)


@pytest.mark.parametrize("name", options("backbone"))
def test_yaml_points_at_the_file_of_the_same_name(name):
    target = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")._target_
    assert target.startswith(f"mtl_experiments.backbone.{name}.")


@pytest.mark.parametrize("name", options("backbone"))
def test_one_representation_per_task(name):
    torch.manual_seed(0)
    backbone = build(name)
    reps = backbone(torch.randn(5, 12))
    assert list(reps) == backbone.task_names == backbone_task_names(name, TASKS)
    assert all(r.shape == (5, backbone.output_dim) for r in reps.values())


@pytest.mark.parametrize("name", options("backbone"))
def test_combine_keeps_one_finite_output_per_task(name):
    torch.manual_seed(0)
    backbone = build(name)
    outputs = {t: torch.randn(5, 1) for t in backbone.task_names}
    combined = backbone.combine(dict(outputs))
    assert list(combined) == list(outputs)
    assert all(v.shape == (5, 1) and torch.isfinite(v).all() for v in combined.values())


@pytest.mark.parametrize("name", options("backbone"))
def test_shared_parameters_are_exactly_those_every_task_reaches(name):
    """shared_parameters() = dense parameters that receive gradient from more than one task's output after
    the heads and ``combine`` (so a backbone that ties tasks, like ESMM, is checked by its own definition);
    no embeddings."""
    torch.manual_seed(0)
    backbone = build(name)
    x = torch.randn(8, 12)
    heads = {t: torch.randn(backbone.output_dim, 1) for t in backbone.task_names}  # fixed linear heads
    reached: dict[int, set[str]] = {}
    for t in backbone.task_names:
        backbone.zero_grad()
        outputs = backbone.combine({task: rep @ heads[task] for task, rep in backbone(x).items()})
        outputs[t].square().sum().backward()
        for p in backbone.parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                reached.setdefault(id(p), set()).add(t)
    multi = {pid for pid, ts in reached.items() if len(ts) > 1}
    shared = backbone.shared_parameters()
    assert {id(p) for p in shared} == multi
    assert not any(isinstance(m, nn.Embedding) for m in backbone.modules())
    if shared:
        layer = backbone.get_submodule(backbone.last_shared_layer)
        assert isinstance(layer, nn.Linear)
        assert any(layer.weight is p for p in shared)
    else:
        assert backbone.last_shared_layer is None
