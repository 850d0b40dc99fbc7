"""GradDrop: Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (Algorithm 1).

At a layer of activations A, with ∇_i the gradient of task i there (sign-corrected and summed over the
batch, see below), the Gradient Positive Sign Purity and the masks are

    P = ½ (1 + Σ_i ∇_i / Σ_i |∇_i|),     U ~ Uniform(0, 1) i.i.d. per element,
    M_i = 1[P > U] ∘ 1[∇_i > 0] + 1[P < U] ∘ 1[∇_i < 0],

and the gradient passed on is Σ_i (l_i + (1 − l_i) M_i) ∘ ∂L_i/∂A: at each element one sign survives,
positive with probability P. l_i is the leak of task i (0 = full GradDrop; 1 = task i passes unchanged,
the paper's transfer-learning setting). f in the paper's f(P) is the identity here.

Gradient sources:
- ``representation`` is the paper's setting: the layer is the backbone's shared representation A[B, ...]
  and, as in the authors' implementation (lingvo ``GradDrop``, ``use_input_sign_only`` and
  ``marginalize_batch_dim``), ∇_i = Σ_batch sign(A) ∘ ∂L_i/∂A, so P and U have one element per feature
  and the masks are shared by the examples of the batch. The masked gradient is back-propagated from A
  through the shared layers in the one real backward (the heads get their own tasks' gradients).
- ``params`` (default, works with every sharing backbone): the same rule applied element-wise to the
  task gradients of the shared parameters (∇_i = g_i, which are already summed over the batch), as in
  the CAGrad authors' GradDrop baseline and TorchJD's ``GradDrop``.

Implemented natively rather than through TorchJD's ``GradDrop``: that aggregator only implements the
mask-and-sum step on the matrix it is given, so the representation setting (sign correction, batch
marginalisation, masks applied per example) cannot be expressed through the adapter, which would
instead replace the masks by least-squares task weights. U comes from this method's own generator
(seeded by ``seed`` and saved with the checkpoint), never from the global RNG.

Not implemented (not in the paper's Algorithm 1): lingvo's ``keep_gradnorm_constant`` rescaling and
its sigmoid keep-probability function.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import gather_batch, local_rows, world_size
from mtl_experiments.loss.base import GradientAggregation, effective_weights, run_seed
from mtl_experiments.tasks import Task


def sign_dropout(grads: Tensor, signed: Tensor, leak: Tensor, uniform: Tensor) -> Tensor:
    """Σ_i (l_i + (1 − l_i) M_i) ∘ grads_i with the masks M_i computed from ``signed``.

    ``grads``: [T, B, *F] (per-example gradients; B = 1 for parameter gradients); ``signed``: [T, *F],
    the ∇_i that decide the signs; ``leak``: [T]; ``uniform``: [*F], the U draws.
    """
    total = signed.abs().sum(0)
    purity = 0.5 * (1 + signed.sum(0) / torch.where(total > 0, total, torch.ones_like(total)))
    masks = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))  # [T, *F]
    keep = leak.view(-1, *([1] * (masks.dim() - 1)))
    keep = keep + (1 - keep) * masks.to(grads.dtype)
    return (grads * keep.unsqueeze(1)).sum(0)


class GradDrop(GradientAggregation):
    """Gradient sign dropout on the shared parameters' gradients or on the shared representation."""

    def __init__(self, leak: Mapping[str, float] | None = None, grad_source: str = "params", seed: int | None = None):
        super().__init__(grad_source=grad_source)
        self.leak_cfg = dict(leak or {})
        self.seed = run_seed(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._representation: Tensor | None = None

    def setup(self, tasks: Mapping[str, Task], model=None) -> None:
        super().setup(tasks, model)
        unknown = sorted(set(self.leak_cfg) - set(self.task_names))
        if unknown:
            raise ConfigError(f"loss.leak names unknown task(s) {unknown}; the tasks are {self.task_names}.")
        hint = "0: full GradDrop, 1: passes unchanged"
        leak = {name: checks.fraction(f"loss.leak.{name}", value, hint=hint) for name, value in self.leak_cfg.items()}
        self.register_buffer("leak", torch.tensor([leak.get(t, 0.0) for t in self.task_names]))

    def task_grad_inputs(self, model) -> list[Tensor]:
        inputs = super().task_grad_inputs(model)
        # the representation's values are needed for sign(A) when its gradients reach backward()
        self._representation = inputs[0] if self.grad_source == "representation" else None
        return inputs

    def _uniform(self, shape: torch.Size, like: Tensor) -> Tensor:
        return torch.rand(shape, generator=self._generator, dtype=like.dtype).to(like.device)

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        """The ``params`` variant: masks element-wise on the shared parameters' gradients."""
        leak = self.leak.to(device=grads.device, dtype=grads.dtype)
        update = sign_dropout(grads.unsqueeze(1), grads, leak, self._uniform(grads.shape[1:], grads))[0]
        return update, effective_weights(grads, update)

    def backward(self, losses, task_grads, shared_params, backward_fn):
        rep, self._representation = self._representation, None
        if self.grad_source != "representation" or task_grads is None or task_grads.shape[1] == 0:
            return super().backward(losses, task_grads, shared_params, backward_fn)
        # under DDP task_grads cover the global batch (grads.sync_task_gradients): so do A and the masks here
        rep_all = gather_batch(rep) if rep is not None else None
        if rep_all is None or rep_all.numel() != task_grads.shape[1]:
            raise RuntimeError("GradDrop with grad_source=representation needs task_grad_inputs() called this step.")
        per_example = task_grads.view(task_grads.shape[0], *rep_all.shape)  # [T, B, *F]
        signed = (per_example * rep_all.sign()).sum(1)  # [T, *F]: sign-corrected, summed over the batch
        leak = self.leak.to(device=task_grads.device, dtype=task_grads.dtype)
        new_grad = sign_dropout(per_example, signed, leak, self._uniform(signed.shape[1:], task_grads))  # [B, *F]
        # one backward: Σ_t L_t gives the heads their own gradients; the extra term turns the gradient
        # reaching A from Σ_t ∂L_t/∂A into new_grad, which then flows into the shared layers. Under DDP
        # this rank's rows only, times the number of ranks (its loss is a mean over 1/world of the batch;
        # DDP's averaging divides by world again)
        correction = world_size() * local_rows(new_grad - per_example.sum(0))
        backward_fn(losses.sum() + (rep * correction.to(rep.dtype)).sum())
        return effective_weights(task_grads, new_grad.reshape(-1)).detach()

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
