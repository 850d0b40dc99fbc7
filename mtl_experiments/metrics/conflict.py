"""Task-conflict metrics (DESIGN.md §6): how the tasks' gradients on the shared model relate.

From the per-task gradients ``G[T, P]`` (row t = ∂L_t/∂θ_shared, or ∂L_t/∂representation) of one
training step, everything but the update cosines and the affinity follows from the T×T Gramian
``K = G Gᵀ`` (‖g_i‖ = √K_ii, g_i·g_j = K_ij), so no P-sized work is done per pair:

- pairwise cosine cos_ij = K_ij / (‖g_i‖‖g_j‖);
- conflict rate: the share of measured steps with cos_ij < 0 (gradients conflict; Yu et al., "Gradient
  Surgery for Multi-Task Learning", NeurIPS 2020, Def. 1);
- gradient magnitude similarity Φ_ij = 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) (Yu et al. 2020, Def. 2):
  1 for equal norms, → 0 when one dominates;
- per-task gradient norms ‖g_t‖;
- cos(u, ḡ) between the applied update u and the mean gradient ḡ = (1/T)Σ_t g_t, from G u and ‖u‖²
  (ḡ·u = mean_t (G u)_t, ‖ḡ‖² = 1ᵀK1 / T²): how far the method moves the update away from plain averaging.
  u is what the optimizer receives for the shared parameters (their ``.grad`` after the weighting's
  backward and clipping, before Adam's or momentum's transformation); with ``source=representation``,
  Σ_t w_t g_t with the weights the method applied;
- min_t cos(g_t, u): the worst task's cosine with the update; < 0 means the step raises that task's
  loss to first order;
- lookahead inter-task affinity Z_{i→j} = 1 − L_j(θ_s − η∇_{θ_s}L_i) / L_j(θ_s) on the same batch
  (Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021), optional;
  computed by ``grads.lookahead_affinity`` (it runs the model), averaged here;
- for mixture backbones, per-task gate entropy and expert utilisation (see ``ConflictTracker.update_gates``);
- the low-noise estimators ``ema_cosine``, ``accumulated_cosine`` and ``layer_cosine`` (``conflict_averaged.py``):
  cosines of each task's gradient over the shared parameters averaged over the tracked steps (every
  ``track_every_n_steps``), which see the tasks' relatedness where one step's cosine sees mostly noise;
- the function-space estimators ``output_cosine`` and ``initial_output_cosine`` (``conflict_output.py``): the
  cosine of the tasks' per-sample loss gradients with respect to their own outputs on the tracked steps (the
  parameter-space cosine with each task's tower Jacobian factored out), over the run and over the first
  ``initial_steps`` tracked steps.

Zero gradients: a cosine with a zero vector is 0/0; it is **defined as 0** (neither aligned nor
conflicting, so it never counts towards the conflict rate), and so is Φ_ij when both norms are 0.

Each quantity is a ``RunningMean`` (``metrics/running.py``) whose states are a float64 ``sum`` and a ``count``
of measured steps (mean over steps; DDP reduces both by summation). Which gradients are taken, and how the
metrics' columns are cut out of the step's one ``G``, is ``grads.py``'s business.
``ConflictTracker`` bundles them for the module: per-step values to log, run-level and per-epoch means,
and the small history the plots read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch
from torch import Tensor, nn

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import GRAD_SOURCES, gather_batch
from mtl_experiments.metrics.conflict_averaged import GradientAverages, batched_cosine
from mtl_experiments.metrics.conflict_output import OutputCosine, output_residuals
from mtl_experiments.metrics.running import RunningMean

log = logging.getLogger(__name__)

# keys a mapping leaves out take these values: the low-noise estimators are off unless asked for
# (conf/module/default.yaml asks for them)
DEFAULTS = {
    "every_n_steps": 50,
    "source": "params",
    "affinity_every_n_steps": 0,
    "track_every_n_steps": 0,
    "ema_beta": 0.95,
    "accumulate_steps": 20,
    "initial_steps": 12,
}
# the summary that tracks task relatedness (docs/results.md, "Conflict estimators against task correlation": the
# only one with Spearman >= 0.9 on every fresh sweep, and a stable sign on census)
HEADLINE = "initial_output_cosine"


# -- configuration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConflictConfig:
    """``module.conflict``: ``every_n_steps`` (0 = off), ``source`` (params | representation),
    ``affinity_every_n_steps`` (0 = off), ``track_every_n_steps`` (the low-noise estimators' cadence, 0 = off),
    ``ema_beta`` (their EMA's decay, in [0, 1)), ``accumulate_steps`` (tracked steps per accumulated cosine),
    ``initial_steps`` (the first tracked steps ``initial_cosine`` averages). Steps are optimizer steps, from 1."""

    every_n_steps: int = 0
    source: str = "params"
    affinity_every_n_steps: int = 0
    track_every_n_steps: int = 0
    ema_beta: float = 0.95
    accumulate_steps: int = 20
    initial_steps: int = 12

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0 or self.affinity_every_n_steps > 0 or self.track_every_n_steps > 0

    @classmethod
    def from_mapping(cls, cfg: Mapping | None) -> ConflictConfig:
        """Validated config; ``None`` turns everything off (the YAML default turns the metrics on)."""
        if cfg is None:
            return cls()
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"module.conflict must be a mapping with keys {sorted(DEFAULTS)}, got {cfg!r}.")
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"module.conflict.{unknown[0]} is not an option; valid keys: {sorted(DEFAULTS)}.")
        values = {**DEFAULTS, **cfg}
        for key in ("every_n_steps", "affinity_every_n_steps", "track_every_n_steps"):
            hint = f"0 turns it off; default {DEFAULTS[key]}"
            values[key] = checks.non_negative_int(f"module.conflict.{key}", values[key], hint=hint)
        hint = "the EMA's window is about 1 / (1 - ema_beta) tracked steps; e.g. 0.95"
        values["ema_beta"] = checks.fraction("module.conflict.ema_beta", values["ema_beta"], open_high=True, hint=hint)
        hints = {"accumulate_steps": "tracked steps summed per accumulated cosine", "initial_steps": "tracked steps"}
        for key, hint in hints.items():
            hint = f"{hint}; e.g. {DEFAULTS[key]}"
            values[key] = checks.positive_int(f"module.conflict.{key}", values[key], hint=hint)
        checks.choice("module.conflict.source", values["source"], GRAD_SOURCES)
        return cls(**values)


# -- functions of the Gramian ------------------------------------------------------------------------
def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is 0 (the zero-gradient convention of this module)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def gramian(grads: Tensor) -> Tensor:
    """``K = G Gᵀ`` (T×T) in float64; the P-sized product runs in G's dtype (float32 at least)."""
    g = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
    return (g @ g.T).double()


def task_norms(gram: Tensor) -> Tensor:
    return gram.diagonal().clamp_min(0).sqrt()


def pairwise_cosine(gram: Tensor) -> Tensor:
    n = task_norms(gram)
    return _ratio(gram, n[:, None] * n[None, :]).clamp(-1.0, 1.0)


def magnitude_similarity(gram: Tensor) -> Tensor:
    n = task_norms(gram)
    sq = n.square()
    return _ratio(2 * n[:, None] * n[None, :], sq[:, None] + sq[None, :])


def update_cosines(gram: Tensor, grads_dot_update: Tensor, update_sq: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos(u, ḡ), [cos(g_t, u)]_t)`` from K, ``G u`` and ‖u‖² (no P-sized work beyond G u)."""
    gu, un = grads_dot_update.double(), update_sq.double().clamp_min(0).sqrt()
    per_task = _ratio(gu, task_norms(gram) * un).clamp(-1.0, 1.0)
    t = gram.shape[0]
    mean_norm = gram.sum().clamp_min(0).sqrt() / t  # ‖ḡ‖ = √(1ᵀK1) / T
    return _ratio(gu.mean(), mean_norm * un).clamp(-1.0, 1.0), per_task


# -- metrics: means over measured steps ---------------------------------------------------------------
class _MeanOverSteps(RunningMean):
    """Mean of a fixed-shape per-step value over the measured steps (``RunningMean``: float64 ``sum``, ``count``)."""

    def _add(self, value: Tensor) -> None:
        self.last = value  # this step's value, for logging (cheaper than forward(): no state copies)
        self.add(value)


class PairwiseCosine(_MeanOverSteps):
    """Mean over steps of cos(g_i, g_j) (T×T; 0 for a zero gradient). ``update(gram)``."""

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__((num_tasks, num_tasks), **kwargs)

    def update(self, gram: Tensor) -> None:
        self._add(pairwise_cosine(gram))


class ConflictRate(_MeanOverSteps):
    """Share of measured steps with cos(g_i, g_j) < 0 (Yu et al. 2020). ``update(gram)``."""

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__((num_tasks, num_tasks), **kwargs)

    def update(self, gram: Tensor) -> None:
        self._add((pairwise_cosine(gram) < 0).double())


class MagnitudeSimilarity(_MeanOverSteps):
    """Mean over steps of 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) (Yu et al. 2020, Def. 2). ``update(gram)``."""

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__((num_tasks, num_tasks), **kwargs)

    def update(self, gram: Tensor) -> None:
        self._add(magnitude_similarity(gram))


class GradientNorm(_MeanOverSteps):
    """Mean over steps of ‖g_t‖ per task. ``update(gram)``."""

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__((num_tasks,), **kwargs)

    def update(self, gram: Tensor) -> None:
        self._add(task_norms(gram))


class UpdateCosine(_MeanOverSteps):
    """Mean over steps of cos(u, ḡ), u the applied update. ``update(gram, grads_dot_update, update_sq)``."""

    def update(self, gram: Tensor, grads_dot_update: Tensor, update_sq: Tensor) -> None:
        self._add(update_cosines(gram, grads_dot_update, update_sq)[0])


class WorstUpdateCosine(_MeanOverSteps):
    """Mean over steps of min_t cos(g_t, u). ``update(gram, grads_dot_update, update_sq)``."""

    def update(self, gram: Tensor, grads_dot_update: Tensor, update_sq: Tensor) -> None:
        self._add(update_cosines(gram, grads_dot_update, update_sq)[1].min())


class TaskAffinity(_MeanOverSteps):
    """Mean over steps of the lookahead affinity matrix ``Z[i, j] = Z_{i→j}`` (see ``grads.lookahead_affinity``)."""

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__((num_tasks, num_tasks), **kwargs)

    def update(self, affinity: Tensor) -> None:
        self._add(affinity)


class LayerCosine(_MeanOverSteps):
    """Mean over tracked steps of the per-layer cosines ``[L, T, T]`` of the EMA gradients. ``update(grams)``."""

    def __init__(self, num_layers: int, num_tasks: int, **kwargs):
        super().__init__((num_layers, num_tasks, num_tasks), **kwargs)

    def update(self, grams: Tensor) -> None:
        self._add(batched_cosine(grams))


class GateEntropy(_MeanOverSteps):
    """Mean over steps of the batch-mean entropy −Σ_e p_e ln p_e of one task's gate ``p[B, E]`` (nats;
    ln E = uniform over the experts, 0 = one expert only)."""

    def update(self, gates: Tensor) -> None:
        self._add(torch.special.entr(gates.detach().double()).sum(-1).mean())


class ExpertUtilisation(_MeanOverSteps):
    """Mean over steps of the batch-mean gate probability of each expert, ``[E]`` (sums to 1)."""

    def __init__(self, num_experts: int, **kwargs):
        super().__init__((num_experts,), **kwargs)

    def update(self, gates: Tensor) -> None:
        self._add(gates.detach().double().mean(0))


# -- the tracker the module drives --------------------------------------------------------------------
# symmetric: pairs a-b with a before b in config order
PAIRWISE = ("cosine", "magnitude", "rate", "ema_cosine", "accumulated_cosine", "initial_cosine")
OUTPUT = ("output_cosine", "initial_output_cosine")  # pairwise, for pairs of one-output-per-sample tasks only
TRACKED = ("ema_cosine", "accumulated_cosine")  # logged per step (their latest value) at the measured steps
SCALARS = ("update_cosine", "worst_update_cosine")


class ConflictTracker(nn.Module):
    """All conflict metrics of one run, their per-step values, the per-epoch means and the history.

    Key names (agreed across the project): ``train/conflict/{cosine,magnitude,rate}/<a>-<b>``,
    ``train/grad_norm/<task>``, ``train/conflict/update_cosine``, ``train/conflict/worst_update_cosine``,
    ``train/conflict/affinity/<i>-<j>`` (i ≠ j), ``train/gate/entropy/<task>``,
    ``train/gate/utilisation/<task>/e<k>``. The run-level summaries are ``conflict/mean/<name>``, with <name> the
    per-step key without ``train/`` and ``conflict/``.
    The rate logged per step is the running share so far. The low-noise estimators (``track``):
    ``{ema_cosine,accumulated_cosine}/<a>-<b>`` and ``layer_cosine/<layer>/<a>-<b>`` (summaries and per-epoch
    series only); ``layers``: (layer name, columns) of each shared parameter, in ``G``'s column order.
    ``conflict/epoch/<name>``: each training epoch's mean (``epoch_means``).
    """

    def __init__(self, task_names: Sequence[str], config: ConflictConfig, layers: Sequence[tuple[str, int]] = ()):
        super().__init__()
        self.task_names, self.config = list(task_names), config
        t = len(self.task_names)
        self.averages = GradientAverages(config.ema_beta, config.accumulate_steps, layers)
        self.pairs = list(combinations(range(t), 2))
        self.metrics = nn.ModuleDict(
            {
                "cosine": PairwiseCosine(t),
                "magnitude": MagnitudeSimilarity(t),
                "rate": ConflictRate(t),
                "grad_norm": GradientNorm(t),
                "update_cosine": UpdateCosine(),
                "worst_update_cosine": WorstUpdateCosine(),
                "affinity": TaskAffinity(t),
                "ema_cosine": PairwiseCosine(t),
                "accumulated_cosine": PairwiseCosine(t),
                "initial_cosine": PairwiseCosine(t),
                "output_cosine": OutputCosine(t),
                "initial_output_cosine": OutputCosine(t),
            }
        )
        self.scalar_tasks = [True] * t  # tasks with one output per sample (set at the first track_outputs)
        if layers:
            self.metrics["layer_cosine"] = LayerCosine(len(self.averages.layer_names), t)
        # keyed by task index: ModuleDict keys may not shadow Module attributes (a task named "train")
        self.gate_entropy = nn.ModuleDict({f"task{i}": GateEntropy() for i in range(t)})
        self.expert_utilisation = nn.ModuleDict()  # created at the first gates seen (E is known then)
        self._epoch_start: dict[str, tuple[Tensor, Tensor]] = {}
        self.history: list[tuple[int, Tensor, Tensor]] = []  # (step, weights[T], grad norms[T]) per measured step

    # -- when -------------------------------------------------------------------------------------
    def measures(self, step: int) -> bool:
        n = self.config.every_n_steps
        return n > 0 and step % n == 0

    def affinity_due(self, step: int) -> bool:
        n = self.config.affinity_every_n_steps
        return n > 0 and step % n == 0

    def tracks(self, step: int) -> bool:
        """Every ``track_every_n_steps`` steps until ``initial_cosine`` has its ``initial_steps`` values, then on the
        measured steps only, whose ``G`` is computed anyway (a tracked step alone costs ~0.7 of a training step on
        the default model: tracking every 5 steps all run long would cost ~15%, beyond the conflict budget)."""
        n = self.config.track_every_n_steps
        if n == 0 or (step % n and not self.measures(step)):  # neither rule's step: no count read (a host copy)
            return False
        if int(self.metrics["initial_cosine"].count) < self.config.initial_steps:
            return step % n == 0
        return self.measures(step)

    # -- updates: each returns this step's values under their logged keys ------------------------
    def update(self, grads: Tensor, update: Tensor, weights: Tensor, step: int) -> dict[str, Tensor]:
        """One measured step: ``grads`` G[T, P] and the applied ``update`` u[P] over the same inputs."""
        gram = gramian(grads)
        g = grads if grads.dtype in (torch.float32, torch.float64) else grads.float()
        u = update.to(g.dtype)
        gu, uu = (g @ u).double(), (u @ u).double()
        values = {}
        for name in ("cosine", "magnitude", "grad_norm", "rate"):
            self.metrics[name].update(gram)
            values[name] = self.metrics[name].last
        values["rate"] = self.metrics["rate"].compute()  # the running share of conflicting steps
        for name in SCALARS:
            self.metrics[name].update(gram, gu, uu)
            values[name] = self.metrics[name].last
        for name in TRACKED:  # the low-noise estimators' latest values ride along
            last = getattr(self.metrics[name], "last", None)
            if last is not None:
                values[name] = last
        self.history.append((step, weights.detach().double().cpu(), values["grad_norm"].detach().cpu()))
        return self._step_keys(values)

    def track(self, grads: Tensor) -> None:
        """One tracked step: ``G[T, P]`` over the shared parameters folded into the averages (nothing logged)."""
        ema, layers, block = self.averages.update(grads)
        self.metrics["ema_cosine"].update(ema)
        if int(self.metrics["initial_cosine"].count) < self.config.initial_steps:
            self.metrics["initial_cosine"].update(ema)
        if layers is not None:
            self.metrics["layer_cosine"].update(layers)
        if block is not None:
            self.metrics["accumulated_cosine"].update(block)

    def track_outputs(
        self,
        tasks: Mapping[str, Any],
        outputs: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        masks: Mapping[str, Tensor | None],
    ) -> None:
        """One tracked step's function-space cosines (``conflict_output.py``) from the tasks' outputs, labels and
        label masks (``tasks``: name -> task with ``loss``, in config order); nothing logged."""
        residuals, label_masks, self.scalar_tasks = output_residuals(tasks, outputs, labels, masks)
        # the global batch's rows (DDP): every rank then computes what one process computes on the whole batch
        residuals, label_masks = gather_batch(residuals.T).T, gather_batch(label_masks.T).T
        if sum(self.scalar_tasks) < 2:  # no pair of one-output-per-sample tasks: no value
            return
        if int(self.metrics["initial_output_cosine"].count) < self.config.initial_steps:
            self.metrics["initial_output_cosine"].update(residuals, label_masks)
        self.metrics["output_cosine"].update(residuals, label_masks)

    def update_affinity(self, affinity: Tensor) -> dict[str, Tensor]:
        self.metrics["affinity"].update(affinity)
        return self._step_keys({"affinity": self.metrics["affinity"].last})

    def update_gates(self, gates: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Gate metrics for mixture backbones (the seam for MMoE / PLE).

        A backbone that routes each task through a softmax gate over experts exposes, after each
        forward, ``gate_weights``: ``{task: Tensor[B, E]}`` (rows sum to 1; for several gating levels,
        the last one). Logged: ``train/gate/entropy/<task>`` and ``train/gate/utilisation/<task>/e<k>``.
        """
        out = {}
        for i, name in enumerate(self.task_names):
            if name not in gates:
                continue
            g = gates[name].detach()
            key = f"task{i}"
            if key not in self.expert_utilisation:
                self.expert_utilisation[key] = ExpertUtilisation(g.shape[-1]).to(g.device)
            self.gate_entropy[key].update(g)
            self.expert_utilisation[key].update(g)
            out[f"train/gate/entropy/{name}"] = self.gate_entropy[key].last
            for k, v in enumerate(self.expert_utilisation[key].last):
                out[f"train/gate/utilisation/{name}/e{k}"] = v
        return out

    # -- epochs and summaries ------------------------------------------------------------------------
    def _all_metrics(self) -> dict[str, _MeanOverSteps]:
        out = dict(self.metrics.items())
        for i, name in enumerate(self.task_names):
            out[f"gate/entropy/{name}"] = self.gate_entropy[f"task{i}"]
            if f"task{i}" in self.expert_utilisation:
                out[f"gate/utilisation/{name}"] = self.expert_utilisation[f"task{i}"]
        return out

    def start_epoch(self) -> None:
        """Remember the sums so far: the last epoch's mean is a difference of sum/count states."""
        self._epoch_start = {k: (m.sum.clone(), m.count.clone()) for k, m in self._all_metrics().items()}

    def summaries(self) -> dict[str, float]:
        """``conflict/mean/<name>``: the mean over all measured steps. The last epoch's mean is not repeated as a
        summary: it is the last point of the ``conflict/epoch/<name>`` series (a one-point copy of it was ~11
        extra charts ahead of the curves in MLflow's Model metrics tab, issue 16)."""
        out: dict[str, float] = {}
        empty_last_epoch = False
        for key, m in self._all_metrics().items():
            if int(m.count) == 0:
                continue
            out.update({f"conflict/mean/{k}": float(v) for k, v in self._names(key, m.sum / m.count).items()})
            empty_last_epoch |= self._epoch_mean(key, m) is None
        if empty_last_epoch:
            self.warn_unmeasured_last_epoch()
        return out

    def warn_unmeasured_last_epoch(self) -> None:
        """Name only the cadences that are on (an ``=0`` setting measures nothing and is not the cause)."""
        keys = ("every_n_steps", "affinity_every_n_steps", "track_every_n_steps")
        on = [f"module.conflict.{k}={getattr(self.config, k)}" for k in keys if getattr(self.config, k) > 0]
        log.warning(
            "Some conflict metrics were not measured in the last training epoch (it has fewer steps than %s): "
            "the conflict/epoch/* series have no point for it; lower %s to get one.",
            " or ".join(on),
            "that setting" if len(on) == 1 else "those settings",
        )

    def _epoch_mean(self, key: str, m: _MeanOverSteps) -> Tensor | None:
        """The mean over this epoch's measurements (since ``start_epoch``), None when there were none."""
        s0, c0 = self._epoch_start.get(key, (torch.zeros_like(m.sum), torch.zeros_like(m.count)))
        if int(m.count - c0.to(m.count)) == 0:
            return None
        return (m.sum - s0.to(m.sum)) / (m.count - c0.to(m.count))

    def epoch_means(self) -> dict[str, float]:
        """``conflict/epoch/<name>``: this training epoch's mean of every metric measured in it (the per-epoch
        series; the module logs it at each training epoch's end)."""
        out: dict[str, float] = {}
        for key, m in self._all_metrics().items():
            mean = self._epoch_mean(key, m)
            if mean is not None:
                out.update({f"conflict/epoch/{k}": float(v) for k, v in self._names(key, mean).items()})
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """The metrics' sum/count states (torchmetrics keeps them out of ``state_dict``), the epoch start and
        the history, so a resumed run continues its running rates, summaries and plots."""
        metrics = {f"metrics.{k}": m for k, m in self.metrics.items()}
        metrics.update({f"gate_entropy.{k}": m for k, m in self.gate_entropy.items()})
        metrics.update({f"expert_utilisation.{k}": m for k, m in self.expert_utilisation.items()})
        return {
            "metrics": {k: [m.sum, m.count] for k, m in metrics.items()},
            "epoch_start": {k: list(v) for k, v in self._epoch_start.items()},
            "history": [list(h) for h in self.history],
            "averages": self.averages.state(),
            "scalar_tasks": list(self.scalar_tasks),
        }

    def set_extra_state(self, state: dict) -> None:
        for key, (total, count) in state["metrics"].items():
            group, name = key.split(".", 1)
            if group == "expert_utilisation" and name not in self.expert_utilisation:
                self.expert_utilisation[name] = ExpertUtilisation(total.shape[-1])
            metric = getattr(self, group)[name]
            metric.sum, metric.count = total.to(metric.sum.device), count.to(metric.count.device)
        self._epoch_start = {k: (v[0], v[1]) for k, v in state["epoch_start"].items()}
        self.history = [(int(h[0]), h[1], h[2]) for h in state["history"]]
        self.scalar_tasks = list(state.get("scalar_tasks", self.scalar_tasks))
        if "averages" in state:  # absent from checkpoints written before the low-noise estimators
            self.averages.load(state["averages"])

    def mean_cosine(self) -> Tensor | None:
        m = self.metrics["cosine"]
        return None if int(m.count) == 0 else (m.sum / m.count).cpu()

    # -- names -------------------------------------------------------------------------------------
    def _names(self, key: str, value: Tensor) -> dict[str, Tensor]:
        """``{summary name: value}`` for one metric's value (its layout follows from ``key``)."""
        names = self.task_names
        if key in PAIRWISE:
            return {f"{key}/{names[i]}-{names[j]}": value[i, j] for i, j in self.pairs}
        if key in OUTPUT:
            pairs = [(i, j) for i, j in self.pairs if self.scalar_tasks[i] and self.scalar_tasks[j]]
            return {f"{key}/{names[i]}-{names[j]}": value[i, j] for i, j in pairs}
        if key == "affinity":
            t = range(len(names))
            return {f"affinity/{names[i]}-{names[j]}": value[i, j] for i in t for j in t if i != j}
        if key == "layer_cosine":
            layers = self.averages.layer_names
            return {
                f"layer_cosine/{layer}/{names[i]}-{names[j]}": value[k, i, j]
                for k, layer in enumerate(layers)
                for i, j in self.pairs
            }
        if key == "grad_norm":
            return {f"grad_norm/{n}": value[i] for i, n in enumerate(names)}
        if key.startswith("gate/utilisation/"):
            return {f"{key}/e{k}": v for k, v in enumerate(value)}
        return {key: value}

    def _step_keys(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for key, value in values.items():
            for name, v in self._names(key, value).items():
                out[f"train/{name}" if name.startswith("grad_norm/") else f"train/conflict/{name}"] = v
        return out
