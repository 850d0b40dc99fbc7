"""Adapter for TorchJD's aggregators (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024; PyPI ``torchjd``, pinned ``>=0.18,<0.19``). The only file that imports TorchJD.

We do not use TorchJD's ``backward``/``mtl_backward``: they bypass Lightning's ``manual_backward``
(precision and strategy hooks) and do no DDP gradient sync. Instead our step computes the Jacobian
``G[T, P]`` once (``grads.py``) and the aggregator is called on it as a pure function. Aggregators
that weight the rows of G (``WeightedAggregator``) report those weights; those whose weights depend on G only
through its Gramian (``GramianWeightedAggregator``: Aligned-MTL, ...) get ``K = G Gᵀ`` and the update ``wᵀG`` from
``loss.base`` (float64 over column blocks, no float64 copy of G); for the others (PCGrad,
GradDrop, ...) the logged weights are the least-squares effective weights of the update.
Every aggregator runs in float64 (the Gramian is T×T; the Jacobian is cast once) and its result is cast
back to the gradients' dtype: TorchJD's numerical cut-offs are relative to the input dtype's machine
epsilon, which in float32 made Aligned-MTL drop a principal component of J = [[1, 0], [-1000, 1]] (issue 14).

Randomised aggregators draw from the global RNG; each call runs inside ``torch.random.fork_rng``
seeded from this adapter's own generator, so they neither disturb nor depend on the training RNG
(dropout, shuffling) and a run is reproducible for its seed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator

from mtl_experiments.errors import ConfigError
from mtl_experiments.loss.base import GradientAggregation, effective_weights, gramian_update


class TorchJD(GradientAggregation):
    """``update = aggregator(G)``; ``aggregator`` is any ``torchjd.aggregation.Aggregator`` (from YAML)."""

    def __init__(self, aggregator: Aggregator, grad_source: str = "params", seed: int = 0):
        super().__init__(grad_source=grad_source)
        self.aggregator = aggregator
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def setup(self, tasks, model=None) -> None:
        super().setup(tasks, model)
        # TorchJD checks some options only when called: try it once now, so a bad value stops the run
        # at start-up with the key named, not at the first training step
        try:
            self.aggregate(torch.eye(self.num_tasks, dtype=torch.float64))
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"loss.aggregator ({type(self.aggregator).__name__}): {e}") from e
        self._generator.manual_seed(self.seed)  # the trial draw must not shift the run's sequence

    def aggregate(self, grads: Tensor) -> tuple[Tensor, Tensor]:
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        devices = [grads.device] if grads.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # seed only what fork_rng restores (torch.manual_seed would also reseed other devices for good)
            torch.random.default_generator.manual_seed(seed)
            for device in devices:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            # in float64: TorchJD's cut-offs use the Jacobian's machine epsilon (Aligned-MTL's rank cut-off at
            # T·eps·λ_max drops a float32 component once two norms differ by ~1e3: issue 14)
            if isinstance(self.aggregator, GramianWeightedAggregator):  # weights from the T×T Gramian alone
                return gramian_update(grads, self.aggregator.gramian_weighting)
            g = grads.detach().to(torch.float64)
            if isinstance(self.aggregator, WeightedAggregator):
                weights = self.aggregator.weighting(g)
                return (weights @ g).to(grads.dtype), weights.to(grads.dtype)
            update = self.aggregator(g)
        return update.to(grads.dtype), effective_weights(g, update).to(grads.dtype)

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
