"""One point of a static-weight sweep over the probability simplex, resolved against the data's tasks.

The tuned-scalarization baseline (Xin et al., "Do Current Multi-Task Optimization Methods in Deep Learning Even
Help?", NeurIPS 2022; Kurin et al., "In Defense of the Unitary Scalarization for Deep Multi-Task Learning",
NeurIPS 2022) trains ``Σ_t w_t·L_t`` for many static ``w`` on the simplex ``{w ≥ 0, Σ_t w_t = 1}``; the
non-dominated results trace the front every adaptive method is compared with.

A sweep cannot know the task names when it expands its jobs (``data.tasks: null`` lets a dataset choose them),
so a job gets an ``index`` into a point set of ``points`` points that depends only on the task count T:

- T = 2: the lattice ``w = (1 − i/(N−1), i/(N−1))``, i = 0..N−1 (both vertices included);
- T = 3: the lattice of step 1/n, ``w = (a, b, c)/n`` with a + b + c = n, in lexicographic order from
  (n, 0, 0); it has (n+1)(n+2)/2 points, so ``points`` must be a triangular number 3, 6, 10, 15, ...;
- T ≥ 4: point 0 is the centre (equal weights, 1/T each), points 1..N−1 are Dirichlet(α·1) samples
  (α = 1: uniform on the simplex) from a generator seeded by (``seed``, T), so every job draws the same set.

``loss=fixed 'loss.weights={_target_: mtl_experiments.loss.simplex.SimplexPoint, index: 3, points: 10}'`` — or
``hparams_search=scalarization``, which sweeps ``index`` over ``range(0, points)`` and the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError

KEY = "loss.weights"


def lattice(num_tasks: int, steps: int) -> list[tuple[float, ...]]:
    """Every ``w = k / steps`` with non-negative integers ``k`` summing to ``steps``, lexicographically from
    ``(steps, 0, ..., 0)`` down to ``(0, ..., 0, steps)``."""

    def parts(total: int, slots: int) -> list[tuple[int, ...]]:
        if slots == 1:
            return [(total,)]
        return [(k, *rest) for k in range(total, -1, -1) for rest in parts(total - k, slots - 1)]

    return [tuple(k / steps for k in p) for p in parts(steps, num_tasks)]


def triangular_steps(points: int) -> int | None:
    """``n`` with (n+1)(n+2)/2 = ``points`` (the 3-task lattice of step 1/n), None when there is none."""
    n = round((math.sqrt(8 * points + 1) - 3) / 2)
    return n if n >= 1 and (n + 1) * (n + 2) // 2 == points else None


def dirichlet_points(num_tasks: int, points: int, seed: int, alpha: float) -> np.ndarray:
    """``[points, T]``: the centre, then ``points − 1`` Dirichlet(α·1) samples seeded by (seed, T)."""
    rng = np.random.default_rng([seed, num_tasks])
    samples = rng.dirichlet(np.full(num_tasks, alpha), size=points - 1)
    return np.vstack([np.full((1, num_tasks), 1.0 / num_tasks), samples])


class SimplexPoint:
    """Static weights ``w`` = point ``index`` of the ``points``-point simplex set for the data's T tasks."""

    def __init__(self, index: int, points: int = 10, seed: int = 0, alpha: float = 1.0):
        self.points = checks.integer(f"{KEY}.points", points, low=2, hint="how many weightings the sweep has")
        self.index = checks.non_negative_int(f"{KEY}.index", index)
        self.seed = checks.non_negative_int(f"{KEY}.seed", seed)
        self.alpha = checks.positive_number(f"{KEY}.alpha", alpha, hint="1.0: uniform on the simplex")

    def all_points(self, num_tasks: int) -> np.ndarray:
        """``[points, T]``: the whole set this point is one of."""
        if num_tasks < 2:
            raise ConfigError(f"A simplex sweep needs at least 2 tasks, got {num_tasks} (use loss=equal).")
        if num_tasks == 2:
            return np.array(lattice(2, self.points - 1))
        if num_tasks == 3:
            steps = triangular_steps(self.points)
            if steps is None:
                checks.fail(
                    f"{KEY}.points",
                    "a triangular number for 3 tasks (the lattice of step 1/n has (n+1)(n+2)/2 points)",
                    self.points,
                    "e.g. 6, 10 or 15, with loss.weights.index=range(0,<points>)",
                )
            return np.array(lattice(3, steps))
        return dirichlet_points(num_tasks, self.points, self.seed, self.alpha)

    def for_tasks(self, task_names: Sequence[str]) -> dict[str, float]:
        """``{task: w_task}`` of this point for these tasks (config order)."""
        if self.index >= self.points:
            checks.fail(
                f"{KEY}.index",
                f"< loss.weights.points = {self.points}",
                self.index,
                f"sweep loss.weights.index=range(0,{self.points}) or raise loss.weights.points",
            )
        w = self.all_points(len(task_names))[self.index]
        return {t: float(v) for t, v in zip(task_names, w, strict=True)}

    def __repr__(self) -> str:
        return f"SimplexPoint(index={self.index}, points={self.points}, seed={self.seed}, alpha={self.alpha})"
