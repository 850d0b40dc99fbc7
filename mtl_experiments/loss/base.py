"""The loss-weighting contract (DESIGN.md §4).

A weighting turns the per-task losses (and, if it asks for them, the per-task gradients of the
shared dense parameters) into one real backward pass, and reports the weights it applied. The
training step calls ``backward`` and the named hooks and never asks which method it runs.

- ``LossWeighting``: methods that only need the losses; implement ``forward(losses) -> (total, weights)``.
- Gradient-level methods (PCGrad, MGDA, ...) set ``needs_task_grads = True`` and use ``task_grads``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from mtl_experiments.tasks import Task


class Weighting(nn.Module):
    """Base of every method. Subclasses override ``backward`` and, where they need them, the hooks."""

    needs_task_grads: bool = False

    def setup(self, tasks: Mapping[str, Task]) -> None:
        """Called once before training with the tasks in config order; validate the config here."""
        self.task_names = list(tasks)
        self.num_tasks = len(self.task_names)

    def backward(
        self,
        losses: Tensor,
        task_grads: Tensor | None,
        shared_params: Sequence[nn.Parameter],
        backward_fn: Callable[[Tensor], None],
    ) -> Tensor:
        """Run exactly one ``backward_fn(total)`` (Lightning's ``manual_backward``); return weights ``[T]``."""
        raise NotImplementedError

    # Hooks, named after the moment they run. Defaults do nothing.
    def after_optimizer_step(self, losses: Tensor) -> None:
        """After ``optimizer.step()`` (e.g. FAMO updates its logits with the new losses here)."""

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
