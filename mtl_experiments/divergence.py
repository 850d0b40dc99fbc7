"""Divergence detection (``module.divergence``): training that blows up without ever producing a NaN.

A learning rate far too large (``optimizer.lr=1e6``) sends the losses to 1e10 and beyond while they stay finite
(a saturated sigmoid's cross-entropy grows linearly in the logit), so the non-finite check never fires and the
run trains to the end at chance level. Per task t, at optimizer step s, with ℓ_t(s) the task's loss (the global
batch's under DDP, so every rank decides the same), the rules are:

- **loss factor**: ℓ_t(s) > k · m_t, with m_t the mean of the task's loss over the first training epoch (during
  that epoch, over its steps so far; a step flagged by this rule does not enter m_t);
- **rising**: ℓ_t(s) > ℓ_t(s − 1) for n checks in a row (a minibatch loss that only goes up; noise alone
  rises n times in a row with probability 1/n!);
- **parameter norm** ‖θ‖₂ and **gradient norm** ‖∇‖₂ (all parameters, before clipping) above a bound.

``action``: ``off``, ``warn`` (a warning naming the task(s), the step and the rule, once per task and rule) or
``stop`` (``DivergenceError``: the run ends FAILED with that message). ``DivergenceDetector`` is plain Python on
plain numbers: the module hands it the losses it has already copied to the host for its non-finite check
(``global_norm`` computes the norms the module hands it, when a bound is set).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError, DivergenceError

log = logging.getLogger(__name__)

ACTIONS = ("off", "warn", "stop")
FIXES = (
    "Usual fixes: lower the learning rate (optimizer.lr=...), clip gradients (module.gradient_clip_val=1.0), or "
    "check those tasks' labels for extreme values; module.divergence.action=off turns this check off"
)


@dataclass(frozen=True)
class DivergenceConfig:
    """``module.divergence``: ``action`` (off | warn | stop), ``loss_factor`` k, ``rising_steps`` n,
    ``max_param_norm``, ``max_grad_norm`` (each rule: null = off)."""

    action: str = "warn"
    loss_factor: float | None = 100.0
    rising_steps: int | None = 50
    max_param_norm: float | None = None
    max_grad_norm: float | None = None

    @classmethod
    def from_mapping(cls, cfg: Mapping | None) -> DivergenceConfig:
        """Validated config; ``None`` turns the detection off (the YAML default turns it on)."""
        if cfg is None:
            return cls(action="off")
        keys = [f.name for f in fields(cls)]
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"module.divergence must be a mapping with keys {keys}, got {cfg!r}.")
        unknown = sorted(set(cfg) - set(keys))
        if unknown:
            raise ConfigError(f"module.divergence.{unknown[0]} is not an option; valid keys: {keys}.")
        v = {**{f.name: f.default for f in fields(cls)}, **cfg}
        key = "module.divergence."
        return cls(
            action=checks.choice(key + "action", v["action"], ACTIONS),
            loss_factor=checks.optional(
                checks.number, key + "loss_factor", v["loss_factor"], low=1.0, low_open=True, hint="null: off"
            ),
            rising_steps=checks.optional(
                checks.positive_int, key + "rising_steps", v["rising_steps"], hint="null: off"
            ),
            max_param_norm=checks.optional(checks.positive_number, key + "max_param_norm", v["max_param_norm"]),
            max_grad_norm=checks.optional(checks.positive_number, key + "max_grad_norm", v["max_grad_norm"]),
        )

    @property
    def enabled(self) -> bool:
        return self.action != "off"


@dataclass(frozen=True)
class Finding:
    """One rule that fired: its config key, what it concerns (a task, ``parameters``, ``gradient``), the text."""

    rule: str
    subject: str
    text: str


class DivergenceDetector:
    """The rules of this module over one run. ``check_losses`` every optimizer step, ``check_norm`` where the
    module measures a norm, ``end_epoch`` after each training epoch; each acts per ``action`` (``act``)."""

    def __init__(self, task_names: Sequence[str], config: DivergenceConfig):
        self.task_names, self.config = list(task_names), config
        t = len(self.task_names)
        self.reference_sum, self.reference_count = [0.0] * t, [0] * t  # the first epoch's losses
        self.reference_done = False
        self.previous: list[float | None] = [None] * t
        self.streak = [0] * t
        self.reported: set[tuple[str, str]] = set()  # (rule, subject) already warned about

    # -- rules ----------------------------------------------------------------------------------------
    def check_losses(self, losses: Sequence[float], step: int, epoch: int) -> list[Finding]:
        """This step's per-task losses (plain numbers, config order) against the loss rules."""
        findings = [f for i, loss in enumerate(losses) for f in self._check_task(i, float(loss))]
        return self.act(findings, step, epoch)

    def _check_task(self, i: int, loss: float) -> list[Finding]:
        cfg, name, out = self.config, self.task_names[i], []
        count = self.reference_count[i]
        reference = self.reference_sum[i] / count if count else None
        if cfg.loss_factor is not None and reference is not None and loss > cfg.loss_factor * reference:
            text = f"task {name}: loss {loss:.4g} > {cfg.loss_factor:g} x its first-epoch mean {reference:.4g}"
            out.append(Finding("loss_factor", name, text))
        elif not self.reference_done:  # a flagged loss does not raise the reference
            self.reference_sum[i] += loss
            self.reference_count[i] += 1
        previous = self.previous[i]
        self.streak[i] = self.streak[i] + 1 if previous is not None and loss > previous else 0
        self.previous[i] = loss
        if cfg.rising_steps is not None and self.streak[i] >= cfg.rising_steps:
            text = f"task {name}: loss rose {self.streak[i]} steps in a row, to {loss:.4g}"
            out.append(Finding("rising_steps", name, text))
        return out

    def check_norm(self, kind: str, value: float, step: int, epoch: int) -> list[Finding]:
        """``kind``: ``param`` (‖θ‖₂) or ``grad`` (‖∇‖₂ before clipping) against its bound."""
        bound = self.config.max_param_norm if kind == "param" else self.config.max_grad_norm
        if bound is None or not value > bound:
            return []
        what = "parameters" if kind == "param" else "gradient"
        finding = Finding(f"max_{kind}_norm", what, f"{what}: norm {value:.4g} > {bound:g}")
        return self.act([finding], step, epoch)

    def end_epoch(self) -> None:
        """After the first training epoch the loss reference is fixed."""
        if any(self.reference_count):
            self.reference_done = True

    # -- action ---------------------------------------------------------------------------------------
    def act(self, findings: list[Finding], step: int, epoch: int) -> list[Finding]:
        """``stop``: raise DivergenceError; ``warn``: log the findings not reported yet; return the findings."""
        if not findings or not self.config.enabled:
            return findings
        where = f"step {step} (epoch {epoch})"
        if self.config.action == "stop":
            raise DivergenceError(
                f"Training diverged at {where}: {describe(findings)}. Training stopped so no more time is wasted; "
                f"the last checkpoint before it is kept. {FIXES}."
            )
        new = [f for f in findings if (f.rule, f.subject) not in self.reported]
        if new:
            self.reported.update((f.rule, f.subject) for f in new)
            log.warning(
                "Training is diverging at %s: %s. %s; module.divergence.action=stop stops such a run.",
                where,
                describe(new),
                FIXES,
            )
        return findings

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (a checkpoint stays loadable with weights_only=True)."""
        return {
            "reference": [list(self.reference_sum), list(self.reference_count), self.reference_done],
            "previous": list(self.previous),
            "streak": list(self.streak),
            "reported": sorted([list(r) for r in self.reported]),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        total, count, self.reference_done = state["reference"]
        self.reference_sum, self.reference_count = list(total), list(count)
        self.previous, self.streak = list(state["previous"]), list(state["streak"])
        self.reported = {(rule, subject) for rule, subject in state["reported"]}


def describe(findings: Sequence[Finding]) -> str:
    """``<text> (module.divergence.<rule>); ...``"""
    return "; ".join(f"{f.text} (module.divergence.{f.rule})" for f in findings)


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖(t_1, …, t_n)‖₂ of the tensors taken as one vector (a sparse gradient by its stored values); 0 for none."""
    norms = [torch.linalg.vector_norm((t.coalesce().values() if t.is_sparse else t).float()) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
