"""CGC / PLE (Tang et al., RecSys 2020) and cross-stitch (Misra et al., CVPR 2016) backbones."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from mtl_experiments.backbone.base import mlp
from mtl_experiments.backbone.cgc import CGC
from mtl_experiments.backbone.cross_stitch import CrossStitch
from mtl_experiments.backbone.ple import PLE
from mtl_experiments.errors import ConfigError
from mtl_experiments.pipeline import train
from tests.conftest import CONF

TASKS = ["a", "b", "c"]
SIZES = dict(num_shared_experts=3, num_task_experts=2, expert_dims=[8, 6], tower_dims=[4])


def reached_by_several_tasks(backbone: nn.Module, x: torch.Tensor) -> set[int]:
    reached: dict[int, set[str]] = {}
    for t in backbone.task_names:
        backbone.zero_grad()
        backbone(x)[t].square().sum().backward()
        for p in backbone.parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                reached.setdefault(id(p), set()).add(t)
    return {pid for pid, ts in reached.items() if len(ts) > 1}


def test_ple_with_one_level_is_cgc():
    torch.manual_seed(0)
    cgc = CGC(10, TASKS, **SIZES)
    torch.manual_seed(1)
    ple = PLE(10, TASKS, num_levels=1, **SIZES)
    assert list(ple.state_dict()) == list(cgc.state_dict())
    ple.load_state_dict(cgc.state_dict())
    x = torch.randn(7, 10)
    out_c, out_p = cgc(x), ple(x)
    for t in TASKS:
        torch.testing.assert_close(out_p[t], out_c[t], rtol=0, atol=0)
        torch.testing.assert_close(ple.gate_weights[t], cgc.gate_weights[t], rtol=0, atol=0)
    assert {id(p) for p in ple.shared_parameters()} == {id(p) for p in ple.levels[0].shared_experts.parameters()}
    # the YAML of ple with num_levels: 1 builds the same module tree as the YAML of cgc
    cfg = OmegaConf.load(CONF / "backbone" / "ple.yaml")
    cfg.num_levels = 1
    from_yaml = instantiate(cfg, input_dim=10, task_names=TASKS, _convert_="all")
    ref = instantiate(OmegaConf.load(CONF / "backbone" / "cgc.yaml"), input_dim=10, task_names=TASKS, _convert_="all")
    assert {k: v.shape for k, v in from_yaml.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_gates_sum_to_one_and_cover_only_own_and_shared_experts(num_levels):
    torch.manual_seed(0)
    model = PLE(10, TASKS, num_levels=num_levels, **SIZES)
    x = torch.randn(6, 10)
    out = model(x)
    m_k, m_s = SIZES["num_task_experts"], SIZES["num_shared_experts"]
    assert set(model.gate_weights) == set(TASKS)
    for g in model.gate_weights.values():
        assert g.shape == (6, m_k + m_s)
        torch.testing.assert_close(g.sum(-1), torch.ones(6))
        assert (g >= 0).all()
    for j, level in enumerate(model.levels):  # shared gates (all but the last level) cover ALL the level's experts
        if j < num_levels - 1:
            assert level.shared_gate[0].out_features == len(TASKS) * m_k + m_s
        else:
            assert level.shared_gate is None
    # task a's output never depends on task b's specific experts of the last level
    with torch.no_grad():
        for p in model.levels[-1].task_experts["b"].parameters():
            p.add_(torch.randn_like(p))
    again = model(x)
    torch.testing.assert_close(again["a"], out["a"], rtol=0, atol=0)
    assert not torch.equal(again["b"], out["b"])


@pytest.mark.parametrize("num_levels", [1, 2, 3, 4])
@pytest.mark.parametrize("tasks", [["a", "b"], TASKS])
def test_ple_shared_parameters_are_exactly_those_several_tasks_reach(num_levels, tasks):
    torch.manual_seed(0)
    model = PLE(10, tasks, num_levels=num_levels, **SIZES)
    shared = model.shared_parameters()
    assert {id(p) for p in shared} == reached_by_several_tasks(model, torch.randn(16, 10))
    assert len({id(p) for p in shared}) == len(shared)
    layer = model.get_submodule(model.last_shared_layer)
    assert isinstance(layer, nn.Linear) and any(layer.weight is p for p in shared)


def test_one_task_shares_nothing():
    for model in (PLE(10, ["a"], num_levels=2, **SIZES), CrossStitch(10, ["a"], [8, 6], [4])):
        assert model.shared_parameters() == [] and model.last_shared_layer is None
        assert model(torch.randn(3, 10))["a"].shape == (3, model.output_dim)


def test_cross_stitch_with_identity_alphas_is_independent_columns():
    torch.manual_seed(0)
    model = CrossStitch(10, TASKS, column_dims=[8, 6], tower_dims=[5, 4])
    with torch.no_grad():
        for alpha in model.alphas:
            alpha.copy_(torch.eye(len(TASKS)))
    x = torch.randn(9, 10)
    out = model(x)
    for t in TASKS:
        separate = mlp(10, [8, 6, 5, 4])  # one plain MLP per task, given that task's column + tower weights
        ours = [m for m in [*model.columns[t].modules(), *model.towers[t].modules()] if isinstance(m, nn.Linear)]
        theirs = [m for m in separate.modules() if isinstance(m, nn.Linear)]
        assert len(ours) == len(theirs) == 4
        for a, b in zip(ours, theirs, strict=True):
            b.load_state_dict(a.state_dict())
        torch.testing.assert_close(out[t], separate(x))


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_cross_stitch_initial_alphas_are_convex_rows(num_tasks):
    tasks = [f"t{i}" for i in range(num_tasks)]
    model = CrossStitch(10, tasks, column_dims=[8, 6], tower_dims=[4], alpha_self=0.9)
    assert len(model.alphas) == 2
    for alpha in model.alphas:
        assert alpha.shape == (num_tasks, num_tasks)
        torch.testing.assert_close(alpha.sum(1), torch.ones(num_tasks))
        torch.testing.assert_close(alpha.diagonal(), torch.full((num_tasks,), 0.9))
        off = alpha[~torch.eye(num_tasks, dtype=torch.bool)]
        torch.testing.assert_close(off, torch.full_like(off, 0.1 / (num_tasks - 1)))
    shared = model.shared_parameters()
    assert {id(p) for p in shared} == reached_by_several_tasks(model, torch.randn(16, 10))
    assert model.get_submodule(model.last_shared_layer) is model.columns["t0"][1][0]


@pytest.mark.parametrize(
    ("cls", "kwargs", "key"),
    [
        (PLE, dict(num_levels=0), "backbone.num_levels"),
        (PLE, dict(num_levels=1.5), "backbone.num_levels"),
        (PLE, dict(num_shared_experts=0), "backbone.num_shared_experts"),
        (CGC, dict(num_task_experts=0), "backbone.num_task_experts"),
        (CGC, dict(expert_dims=[]), "backbone.expert_dims"),
        (CGC, dict(activation="Nope"), "backbone.activation"),
        (CrossStitch, dict(column_dims=[]), "backbone.column_dims"),
        (CrossStitch, dict(alpha_self=1.5), "backbone.alpha_self"),
        (CrossStitch, dict(tower_dims=[0]), "backbone.tower_dims"),
    ],
)
def test_invalid_options_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cls(10, TASKS, **kwargs)


def test_ple_trains_end_to_end(make_cfg, mlflow_runs):
    train(make_cfg("backbone=ple", "trainer.max_epochs=1", "data.num_samples=600"))
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
