"""What a weighting's iterative solver (or its fallback) did at its last call, for ``log_values`` (issue 14).

Logged by the module as ``train/weighting/iterations``, ``train/weighting/converged`` (1 or 0) and
``train/weighting/fallback`` (1 when the method took its documented fallback); the first fallback and the first
non-convergence of a run are also written to the Python log as a warning.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class SolverReport:
    """The last solve of one weighting: iterations used, whether it converged, which fallback it took (if any)."""

    def __init__(self, method: str):
        self.method = method
        self.values: dict[str, float] = {}
        self.warned: set[str] = set()

    def record(self, iterations: int, converged: bool, fallback: str | None = None) -> None:
        self.values = {
            "weighting/iterations": float(iterations),
            "weighting/converged": float(converged),
            "weighting/fallback": float(fallback is not None),
        }
        if not converged:
            self.warn_once("not converged", f"{self.method}: the solver did not converge in {iterations} iterations")
        if fallback is not None:
            self.warn_once("fallback", f"{self.method}: {fallback}")

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            log.warning("%s (warned once per run; see train/weighting/*)", message)

    def log_values(self) -> dict[str, Tensor]:
        return {k: torch.tensor(v) for k, v in self.values.items()}
