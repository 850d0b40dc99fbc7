"""The loss-weighting contract (DESIGN.md §4).

A weighting turns the per-task losses (and, if it asks for them, the per-task gradients ``G[T, P]``
of the shared dense parameters or of the shared representation) into exactly one real backward pass,
and reports the weights it applied. ``backward_fn(total, exclude=params)`` may leave out parameters
whose gradient the weighting then sets itself (``backward_excluding``). The training step calls ``backward``
and the named hooks and never asks which method it runs.

- ``LossWeighting``: methods that only combine losses; implement ``forward(losses) -> (total, weights)``.
- ``GradientAggregation``: methods that map ``G`` to one update of the shared parameters (PCGrad,
  MGDA, UPGrad, ...); implement ``aggregate(G) -> (update[P], weights[T])``.
- Anything else (GradNorm: its own weight optimizer) subclasses ``Weighting`` and overrides what it needs.

Under DDP the module hands every rank the same inputs (``losses`` valued as the global batch's means,
``task_grads`` of the global batch; see ``mtl_experiments/module.py``), so a method only has to be
deterministic given its inputs and its own seeded generator: each rank then computes the same weights,
the same update and the same state, and the replicas stay identical without any code of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import GRAD_SOURCES, grad_inputs
from mtl_experiments.tasks import Task

if TYPE_CHECKING:
    from mtl_experiments.model import MultiTaskModel


class Weighting(nn.Module):
    """Base of every method. Subclasses override ``backward`` and, where they need them, the hooks.

    ``needs_task_grads``: whether the step must compute ``G`` for this method. ``grad_sources``: the
    gradient sources it supports; ``grad_source`` (a constructor option of gradient-level methods)
    picks one: ``params`` = the backbone's shared dense parameters, ``representation`` = the shared
    representation the backbone computes (cheaper; MGDA-UB, Sener & Koltun 2018 §3.3).
    """

    needs_task_grads: bool = False
    grad_sources: tuple[str, ...] = ()
    grad_source: str = "params"

    def setup(self, tasks: Mapping[str, Task], model: MultiTaskModel | None = None) -> None:
        """Called once before training with the tasks in config order and the model; validate here."""
        self.task_names = list(tasks)
        self.num_tasks = len(self.task_names)
        if not self.needs_task_grads:
            return
        if self.grad_source not in self.grad_sources:
            raise ConfigError(
                f"{type(self).__name__} supports loss.grad_source in {list(self.grad_sources)}, "
                f"got {self.grad_source!r}."
            )
        if model is not None and self.grad_source == "representation" and not model.backbone.has_representation:
            raise ConfigError(
                f"loss.grad_source=representation needs a backbone with one shared representation; "
                f"{type(model.backbone).__name__} has none. Use loss.grad_source=params."
            )

    def task_grad_inputs(self, model: MultiTaskModel) -> list[Tensor]:
        """What ``G`` is taken with respect to, this step (called after the forward pass; ``grads.grad_inputs``)."""
        return grad_inputs(model, self.grad_source)

    def backward(
        self,
        losses: Tensor,
        task_grads: Tensor | None,
        shared_params: Sequence[nn.Parameter],
        backward_fn: Callable[..., None],
    ) -> Tensor:
        """Run exactly one ``backward_fn(total)`` or ``backward_fn(total, exclude=params)``; return weights ``[T]``.

        ``exclude``: parameters whose ``.grad`` this method writes itself right after the call; the call may skip
        them (their weight-gradient products; the module's does on one device, ``backward_excluding``) or compute
        them (under DDP, and a plain ``total.backward()``), so the method overwrites them either way.
        ``task_grads`` is None when the method needs none, or when the backbone shares nothing.
        """
        raise NotImplementedError

    def log_values(self) -> dict[str, Tensor]:
        """Method state worth plotting (e.g. learned log-variances), logged as ``train/<key>``."""
        return {}

    # Hooks, named after the moment they run. Defaults do nothing.
    def after_optimizer_step(self, losses: Tensor) -> None:
        """After ``optimizer.step()``; ``losses``: this step's detached per-task losses, computed before the
        step (FAMO updates its logits from consecutive steps' losses here)."""

    def on_train_epoch_end(self, epoch: int) -> None:
        """After each training epoch (e.g. DWA records the epoch's mean losses here)."""


class LossWeighting(Weighting):
    """Methods that combine losses: ``total, weights = self(losses)``, then one backward of ``total``."""

    def forward(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, losses, task_grads, shared_params, backward_fn):
        total, weights = self(losses)
        backward_fn(total)
        return weights.detach()


def backward_excluding(
    backward: Callable[..., None], total: Tensor, params: Iterable[Tensor], exclude: Collection[Tensor] = ()
) -> None:
    """The real backward of ``total`` into every trainable tensor of ``params`` except ``exclude`` (``backward``:
    Lightning's ``manual_backward``, which hands ``inputs`` on to ``Tensor.backward``): autograd still flows through
    the excluded layers to the parameters below them, but computes no gradient for the excluded ones (on the recsys
    MMoE the experts' weight-gradient product, ~1/3 of the backward). Nothing excluded: ``backward(total)``; nothing
    left to accumulate into: no call (the one backward's gradients are all set by the weighting)."""
    if not exclude:
        backward(total)
        return
    skip = {id(p) for p in exclude}
    inputs = [p for p in params if p.requires_grad and id(p) not in skip]
    if inputs:
        backward(total, inputs=inputs)


def backward_for(backward: Callable[..., None], optimizer: torch.optim.Optimizer) -> Callable[..., None]:
    """The ``backward_fn`` the training step hands a weighting: ``backward_fn(total, exclude=())`` runs
    ``backward_excluding`` over the optimizer's parameters (``backward``: Lightning's ``manual_backward``). Under
    ``torch.distributed`` (DDP) it excludes nothing: DDP's reducer waits for every parameter's gradient hook, so a
    parameter left out would hang or fail the step; the weighting overwrites the excluded gradients either way."""

    def backward_fn(total: Tensor, exclude: Collection[Tensor] = ()) -> None:
        if exclude and torch.distributed.is_available() and torch.distributed.is_initialized():
            exclude = ()
        params = (p for group in optimizer.param_groups for p in group["params"])
        backward_excluding(backward, total, params, exclude)

    return backward_fn


def run_seed(seed: int | None) -> int:
    """A method's own RNG seed: ``seed``, or, when null, the seed the run seeded torch with
    (``pipeline.train`` calls ``seed_everything(cfg.seed)`` before it builds the loss)."""
    if seed is None:
        return torch.initial_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"loss.seed must be an integer >= 0 or null (the run's seed), got {seed!r}.")
    return seed


def effective_weights(grads: Tensor, update: Tensor) -> Tensor:
    """The w with ``Gᵀw`` closest to ``update`` (least squares through the T×T Gramian).

    For aggregators whose update is not given as a weighted sum (PCGrad, GradDrop, ...), this is
    the per-task weight they effectively applied, so every method logs comparable ``train/weight/*``.
    """
    gram = grads @ grads.T
    rhs = grads @ update
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.lstsq(gram + 1e-12 * gram.diagonal().mean().clamp_min(1e-30) * eye, rhs).solution


# columns per float64 block in ``gramian``/``combine`` when G has more than BLOCKED_ABOVE columns: T·16k float64 values
# stay in cache, where one float64 copy of a 665k-column G (10 MB fresh each step) costs 15-20% more (CPU time); below
# ~300k columns the one copy is cheaper than the blocks' loop (measured for issue 17, docs/results.md)
BLOCK = 1 << 14
BLOCKED_ABOVE = 1 << 19


def for_sums(grads: Tensor) -> Tensor:
    """G as ``gramian`` and ``combine`` read it: one float64 copy made here and used by both, or G itself when it is
    wide enough to be summed over blocks (no copy at all)."""
    grads = grads.detach()
    return grads if grads.device.type == "cpu" and grads.shape[1] > BLOCKED_ABOVE else grads.to(torch.float64)


def gramian(grads: Tensor) -> Tensor:
    """``K = G Gᵀ`` in float64, on G's device (the Gramian trick: the methods that need only K solve a T×T problem).

    For a wide G on the CPU, computed over column blocks, each cast to float64 on its own, so no float64 copy of G is
    made; products of float32 entries are exact in float64, so K is as accurate as ``G.double() @ G.double().T``.
    """
    if grads.device.type != "cpu" or grads.shape[1] <= BLOCKED_ABOVE:
        g = grads.detach().to(torch.float64)
        return g @ g.T
    gram = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64)
    for block in grads.detach().split(BLOCK, dim=1):
        b = block.to(torch.float64)
        gram.addmm_(b, b.T)
    return gram


