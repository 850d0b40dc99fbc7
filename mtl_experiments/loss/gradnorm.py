"""GradNorm: Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018.

Learned task weights w_t (initialised at 1) balance the gradient norms the tasks put on W, the weight
of the **last shared layer** (``model.backbone.last_shared_layer``, or ``layer``: a module path inside
the backbone). At each step t:

    G_t     = ||∇_W (w_t·L_t)||₂                        weighted gradient norm on W
    L̃_t     = L_t / L_t(0)                              loss ratio (inverse training rate)
    r_t     = L̃_t / mean_j(L̃_j)                         relative inverse training rate
    L_grad  = Σ_t |G_t − mean(G)·r_t^α|                 the target mean(G)·r_t^α is a constant (paper §3.2)

The model is updated by ∇(Σ_t w_t·L_t) with the weights of this step (one real backward); w is
updated only by ∇_w L_grad, with its own optimizer, then renormalised so Σ_t w_t = T (Algorithm 1).
W's part of that gradient is Σ_t w_t·∇_W L_t, formed from the rows of G the step already has (summed in float64):
the real backward excludes W (``backward_fn(..., exclude=[W])``) and skips W's weight-gradient product.

Choices the paper leaves open, made here:
- w's optimizer: ``optimizer``, any ``torch.optim`` class as a Hydra partial (``_partial_: true``), by
  default Adam with learning rate 0.025 as in common public reproductions (the paper gives no value
  that transfers across models). Adam is the default because
  ∇_w L_grad = sign(G_t − target_t)·||∇_W L_t|| scales with the gradient norms on W, which vary by
  orders of magnitude between models; Adam's step (≈ lr on the first step) does not, so one ``lr`` fits all.
- L_t(0): with ``initial_loss_steps`` = 1 (default) it is the loss of the first step, as in the paper.
  With N > 1 it is the mean of the first N steps' losses (minibatch losses are noisy); during those N
  steps the running mean of the steps so far is used, so step 1 is the paper's, and from step N on it is fixed.
- r_t is computed as T·softmax(log L_t − log L_t(0)) in float64 (the same value as L̃_t / mean(L̃)), so losses
  that change by 1e60 do not overflow; a zero loss counts as float64's smallest positive number.
- w is a buffer, not an ``nn.Parameter``: the main optimizer never sees it (so no weight decay either).
  w is not clamped (the paper does not); the target is positive, so L_grad pulls each w_t toward a positive value.

When the backbone shares nothing (single_task) the module passes no task gradients: GradNorm then
acts as equal weighting, w fixed at 1 (the module warns).

Cost per step beyond ``equal``: T backward passes, each from one task's own loss to W (``grads.task_gradients``), and
the T-vector bookkeeping below (~0.3 ms on CPU, Adam's step on w ~50 µs of it). Each pass ends in W's weight-gradient
product (on the recsys MMoE, W is the experts' only layer), so exact norms cost T such products; the real backward
computes none for W (above). Measured in docs/results.md (issue 17).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.base import Weighting, combine
from mtl_experiments.tasks import Task

if TYPE_CHECKING:
    from mtl_experiments.model import MultiTaskModel

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
DEFAULT_OPTIMIZER = functools.partial(torch.optim.Adam, lr=0.025)  # as conf/loss/gradnorm.yaml
OPTIMIZER_HINT = "a torch.optim class as a Hydra partial, e.g. {_target_: torch.optim.Adam, _partial_: true, lr: 0.025}"


class GradNorm(Weighting):
    needs_task_grads = True
    grad_sources = ("params",)

    def __init__(
        self,
        alpha: float = 1.5,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        initial_loss_steps: int = 1,
        layer: str | None = None,
    ):
        super().__init__()
        self.alpha = checks.non_negative_number("loss.alpha", alpha, hint="default 1.5")
        self.optimizer_factory = optimizer
        self.optimizer_name, self.lr = check_optimizer(optimizer)
        hint = "1 = L(0) is the first step's loss"
        self.initial_loss_steps = checks.positive_int("loss.initial_loss_steps", initial_loss_steps, hint=hint)
        if layer is not None and (not isinstance(layer, str) or not layer):
            checks.fail("loss.layer", "null or a module path inside the backbone", layer)
        self.layer = layer
        self.layer_path: str | None = None  # resolved in setup()
        self.layer_index: int | None = None  # W's position in model.shared_parameters() (the step's shared_params)
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_optimizer_state: dict | None = None  # loaded before the optimizer exists
        self._steps = 0  # GradNorm updates done
        self._loss_sum: Tensor | None = None  # Σ of the first min(steps, N) losses -> L(0)
        self._last: dict[str, Tensor] = {}

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, tasks: Mapping[str, Task], model: MultiTaskModel | None = None) -> None:
        super().setup(tasks, model)
        self.register_buffer("w", torch.ones(self.num_tasks))
        if model is not None:
            self.layer_path = self._resolve_layer(model)
            if self.layer_path is not None:
                weight = model.backbone.get_submodule(self.layer_path).weight
                self.layer_index = [id(p) for p in model.shared_parameters()].index(id(weight))

    def _resolve_layer(self, model: MultiTaskModel) -> str | None:
        """The module path (inside the backbone) whose ``.weight`` is W; None when nothing is shared."""
        backbone = model.backbone
        shared = {id(p) for p in model.shared_parameters()}
        path = self.layer if self.layer is not None else backbone.last_shared_layer
        key = "loss.layer" if self.layer is not None else f"{type(backbone).__name__}.last_shared_layer"
        if path is None:
            if shared:
                raise ConfigError(
                    f"GradNorm needs the last shared layer, but {type(backbone).__name__} names none; "
                    f"set loss.layer to one of {_shared_layers(backbone, shared)}."
                )
            return None  # nothing shared: the module passes no task gradients, w stays at 1
        try:
            module = backbone.get_submodule(path)
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) not in shared:
            raise ConfigError(
                f"{key}={path!r} is not a shared layer with a weight in {type(backbone).__name__}; "
                f"GradNorm measures the last shared layer. Shared layers: {_shared_layers(backbone, shared)}."
            )
        return path

    def task_grad_inputs(self, model: MultiTaskModel) -> list[Tensor]:
        # Only W: G[t] = ∇_W L_t (unweighted), so ||∇_W w_t·L_t|| = |w_t|·||G[t]||.
        if self.layer_path is None:  # setup() without a model: fall back to the shared parameters
            return super().task_grad_inputs(model)
        return [model.backbone.get_submodule(self.layer_path).weight]

    # -- the step -----------------------------------------------------------------------------
    def backward(self, losses, task_grads, shared_params, backward_fn):
        if task_grads is None or task_grads.shape[1] == 0:
            backward_fn(losses.sum())
            return torch.ones_like(losses).detach()
        weights = self.w.detach().clone()  # w(t): the model's update uses this step's weights
        total = (weights.to(losses.dtype) * losses).sum()
        layer = self._layer_weight(shared_params, task_grads)
        if layer is None:
            backward_fn(total)
        else:  # W's gradient of Σ_t w_t·L_t is Σ_t w_t·G_t: from G, not from another weight-gradient product
            backward_fn(total, exclude=[layer])
            layer.grad = combine(weights.to(losses.dtype), task_grads).view_as(layer).to(layer.dtype)
        self._update_weights(losses.detach(), task_grads.detach())
        return weights

    def _layer_weight(self, shared_params, task_grads: Tensor) -> nn.Parameter | None:
        """W among the step's shared parameters (the model's ``shared_parameters()``, in order), when set up with a
        model and G is over W alone; None (a plain backward, W's gradient from it) otherwise."""
        index = self.layer_index
        if index is None or index >= len(shared_params) or shared_params[index].numel() != task_grads.shape[1]:
            return None
        return shared_params[index]

    def _update_weights(self, losses: Tensor, task_grads: Tensor) -> None:
        losses = losses.to(self.w.dtype)
        # in float64: with losses of 1e30 the float32 squares in ||∇_W L_t|| and L/L(0) overflow (issue 14)
        norms = task_grads.double().norm(dim=1)  # ||∇_W L_t||
        initial = self._initial_losses(losses)
        inverse_rate = inverse_training_rate(losses, initial)
        weighted, loss_grad, grad = (
            x.to(self.w.dtype) for x in gradnorm_loss(self.w.detach().double(), norms, inverse_rate, self.alpha)
        )
        inverse_rate = inverse_rate.to(self.w.dtype)
        optimizer = self._get_optimizer()
        self.w.grad = grad
        optimizer.step()
        self.w.grad = None
        with torch.no_grad():
            self.w.mul_(self.num_tasks / self.w.sum())  # Σ w_t = T
        self._last = {"weighted": weighted, "loss": loss_grad, "rate": inverse_rate}

    def _initial_losses(self, losses: Tensor) -> Tensor:
        """L(0): the mean of the first ``initial_loss_steps`` steps' losses (so far, during those steps)."""
        self._steps += 1
        if self._loss_sum is None:
            self._loss_sum = torch.zeros_like(losses)
        self._loss_sum = self._loss_sum.to(losses.device)
        if self._steps <= self.initial_loss_steps:
            self._loss_sum = self._loss_sum + losses
        return self._loss_sum / min(self._steps, self.initial_loss_steps)

    def _get_optimizer(self) -> torch.optim.Optimizer:
        # Built lazily and rebuilt (keeping its state) when w is no longer the tensor it holds:
        # moving the module to another device replaces the buffer.
        if self._optimizer is None or self._optimizer.param_groups[0]["params"][0] is not self.w:
            state = self._optimizer.state_dict() if self._optimizer is not None else self._pending_optimizer_state
            self._optimizer = self.optimizer_factory([self.w])
            if state is not None:
                self._optimizer.load_state_dict(state)
                self._optimizer.param_groups[0]["lr"] = self.lr  # the configured lr wins on resume
            self._pending_optimizer_state = None
        return self._optimizer

    # -- logging and resume -------------------------------------------------------------------
    def log_values(self) -> dict[str, Tensor]:
        if not self._last:
            return {}
        out = {"gradnorm/loss": self._last["loss"]}
        for i, name in enumerate(self.task_names):
            out[f"gradnorm/weighted_grad_norm/{name}"] = self._last["weighted"][i]
            out[f"gradnorm/inverse_rate/{name}"] = self._last["rate"][i]
        return out

    @property
    def initial_losses(self) -> Tensor | None:
        """The current L(0) estimate (None before the first update)."""
        if self._loss_sum is None:
            return None
        return self._loss_sum / min(self._steps, self.initial_loss_steps)

    def get_extra_state(self) -> dict:
        optimizer_state = self._optimizer.state_dict() if self._optimizer is not None else None
        return {
            "steps": self._steps,
            "loss_sum": None if self._loss_sum is None else self._loss_sum.detach().cpu(),
            "optimizer_name": self.optimizer_name,
            "optimizer": optimizer_state if optimizer_state is not None else self._pending_optimizer_state,
        }

    def set_extra_state(self, state: dict) -> None:
        if state["optimizer"] is not None and state["optimizer_name"] != self.optimizer_name:
            raise ConfigError(
                f"The checkpoint's GradNorm weights were trained with loss.optimizer={state['optimizer_name']}; "
                f"resume with the same optimizer class (got {self.optimizer_name})."
            )
        self._steps = int(state["steps"])
        self._loss_sum = None if state["loss_sum"] is None else state["loss_sum"].clone()
        # deep copy: an optimizer loading a state dict may keep its tensors, shared with the source
        self._pending_optimizer_state = copy.deepcopy(state["optimizer"])
        self._optimizer = None
        self._last = {}


def inverse_training_rate(losses: Tensor, initial: Tensor) -> Tensor:
    """r_t = L̃_t / mean_j L̃_j with L̃_t = L_t / L_t(0), as ``T·softmax_t(log L_t − log L_t(0))`` in float64: the
    same value, without overflow (losses 1e30 after 1e-30 overflowed float32's L/L(0): issue 14); r_t ∈ [0, T]."""
    tiny = torch.finfo(torch.float64).tiny
    log_ratio = losses.double().clamp_min(tiny).log() - initial.double().clamp_min(tiny).log()
    return losses.numel() * torch.softmax(log_ratio, dim=0)


def gradnorm_loss(w: Tensor, norms: Tensor, inverse_rate: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(G, L_grad, ∇_w L_grad)`` from the weights, the unweighted norms ||∇_W L_t|| and r_t.

    W's gradient of w_t·L_t is w_t·∇_W L_t (w_t is a scalar that does not depend on W), so
    G_t = |w_t|·||∇_W L_t|| exactly, from the unweighted rows of G: no second-order graph through the
    network is needed. With the target held constant, ∇_w L_grad = sign(G_t − target_t)·sign(w_t)·||∇_W L_t||:
    what autograd on w with the norms detached gives (a test checks it), written out because it costs a
    few µs where an autograd call costs ~0.1 ms per step.
    """
    weighted = w.abs() * norms
    target = weighted.mean() * inverse_rate.pow(alpha)  # a constant: no gradient flows through it (paper §3.2)
    diff = weighted - target
    return weighted, diff.abs().sum(), diff.sign() * w.sign() * norms


def check_optimizer(factory) -> tuple[str, float]:
    """``(name, lr)`` of the optimizer ``factory`` builds (a trial on one tensor): the lower-case class name
    (``adam``, ``sgd``: what checkpoints record) and its learning rate, which must be > 0."""
    if not callable(factory):
        checks.fail("loss.optimizer", "an optimizer", factory, hint=OPTIMIZER_HINT)
    lr_hint = "the learning rate of GradNorm's weights, e.g. 0.025"
    if "lr" in getattr(factory, "keywords", {}):  # before torch's own check, so the key is named
        checks.positive_number("loss.optimizer.lr", factory.keywords["lr"], hint=lr_hint)
    try:
        trial = factory([torch.zeros(1, requires_grad=True)])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"loss.optimizer could not be built ({e}); it must be {OPTIMIZER_HINT}.") from e
    if not isinstance(trial, torch.optim.Optimizer):
        checks.fail("loss.optimizer", "an optimizer", factory, hint=OPTIMIZER_HINT)
    lr = trial.param_groups[0].get("lr")
    checks.positive_number("loss.optimizer.lr", lr, hint=lr_hint)
    return type(trial).__name__.lower(), float(lr)


def _shared_layers(backbone: nn.Module, shared: set[int]) -> list[str]:
    return [
        name
        for name, m in backbone.named_modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and id(m.weight) in shared
    ]
