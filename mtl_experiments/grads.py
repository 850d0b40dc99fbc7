"""Per-task gradients of the shared dense parameters, computed once per step (DESIGN.md §5).

Weighting methods that need them and the conflict metrics receive the same ``G[T, P]`` matrix:
row t is the flattened gradient ∂L_t/∂θ_shared (or ∂L_t/∂representation, see ``grad_inputs``).
``plan`` gathers what one training step needs (the weighting's inputs, the conflict metrics' inputs on
measured steps, the shared parameters for the lookahead affinity) and ``StepGradients`` makes one
``task_gradients`` call over their union and hands each consumer its columns, so no gradient is computed
twice (PCGrad's G is the metrics' G; GradNorm's last-layer G is a slice of the shared G).
Computed with ``torch.autograd.grad`` (not ``backward``) so ``.grad`` buffers and DDP's gradient hooks
are untouched until the one real backward.
Low-precision gradients (a bfloat16 representation under ``bf16-mixed``) come back as float32: the
aggregators solve small linear systems that have no bfloat16 kernels and would lose the conflicts.

Under DDP each rank computes ``G`` on its share of the batch; ``sync_task_gradients`` turns it into the
global batch's ``G`` before anything uses it (see the section at the end of this file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.torch_version import TorchVersion

GRAD_SOURCES = ("params", "representation")


def grad_inputs(model: Any, source: str) -> list[Tensor]:
    """What ``G`` is taken with respect to, this step (after the forward pass): ``representation`` = the shared
    representation the backbone computed, ``params`` = the backbone's shared dense parameters."""
    if source == "representation":
        return [model.backbone.representation]
    return list(model.shared_parameters())