def combine(weights: Tensor, grads: Tensor) -> Tensor:
    """The update ``wᵀG``, summed in float64 and returned in G's dtype (``(w @ G.double()).to(G.dtype)`` over column
    blocks: the sum of T products is rounded once, not T times)."""
    weights = weights.detach().to(device=grads.device, dtype=torch.float64)
    if grads.device.type != "cpu" or grads.shape[1] <= BLOCKED_ABOVE:
        return (weights @ grads.detach().to(torch.float64)).to(grads.dtype)
    out = torch.empty(grads.shape[1], dtype=grads.dtype)
    for cols, block in zip(out.split(BLOCK), grads.detach().split(BLOCK, dim=1), strict=True):
        cols.copy_(weights @ block.to(torch.float64))
    return out


def gramian_update(grads: Tensor, weigh: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(wᵀG, w)`` with ``w = weigh(K)`` from the float64 Gramian on the CPU: the Gramian trick's one path (K and
    wᵀG summed in float64 from one ``for_sums`` view of G), returned in G's dtype and device."""
    g = for_sums(grads)
    weights = weigh(gramian(g).cpu())
    return combine(weights, g).to(grads.dtype), weights.to(device=grads.device, dtype=grads.dtype)


class GradientAggregation(Weighting):
    """Methods that aggregate the per-task gradients into one update (TorchJD's "aggregator").

    With ``grad_source=params`` the update replaces the shared parameters' gradient, and every other
    parameter (towers, heads, embeddings) gets the gradient of Σ_t L_t from the one real backward
    (a task-specific parameter is reached only by its own task, so that is its own task's gradient), which
    excludes the shared parameters (``backward_fn(..., exclude=shared)``: their gradient would be overwritten).
    With ``grad_source=representation`` the aggregator's weights are computed on the gradients of the
    shared representation and the real backward is of Σ_t w_t·L_t (MGDA-UB).
    When the backbone shares no parameters (single_task) there is nothing to aggregate: Σ_t L_t.
    """

    needs_task_grads = True
    grad_sources = GRAD_SOURCES

    def __init__(self, grad_source: str = "params"):
        super().__init__()
        self.grad_source = grad_source

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, losses, task_grads, shared_params, backward_fn):
        if task_grads is None or task_grads.shape[1] == 0:
            backward_fn(losses.sum())
            return torch.ones_like(losses).detach()
        update, weights = self.aggregate(task_grads)
        if self.grad_source == "representation":
            backward_fn((weights.detach().to(losses.dtype) * losses).sum())
            return weights.detach()
        backward_fn(losses.sum(), exclude=shared_params)
        # after the backward (under DDP, which excludes nothing: after DDP has averaged every gradient): the shared
        # parameters get the aggregate; every rank aggregated the same global G, so nothing needs averaging again
        offset = 0
        for p in shared_params:
            n = p.numel()
            p.grad = update[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        return weights.detach()


class GramianAggregation(GradientAggregation):
    """Aggregators whose weights depend on G only through its Gramian ``K = G Gᵀ`` (MGDA, UPGrad, IMTL-G, CAGrad,
    Nash-MTL, FairGrad, SDMGrad): ``weigh(K) -> w`` on the T×T problem, then the update ``wᵀG`` formed once.
    Subclasses implement ``weigh`` (float64 K on the CPU in, float64 w out). ``float64_sums = False``: K and wᵀG are
    summed in G's dtype (then K cast to float64), for a method whose solve is scale-free and tolerance-limited and
    which was specified that way (CAGrad, Nash-MTL); 2-4x cheaper than the float64 sums on a float32 G."""

    float64_sums: bool = True

    def weigh(self, gram: Tensor) -> Tensor:
        raise NotImplementedError

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        if not self.float64_sums:
            g = grads.detach()
            weights = self.weigh((g @ g.T).double().cpu())
            return weights.to(device=g.device, dtype=g.dtype) @ g, weights.to(device=g.device, dtype=g.dtype)
        return gramian_update(grads, self.weigh)
