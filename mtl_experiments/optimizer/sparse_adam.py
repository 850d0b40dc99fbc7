"""Adam for large id tables with sparse gradients: ``torch.optim.SparseAdam`` for the tables, AdamW for the rest.

A step of ``nn.Embedding(sparse=True)`` produces a gradient holding only the rows in the batch. Dense Adam
cannot take it (torch raises), and with dense gradients Adam updates the moments of *every* row each step, so
a step costs the table. SparseAdam (lazy Adam) updates the moments and values of the rows in the batch only:
m_r <- b1 m_r + (1 - b1) g_r, v_r <- b2 v_r + (1 - b2) g_r², w_r <- w_r - lr m̂_r / (√v̂_r + eps) for rows r in
the gradient (Kingma & Ba, ICLR 2015; the lazy variant is torch's SparseAdam). Every dense parameter (MLPs,
heads, projections, learned loss weights) gets AdamW (decoupled weight decay; exactly Adam at weight_decay=0).

Which parameters are sparse is decided up front, from a flag: a module that gives a parameter sparse gradients
calls ``mark_sparse(param)`` (the feature encoder does for its id tables under ``features.sparse=true``), which
sets ``param.sparse_grad = True``. (``copy.deepcopy`` of a parameter drops the flag: mark the copy again.)
Weight decay applies to the dense parameters only: SparseAdam has none, and decaying every row each step
would make the step cost the table again.

``SparseDenseAdam`` is one ``torch.optim.Optimizer``: its ``param_groups`` are the two inner optimizers' group
dicts (each group of the caller split into a sparse and a dense part, marked by the group key ``"sparse"``), so
LR schedulers see and change every learning rate; its ``state`` is shared with both, so ``state_dict`` /
``load_state_dict`` (checkpoints, resume) and Lightning's device moves cover everything.

``check_sparse_training`` (called by ``MTLModule``) refuses, before training, what cannot work with sparse
gradients: an optimizer that cannot step them, and gradient clipping when torch cannot clip them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from mtl_experiments.errors import ConfigError

SPARSE_GRAD = "sparse_grad"


def mark_sparse(param: Tensor) -> Tensor:
    """Flags ``param`` as receiving sparse gradients (so ``SparseDenseAdam`` steps it with SparseAdam)."""
    setattr(param, SPARSE_GRAD, True)
    return param


def is_sparse(param: Tensor) -> bool:
    return bool(getattr(param, SPARSE_GRAD, False))


def _split_group(group: dict) -> list[dict]:
    """A caller's parameter group -> its sparse part and its dense part (the non-empty ones), marked ``"sparse"``."""
    members = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
    parts = {flag: [p for p in members if is_sparse(p) is flag] for flag in (True, False)}
    return [{**group, "params": part, "sparse": flag} for flag, part in parts.items() if part]


class SparseDenseAdam(Optimizer):
    """SparseAdam over the parameters flagged by ``mark_sparse``, AdamW over the others (module docstring)."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__([part for group in groups for part in _split_group(group)], defaults)
        # the inner optimizers take the very group dicts of self.param_groups (torch keeps the dict it is given)
        sparse = [g for g in self.param_groups if g["sparse"]]
        dense = [g for g in self.param_groups if not g["sparse"]]
        self._sparse = self._inner(sparse, True) if sparse else None
        self._dense = self._inner(dense, False) if dense else None
        self._link()

    def _inner(self, groups: list[dict], sparse: bool) -> Optimizer:
        d = self.defaults
        if sparse:
            return torch.optim.SparseAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"])
        return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (after init, load or unpickling)."""
        for inner, flag in ((self._sparse, True), (self._dense, False)):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["sparse"] is flag]
                inner.state = self.state

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_sparse": self._sparse, "_dense": self._dense}

    def __setstate__(self, state: dict) -> None:
        # load_state_dict replaces param_groups and state through here
        super().__setstate__(state)
        if "_sparse" in self.__dict__:
            self._link()

    def add_param_group(self, param_group: dict) -> None:
        if "_sparse" not in self.__dict__:  # during __init__: the groups are split already
            super().add_param_group(param_group)
            return
        for group in _split_group(param_group):
            flag = group["sparse"]
            super().add_param_group(group)
            inner = self._sparse if flag else self._dense
            if inner is not None:
                inner.add_param_group(group)
            elif flag:
                self._sparse = self._inner([group], True)
            else:
                self._dense = self._inner([group], False)
            self._link()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse is not group["sparse"]:
                    kind = "a sparse" if p.grad.is_sparse else "a dense"
                    raise ConfigError(
                        f"A parameter of shape {tuple(p.shape)} has {kind} gradient, but was "
                        f"{'' if group['sparse'] else 'not '}marked sparse (mtl_experiments.optimizer.sparse_adam."
                        "mark_sparse): flag exactly the parameters of nn.Embedding(sparse=True) tables."
                    )
        if self._sparse is not None:
            self._sparse.step()
        if self._dense is not None:
            self._dense.step()
        return loss


@functools.cache
def torch_clips_sparse(algorithm: str) -> bool:
    """Whether this torch can clip a sparse gradient by norm / value (2.13 cannot: no sparse kernel)."""
    p = nn.Parameter(torch.zeros(2, 1))
    p.grad = torch.sparse_coo_tensor([[1]], [[3.0]], (2, 1), check_invariants=True)
    try:
        if algorithm == "value":
            nn.utils.clip_grad_value_([p], 1.0)
        else:
            nn.utils.clip_grad_norm_([p], 1.0)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def check_sparse_training(
    model: nn.Module,
    optimizer: Callable[..., Optimizer],
    gradient_clip_val: float = 0.0,
    gradient_clip_algorithm: str = "norm",
) -> None:
    """ConfigError when ``model`` has sparse-gradient parameters and the optimizer or clipping cannot take them.

    ``optimizer`` is the factory ``MTLModule`` gets (it takes parameter groups). It is tried on a 2-row probe
    with a sparse gradient, so an optimizer that can (SGD without weight decay, Adagrad, this module's) passes.
    """
    if not any(is_sparse(p) for p in model.parameters()):
        return
    if gradient_clip_val > 0 and not torch_clips_sparse(gradient_clip_algorithm):
        raise ConfigError(
            f"module.gradient_clip_val={gradient_clip_val} clips gradients by {gradient_clip_algorithm}, which this "
            f"torch ({torch.__version__}) cannot do for the sparse gradients of the id tables (features.sparse=true). "
            "Set module.gradient_clip_val=0, or features.sparse=false."
        )
    probe = mark_sparse(nn.Parameter(torch.zeros(2, 1)))
    opt = optimizer([{"params": [probe]}])
    try:
        for _ in range(2):  # the second step exercises the state (moments, momentum) the first created
            probe.grad = torch.sparse_coo_tensor([[1]], [[1.0]], (2, 1), check_invariants=True)
            opt.step()
    except (RuntimeError, ValueError, NotImplementedError) as e:
        raise ConfigError(
            f"features.sparse=true gives the id tables sparse gradients, which {type(opt).__name__} cannot step "
            f"({str(e).splitlines()[0]}). Use optimizer=sparse_adam (SparseAdam for the tables, Adam for the rest), "
            "or features.sparse=false."
        ) from None
