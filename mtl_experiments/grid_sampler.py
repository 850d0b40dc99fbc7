"""An Optuna sampler that runs every combination of a discrete search space once: a sweep over a grid (the
simplex points × the seeds of ``hparams_search=scalarization``) through the project's Optuna sweeper.

Optuna's ``BruteForceSampler`` enumerates the combinations (``range()`` and ``choice()`` sweeps) without
repetition, in a seeded order; it then calls ``study.stop()``, which outside ``study.optimize`` raises, and the
sweeper drives its study by ask and tell. So this one never stops the study: the sweeper's ``n_trials`` is the
grid size (the product of the swept values' counts), and a larger ``n_trials`` repeats combinations, which
``mtl-compare`` counts once.
"""

from __future__ import annotations

from collections.abc import Sequence

from optuna.samplers import BruteForceSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


class EveryCombination(BruteForceSampler):
    """``BruteForceSampler`` without the ``study.stop()`` of its last trial (the sweeper runs ``n_trials``)."""

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        return None