def task_gradients(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``G[T, P]`` with ``G[t] = flatten(∂ losses[t] / ∂ params)``; the graph is kept for the real backward.

    When ``losses`` is a stack of the T scalar losses (as the module builds it), row t is one backward from
    task t's own loss (``task_loss_edges``): it runs through that task's tower only. ``∂ losses[t]`` taken through
    the stack would also run every other task's tower backward, with zero gradients (the stack's backward feeds all
    its inputs), and so would the batched form below: on the recsys MMoE (CPU time, 1 thread) G over the shared
    experts took 2.8 ms instead of 4.3 at T=2 and 5.4 instead of 13 at T=4; the 665k MMoE 21 instead of 27 ms.
    Otherwise one batched backward (``is_grads_batched``: vmap over the T unit vectors); ops without a batching
    rule fall back to one ``autograd.grad`` per task. A parameter a task does not reach contributes zeros.
    """
    params = list(params)
    edges = task_loss_edges(losses)
    if edges is not None:
        one = torch.ones((), dtype=losses.dtype, device=losses.device)
        return _at_least_float32(
            torch.stack([_flat_row(_edge_grads(edge, one, params), params, 1)[0] for edge in edges])
        )
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    try:
        grads = torch.autograd.grad(
            losses, params, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an op in the graph has no vmap rule
        return _task_gradients_loop(losses, params)
    return _at_least_float32(_flat_row(grads, params, len(eye)))


EDGE_OUTPUTS = TorchVersion(torch.__version__) >= "2.4"  # autograd.grad takes a GradientEdge as an output since 2.4


def task_loss_edges(losses: Tensor) -> list[GradientEdge | None] | None:
    """The graph edges of the T scalar losses ``losses`` was stacked from (None: a task's loss has no graph), or None
    when ``losses`` is not such a stack (or torch is older than 2.4)."""
    fn = losses.grad_fn
    if not EDGE_OUTPUTS or losses.dim() != 1 or fn is None or fn.name() != "StackBackward0":
        return None
    if len(fn.next_functions) != losses.shape[0]:
        return None
    if any(node is not None and node.name() == "torch::autograd::AccumulateGrad" for node, _ in fn.next_functions):
        return None  # a leaf stacked as a loss: its gradient w.r.t. itself would need a tensor, not an edge
    return [None if node is None else GradientEdge(node, nr) for node, nr in fn.next_functions]


def _edge_grads(edge: GradientEdge | None, one: Tensor, params: list[Tensor]) -> tuple[Tensor | None, ...]:
    if edge is None:  # this task's loss does not depend on anything: zeros
        return (None,) * len(params)
    return torch.autograd.grad([edge], params, grad_outputs=[one], retain_graph=True, allow_unused=True)


def _flat_row(grads: Sequence[Tensor | None], params: list[Tensor], rows: int) -> Tensor:
    """``[rows, P]``: each parameter's gradient (``[rows, *shape]``, or zeros where None) flattened, concatenated."""
    return torch.cat(
        [
            torch.zeros(rows, p.numel(), dtype=p.dtype, device=p.device) if g is None else g.reshape(rows, -1)
            for p, g in zip(params, grads, strict=True)
        ],
        dim=1,
    )


def _at_least_float32(grads: Tensor) -> Tensor:
    return grads.float() if grads.dtype in (torch.float16, torch.bfloat16) else grads


def _task_gradients_loop(losses: Tensor, params: list[Tensor]) -> Tensor:
    rows = []
    for t in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append(_flat_row(grads, params, 1)[0])
    return _at_least_float32(torch.stack(rows))


# -- data-parallel training (DDP) ------------------------------------------------------------------
# Every rank holds an equal share of the global batch (``TensorBatchLoader`` deals rows out in turn: row
# k of rank r is row k·world + r of the global batch) and its losses are means over its share, so the
# global batch's mean loss is the mean over ranks of the local ones. The helpers below turn local values
# into the global batch's, so that every rank computes exactly what one process would on the whole batch.


def world_size() -> int:
    """Processes in the default process group (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(x: Tensor) -> Tensor:
    """The mean of ``x`` over the ranks, a detached copy (``x`` detached when there is one process)."""
    world = world_size()
    if world == 1:
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world


def gather_batch(x: Tensor) -> Tensor:
    """The global batch of a per-example tensor ``x[b, ...]``: ``[world·b, ...]`` in the one-process order
    (row k of rank r is row k·world + r), detached. Needs the same ``b`` on every rank."""
    world = world_size()
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.stack(parts, dim=1).reshape(world * x.shape[0], *x.shape[1:])


def local_rows(x: Tensor) -> Tensor:
    """This rank's rows of a global-batch tensor laid out as ``gather_batch`` returns it."""
    world = world_size()
    if world == 1:
        return x
    return x.reshape(-1, world, *x.shape[1:])[:, dist.get_rank()]


class _GlobalValue(torch.autograd.Function):
    """Forward: ``value``; backward: the incoming gradient to ``local`` unchanged (straight through)."""

    @staticmethod
    def forward(ctx, local: Tensor, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def global_losses(losses: Tensor) -> Tensor:
    """Per-task losses with the global batch's values (the mean over ranks) and this rank's gradients.

    A weighting that computes anything from loss values (FAMO's and GLS's weights, uncertainty's
    regulariser gradient, GradNorm's loss ratios, DWA's and FAMO's histories) then computes the same
    numbers on every rank, the numbers one process would compute on the whole batch; the gradient of
    ``f(losses)`` is ``f'(global values)·∇(local losses)``, which DDP's averaging turns into
    ``f'·∇(global losses)``: the one-process gradient. Identity with one process.
    """
    if world_size() == 1:
        return losses
    return _GlobalValue.apply(losses, mean_over_ranks(losses))


def sync_task_gradients(grads: Tensor, inputs: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    """This rank's ``G`` (over ``inputs``, flattened and concatenated) -> the global batch's ``G``, the same
    on every rank, and the width of each input's block in it.

    Parameter blocks are averaged over the ranks (one all-reduce for all of them): the gradient of the
    global mean loss is the mean of the ranks' gradients. A per-example activation (the shared
    representation, ``[b, ...]``) has one block per example: the ranks' blocks are gathered into the
    global batch's order and divided by the number of ranks (∂ mean-over-world·b / ∂ example = local / world),
    so the block is ``world`` times wider. With one process ``grads`` is returned as it is.
    """
    world = world_size()
    widths = [t.numel() for t in inputs]
    if world == 1:
        return grads, widths
    bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
    blocks = [grads[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    params = [i for i, t in enumerate(inputs) if isinstance(t, nn.Parameter)]
    if params:  # one collective for every parameter block
        flat = torch.cat([blocks[i] for i in params], dim=1)
        dist.all_reduce(flat)
        flat /= world
        for i, block in zip(params, flat.split([widths[i] for i in params], dim=1), strict=True):
            blocks[i] = block
    for i, t in enumerate(inputs):
        if i not in params:  # [T, b·F] -> [world·b, T, F] in global order -> [T, world·b·F] / world
            rows = blocks[i].reshape(len(grads), t.shape[0], -1).transpose(0, 1)
            blocks[i] = gather_batch(rows).transpose(0, 1).reshape(len(grads), -1) / world
            widths[i] *= world
    return torch.cat(blocks, dim=1), widths


# -- one G per step, each consumer its columns -------------------------------------------------------
def union_inputs(*groups: Sequence[Tensor] | None) -> list[Tensor]:
    """The tensors of all groups, each once (by identity), in order of first appearance."""
    seen, out = set(), []
    for group in groups:
        for t in group or ():
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def same_tensors(a: Sequence[Tensor] | None, b: Sequence[Tensor] | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def select_columns(
    grads: Tensor, inputs: Sequence[Tensor], wanted: Sequence[Tensor], widths: Sequence[int] | None = None
) -> Tensor:
    """The columns of ``grads`` (taken w.r.t. ``inputs``, flattened and concatenated) that belong to
    ``wanted``, in ``wanted``'s order: e.g. GradNorm's last-layer gradients out of the shared ones.
    ``widths``: each input's number of columns when it is not its ``numel()`` (under DDP a representation's
    block holds the whole global batch, see ``sync_task_gradients``)."""
    if same_tensors(inputs, wanted):
        return grads
    offsets, offset = {}, 0
    for i, t in enumerate(inputs):
        width = t.numel() if widths is None else widths[i]
        offsets[id(t)] = (offset, offset + width)
        offset += width
    blocks = [grads[:, slice(*offsets[id(t)])] for t in wanted]
    return blocks[0].contiguous() if len(blocks) == 1 else torch.cat(blocks, dim=1)


@dataclass
class StepGradients:
    """What one training step needs of ``G``, per consumer (None: nothing this step), and, once ``compute``
    has run, the step's one ``G`` over their union.

    ``weighting``: the weighting's inputs (every step, when it aggregates gradients); ``conflict``: the
    conflict metrics' inputs (on measured steps); ``affinity``: the shared parameters (on lookahead steps);
    ``tracked``: the shared parameters (on the low-noise estimators' tracked steps).
    ``weighting_norms``: whether the norms of the weighting's rows are ``train/grad_norm/<task>`` (that name
    means the norm over the conflict metrics' inputs when those are on: only the same tensors qualify)."""

    weighting: list[Tensor] | None = None
    conflict: list[Tensor] | None = None
    affinity: list[Tensor] | None = None
    tracked: list[Tensor] | None = None
    weighting_norms: bool = True
    inputs: list[Tensor] | None = None
    grads: Tensor | None = None
    widths: list[int] | None = None

    def compute(self, losses: Tensor) -> StepGradients:
        """One ``task_gradients`` call over everything asked for; under DDP the global batch's ``G`` (the same
        on every rank) before anything aggregates or measures it. ``losses``: this rank's own losses."""
        self.inputs = union_inputs(self.weighting, self.conflict, self.affinity, self.tracked)
        if self.inputs:
            self.grads, self.widths = sync_task_gradients(task_gradients(losses, self.inputs), self.inputs)
        return self

    def columns(self, consumer: str) -> Tensor | None:
        """``G`` over one consumer's inputs (``weighting``, ``conflict``, ``affinity``, ``tracked``); None when it
        asked none."""
        wanted = getattr(self, consumer)
        return None if wanted is None else select_columns(self.grads, self.inputs, wanted, self.widths)


def plan(model: Any, weighting: Any, conflict: Any, step: int, shared: list | None = None) -> StepGradients:
    """Who needs which per-task gradients at optimizer step ``step`` (counted from 1).

    ``weighting``: the ``Weighting`` when the backbone shares parameters (None: it gets no G); ``conflict``:
    the ``ConflictTracker`` (None: no conflict metrics); ``shared``: ``model.shared_parameters()`` when the caller
    has it (listing them walks the backbone's modules: once a step, not once per consumer)."""
    needs = weighting is not None and weighting.needs_task_grads
    weighting_inputs = weighting.task_grad_inputs(model) if needs else None
    measured = conflict is not None and conflict.config.every_n_steps > 0
    if conflict is not None and shared is None:
        shared = list(model.shared_parameters())
    conflict_inputs = None
    if measured:  # the shared parameters listed once: the params source's inputs are that list
        source = conflict.config.source
        conflict_inputs = shared if source == "params" else grad_inputs(model, source)
    return StepGradients(
        weighting=weighting_inputs,
        conflict=conflict_inputs if measured and conflict.measures(step) else None,
        affinity=shared if conflict is not None and conflict.affinity_due(step) else None,
        tracked=shared if conflict is not None and conflict.tracks(step) else None,
        weighting_norms=conflict_inputs is None or same_tensors(weighting_inputs, conflict_inputs),
    )


def shared_layers(model: nn.Module, shared: Sequence[nn.Parameter]) -> list[tuple[str, int]]:
    """(layer, columns) of each shared parameter in ``shared``'s order: the layer is the name of the module that
    owns it (``backbone.bottom.0.weight`` -> ``bottom.0``), the parameter-group the per-layer cosines use."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for p in shared:
        layer = names[id(p)].rsplit(".", 1)[0]  # the whole name when it has no dot
        out.append((layer.removeprefix("backbone."), p.numel()))
    return out


# -- lookahead affinity (Fifty et al. 2021): the model run again after one step per task ------------------
def lookahead_affinity(
    model: nn.Module,
    features,
    labels,
    losses_fn: Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor],
    shared: Sequence[nn.Parameter],
    shared_grads: Tensor,
    lr: float,
) -> Tensor:
    """``Z[i, j] = 1 − L_j(θ_s − lr·g_i, θ_rest) / L_j(θ_s, θ_rest)`` on this batch (Fifty et al., "Efficiently
    Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021).

    A plain SGD step on the shared parameters only, as in the paper (the run's optimizer may differ:
    the lookahead asks what task i's gradient does to task j, not what the optimizer would do), with
    ``torch.func.functional_call`` so the model is not modified. The T + 1 forwards run without grad,
    on copies of the buffers (batch-norm statistics stay untouched) and all with the same random draws
    (the same dropout masks), inside ``fork_rng`` so the training RNG does not move. Z = 0 where
    L_j(θ) = 0. Positive Z_{i→j}: a step on task i lowers task j's loss. Costs T + 1 forwards.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    shared_names = [names[id(p)] for p in shared]
    devices = [p.device for p in shared if p.device.type == "cuda"][:1]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def losses_at(overrides: dict[str, Tensor]) -> Tensor:
            torch.set_rng_state(cpu_state)
            for d, state in zip(devices, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, d)
            buffers = {n: b.clone() for n, b in model.named_buffers()}
            outputs = torch.func.functional_call(model, {**buffers, **overrides}, (features,), strict=False)
            return losses_fn(outputs, labels).double()

        base = losses_at({})
        rows = []
        for i in range(shared_grads.shape[0]):
            stepped, offset = {}, 0
            for name, p in zip(shared_names, shared, strict=True):
                n = p.numel()
                stepped[name] = p - lr * shared_grads[i, offset : offset + n].view_as(p).to(p.dtype)
                offset += n
            rows.append(losses_at(stepped))
    after, before = torch.stack(rows), base.expand(len(rows), -1)
    # 0 where L_j(θ) = 0 (the conflict metrics' zero convention)
    return 1.0 - torch.where(
        before > 0, after / before.clamp_min(torch.finfo(before.dtype).tiny), torch.zeros_like(after)
    )
