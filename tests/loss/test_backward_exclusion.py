"""The real backward leaves out the parameters a weighting sets itself (``loss.base.backward_for``): the shared
parameters of a gradient method, GradNorm's W. One step's gradients must equal those of the full backward followed by
the overwrite, for every conf/loss/*.yaml, on an MMoE with an embedding table below its experts, float32 and float64;
no parameter outside the excluded ones may be left without its gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.distributed import HashStore

from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.base import GradientAggregation, backward_excluding, backward_for
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.tasks import build_tasks
from tests.conftest import CONF, load_weighting, options
from tests.loss.test_loss_gradnorm import encoder_with_embedding

NAMES = ["a", "b", "c"]
TASKS = build_tasks({"a": {"kind": "binary"}, "b": {"kind": "binary"}, "c": {"kind": "regression"}})


class Recorder:
    """A ``backward`` (Lightning's ``manual_backward`` stand-in: ``total.backward(**kwargs)``) that keeps its kwargs."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, total, **kwargs):
        self.calls.append(kwargs)
        total.backward(**kwargs)


def mmoe(dtype: torch.dtype) -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = encoder_with_embedding()
    cfg = OmegaConf.load(CONF / "backbone" / "mmoe.yaml")
    backbone = instantiate(cfg, input_dim=encoder.output_dim, task_names=NAMES, _convert_="all")
    return MultiTaskModel(encoder, backbone, TASKS).to(dtype)


def one_step(model: MultiTaskModel, weighting, backward_fn, dtype: torch.dtype) -> None:
    """Forward, G (as ``grads.plan`` takes it), the weighting's backward: the training step up to clipping."""
    torch.manual_seed(2)  # dropout, and a method drawing from the global RNG, draw the same on both paths
    gen = torch.Generator().manual_seed(1)
    x = {"numeric": torch.randn(32, 2, generator=gen, dtype=dtype), "categorical": torch.randint(0, 5, (32, 1))}
    y = {n: torch.randint(0, 2, (32,), generator=gen).to(dtype) for n in NAMES}
    out = model(x)
    losses = torch.stack([TASKS[n].loss(out[n], y[n]) for n in NAMES])
    grads = task_gradients(losses, weighting.task_grad_inputs(model)) if weighting.needs_task_grads else None
    weighting.backward(losses, grads, model.shared_parameters(), backward_fn)


def optimizer_of(model: nn.Module, weighting: nn.Module) -> torch.optim.Optimizer:
    """Groups as ``MTLModule.configure_optimizers`` makes them."""
    own = [p for p in weighting.parameters() if p.requires_grad]
    return torch.optim.SGD([{"params": list(model.parameters())}, *([{"params": own}] if own else [])], lr=0.1)


def assert_same_gradients(full: nn.Module, excluded: nn.Module, tol: dict) -> None:
    for (name, p), q in zip(full.named_parameters(), excluded.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), f"{name}: gradient {'left out' if q.grad is None else 'added'}"
        if p.grad is not None:
            torch.testing.assert_close(q.grad.to_dense(), p.grad.to_dense(), **tol, msg=name)


def expected_exclusion(weighting, model) -> set[int]:
    if type(weighting).__name__ == "ExcessMTL":  # its own backward, of Σ_t w_t·L_t: nothing overwritten
        return set()
    if isinstance(weighting, GradientAggregation) and weighting.grad_source == "params":
        return {id(p) for p in model.shared_parameters()}
    if weighting.needs_task_grads and weighting.grad_source == "params":  # GradNorm: its W
        return {id(p) for p in weighting.task_grad_inputs(model)}
    return set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", options("loss"))
def test_excluding_gives_the_full_backwards_gradients(name, dtype):
    full_model = mmoe(dtype)
    model = copy.deepcopy(full_model)
    full_w, w = load_weighting(name), load_weighting(name)
    full_w.setup(TASKS, full_model)
    w.setup(TASKS, model)
    if dtype == torch.float64:  # as trainer.precision=64-true casts the whole module; 32 casts nothing
        full_w.double(), w.double()
    one_step(full_model, full_w, lambda total, exclude=(): total.backward(), dtype)
    recorder = Recorder()
    one_step(model, w, backward_for(recorder, optimizer_of(model, w)), dtype)
    assert len(recorder.calls) == 1
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert_same_gradients(full_model, model, tol)
    assert_same_gradients(full_w, w, tol)
    left_out = expected_exclusion(w, model)
    # the backward really skipped them (a method that excluded nothing would pass the comparison above too)
    inputs = {id(p) for p in recorder.calls[0].get("inputs", [*model.parameters(), *w.parameters()])}
    assert not inputs & left_out and inputs | left_out >= {id(p) for p in model.parameters()}


class ScaledSum(GradientAggregation):
    """A gradient method with a parameter of its own (a learned scale on the losses): it must keep its gradient."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def aggregate(self, grads):
        return grads.sum(0), torch.ones(grads.shape[0], dtype=grads.dtype)

    def backward(self, losses, task_grads, shared_params, backward_fn):
        return super().backward(
            losses * self.scale, task_grads, shared_params, lambda t, exclude=(): backward_fn(t, exclude=exclude)
        )


def test_a_weightings_own_parameters_keep_their_gradient():
    full_model, full_w = mmoe(torch.float64), ScaledSum()
    model, w = copy.deepcopy(full_model), ScaledSum()
    for m, weighting in ((full_model, full_w), (model, w)):
        weighting.setup(TASKS, m)
        weighting.double()
    one_step(full_model, full_w, lambda total, exclude=(): total.backward(), torch.float64)
    one_step(model, w, backward_for(Recorder(), optimizer_of(model, w)), torch.float64)
    assert w.scale.grad is not None and full_w.scale.grad is not None
    assert_same_gradients(full_model, model, {"rtol": 1e-10, "atol": 1e-12})
    torch.testing.assert_close(w.scale.grad, full_w.scale.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_embedding_below_an_excluded_layer(dtype):
    """A sparse id table below the excluded shared layer still gets its (sparse) gradient, equal to the full one."""
    torch.manual_seed(3)
    table, shared, heads = (m.to(dtype) for m in (nn.Embedding(50, 8, sparse=True), nn.Linear(8, 8), nn.Linear(8, 2)))
    params = [*table.parameters(), *shared.parameters(), *heads.parameters()]
    ids = torch.randint(0, 50, (64,))
    grads = []
    for exclude in ((), list(shared.parameters())):
        for p in params:
            p.grad = None
        out = heads(torch.relu(shared(table(ids)))).sum()
        backward_excluding(Recorder(), out, params, exclude)
        grads.append([None if p.grad is None else p.grad.to_dense().clone() for p in params])
    assert grads[1][0] is not None and grads[1][1] is None and grads[1][2] is None
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][3:], grads[0][3:])


def test_nothing_left_means_no_call_and_distributed_means_nothing_excluded():
    layer = nn.Linear(3, 1)
    total = layer(torch.randn(4, 3)).sum()
    recorder = Recorder()
    backward_excluding(recorder, total, layer.parameters(), list(layer.parameters()))
    assert recorder.calls == [] and layer.weight.grad is None
    # under torch.distributed (DDP) every parameter's gradient is computed: DDP's reducer waits for all of them
    torch.distributed.init_process_group("gloo", store=HashStore(), rank=0, world_size=1)
    try:
        backward_for(recorder, torch.optim.SGD(layer.parameters(), lr=0.1))(total, exclude=[layer.weight])
    finally:
        torch.distributed.destroy_process_group()
    assert recorder.calls == [{}] and layer.weight.grad is not None
