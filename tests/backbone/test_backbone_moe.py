"""OMoE / MMoE (Ma et al., KDD 2018) and their experts block: hand-checkable cases, end-to-end gate metrics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl_experiments import pipeline
from mtl_experiments.backbone.experts import Experts
from mtl_experiments.backbone.mmoe import MMoE
from mtl_experiments.backbone.omoe import OMoE
from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.errors import ConfigError

TASKS = ["a", "b", "c"]


def build(cls, **kw):
    torch.manual_seed(0)
    return cls(input_dim=6, task_names=TASKS, **{"num_experts": 4, "expert_dims": [5, 3], "tower_dims": [2], **kw})


def test_experts_are_independent_mlps_held_in_one_linear_per_layer():
    """Expert e computed by hand from its own block of each layer's weight equals the batched output."""
    torch.manual_seed(0)
    experts = Experts(in_dim=6, num_experts=3, hidden_dims=[5, 4])
    x = torch.randn(7, 6)
    out = experts(x)
    assert out.shape == (7, 3, 4)
    first, last = experts.layers
    assert experts.get_submodule(experts.last_layer_path) is last
    assert last.weight.shape == (3 * 4, 5)  # one nn.Linear spanning all experts
    for e in range(3):
        w1, b1 = first.weight[e * 5 : (e + 1) * 5], first.bias[e * 5 : (e + 1) * 5]
        w2, b2 = last.weight[e * 4 : (e + 1) * 4], last.bias[e * 4 : (e + 1) * 4]
        expected = torch.relu(torch.relu(x @ w1.T + b1) @ w2.T + b2)
        torch.testing.assert_close(out[:, e], expected)
    # expert 0's output does not depend on expert 1's weights (block-diagonal, not a dense E*in -> E*out map)
    out[:, 0].sum().backward()
    assert last.weight.grad[4:].abs().sum() == 0 and first.weight.grad[5:].abs().sum() == 0


@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_gates_are_softmaxes_summing_to_one(cls):
    backbone = build(cls)
    backbone(torch.randn(9, 6))
    assert list(backbone.gate_weights) == TASKS
    for g in backbone.gate_weights.values():
        assert g.shape == (9, 4)
        assert (g > 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(9))


def test_mmoe_gates_differ_per_task_while_omoe_has_one():
    x = torch.randn(9, 6)
    mmoe, omoe = build(MMoE), build(OMoE)
    mmoe(x), omoe(x)
    g = mmoe.gate_weights
    assert not torch.allclose(g["a"], g["b"]) and not torch.allclose(g["b"], g["c"])
    assert all(omoe.gate_weights[t] is omoe.gate_weights["a"] for t in TASKS)


@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_output_is_the_gated_sum_of_the_modules_own_expert_outputs(cls):
    backbone = build(cls)
    x = torch.randn(3, 6)
    reps = backbone(x)
    h = backbone.experts(x)  # [B, E, D]
    for t in TASKS:
        g = backbone.gate_weights[t]
        mixture = sum(g[:, e : e + 1] * h[:, e] for e in range(4))  # Σ_e g_e(x) · expert_e(x), by hand
        torch.testing.assert_close(reps[t], backbone.towers[t](mixture))
    if cls is OMoE:
        torch.testing.assert_close(backbone.representation, mixture)


@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_one_expert_is_a_shared_bottom_with_that_expert(cls):
    """E = 1: every gate is 1, so the model equals a shared-bottom whose bottom is the expert."""
    backbone = build(cls, num_experts=1)
    sb = SharedBottom(input_dim=6, task_names=TASKS, bottom_dims=[5, 3], tower_dims=[2])
    sb.bottom[0].load_state_dict(backbone.experts.layers[0].state_dict())
    sb.bottom[2].load_state_dict(backbone.experts.layers[1].state_dict())
    sb.towers.load_state_dict(backbone.towers.state_dict())
    x = torch.randn(8, 6)
    reps, expected = backbone(x), sb(x)
    for t in TASKS:
        torch.testing.assert_close(backbone.gate_weights[t], torch.ones(8, 1))
        torch.testing.assert_close(reps[t], expected[t])


def test_shared_parameters_exclude_towers_and_per_task_gates():
    mmoe, omoe = build(MMoE), build(OMoE)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(mmoe.shared_parameters()) == ids(mmoe.experts.parameters())  # a task's gate is its own
    assert ids(omoe.shared_parameters()) == ids(omoe.experts.parameters()) | ids(omoe.gate.parameters())
    for b in (mmoe, omoe):
        assert not ids(b.towers.parameters()) & ids(b.shared_parameters())
        layer = b.get_submodule(b.last_shared_layer)
        assert isinstance(layer, nn.Linear) and layer is b.experts.layers[-1]
    assert not MMoE.has_representation and OMoE.has_representation


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"num_experts": 0}, "backbone.num_experts"),
        ({"num_experts": 2.5}, r"backbone.num_experts must be an integer >= 1, got 2.5"),  # was silently 2
        ({"expert_dims": []}, "backbone.expert_dims"),
        ({"expert_dims": [4, 0]}, "backbone.expert_dims"),
        ({"tower_dims": [0]}, "backbone.tower_dims"),
        ({"dropout": 1.0}, "backbone.dropout"),
        ({"activation": "Relu"}, "backbone.activation"),
    ],
)
@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_bad_options_name_the_key(cls, kw, key):
    with pytest.raises(ConfigError, match=key):
        build(cls, **kw)


def test_gate_metrics_land_in_mlflow(make_cfg, mlflow_runs):
    overrides = ["trainer.max_epochs=1", "module.conflict.every_n_steps=5", "trainer.log_every_n_steps=5"]
    pipeline.train(make_cfg("backbone=mmoe", *overrides))
    (run,) = mlflow_runs()
    m = run.data.metrics
    for task in ("y1", "y2"):
        assert f"train/gate/entropy/{task}" in m
        assert 0 <= m[f"train/gate/entropy/{task}"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
        assert f"train/gate/utilisation/{task}/e7" in m
