"""GradNorm's ||∇_W L_t|| as the step computes it (``grads.task_gradients`` over its W, each row from task t's own
loss) against a separate forward and backward of L_t alone, on every backbone of ``conf/backbone`` with three tasks."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_experiments.grads import task_gradients
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.tasks import build_tasks
from tests.conftest import CONF, backbone_task_names, options
from tests.loss.test_loss_gradnorm import encoder_with_embedding, gradnorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", options("backbone"))
def test_each_norm_is_the_norm_of_that_task_alone(name, dtype):
    torch.manual_seed(0)
    encoder = encoder_with_embedding()
    names = backbone_task_names(name, ["a", "b", "c"])
    tasks = build_tasks({n: {"kind": "binary"} for n in names})
    cfg = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
    backbone = instantiate(cfg, input_dim=encoder.output_dim, task_names=names, _convert_="all")
    model = MultiTaskModel(encoder, backbone, tasks).to(dtype)
    g = gradnorm(tasks, model=model)
    if g.layer_path is None:  # nothing shared: no W
        return
    (W,) = g.task_grad_inputs(model)
    x = {"numeric": torch.randn(16, 2, dtype=dtype), "categorical": torch.randint(0, 5, (16, 1))}
    y = {n: torch.randint(0, 2, (16,)).to(dtype) for n in names}

    def losses():
        out = model(x)
        return torch.stack([tasks[n].loss(out[n], y[n]) for n in names])  # as MTLModule stacks them

    norms = task_gradients(losses(), [W]).norm(dim=1)
    alone = []
    for t in range(len(names)):
        model.zero_grad()
        losses()[t].backward()  # a fresh graph: task t's loss alone
        alone.append(W.grad.norm())
    assert norms.dtype == dtype
    torch.testing.assert_close(norms, torch.stack(alone))
    assert len(set(alone)) == len(alone)  # the tasks' norms differ, so a row swapped between tasks would fail
