"""Timing helpers shared by the measurements.

Timing on shared machines is noisy, so every measurement runs its contenders interleaved (A, B, C, A, B, C, ...)
for ``--repeats`` rounds after an untimed warm-up, and reports medians (and ratios of medians): a slow phase of
the machine hits every contender alike. The thread count is torch's default. ``Stopwatch`` times a span in wall and
process CPU seconds at once (``Seconds``), for the measurements that report both.

Peak memory is the peak resident set size (``ru_maxrss``) minus the RSS after imports; tracemalloc cannot see
torch's allocations, and a process has one peak, so each such measurement runs in a fresh process
(``fresh_process``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl

K = TypeVar("K")
V = TypeVar("V")

# the folder that holds the package: a child process started from anywhere imports this same code
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def interleaved(runs: Mapping[K, Callable[[], V]], rounds: int) -> dict[K, list[V]]:
    """``rounds`` rounds of every run in turn (A, B, C, A, B, C, ...); the values of each run in order."""
    values: dict[K, list[V]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            values[key].append(run())
    return values


def medians(values: Mapping[K, list[float]]) -> dict[K, float]:
    return {key: statistics.median(v) for key, v in values.items()}


class Seconds(float):
    """Wall seconds of a span, carrying the process's CPU seconds over the same span (all its threads) as ``cpu`` and
    the measuring thread's as ``thread``.

    A float, so callers that divide by the wall time are unchanged. CPU time leaves out the time spent waiting for
    a core, which only stretches the wall time; another process's load still inflates it through shared caches and
    cores, so neither clock replaces a quiet machine."""

    cpu: float
    thread: float

    def __new__(cls, wall: float, cpu: float, thread: float) -> Seconds:
        value = super().__new__(cls, wall)
        value.cpu, value.thread = cpu, thread
        return value


class Stopwatch:
    """Started when made; ``elapsed()`` is the wall, process CPU and thread CPU time since, as ``Seconds``."""

    def __init__(self):
        self.wall, self.cpu, self.thread = time.perf_counter(), time.process_time(), time.thread_time()

    def elapsed(self) -> Seconds:
        now = time.perf_counter(), time.process_time(), time.thread_time()
        return Seconds(now[0] - self.wall, now[1] - self.cpu, now[2] - self.thread)


class StepTimer(pl.Callback):
    """Wall time of the training steps alone (batch start to batch end), without fit set-up or epoch ends."""

    def __init__(self):
        self.seconds, self.steps, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.steps += 1

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps


class EpochTimer(pl.Callback):
    """Seconds of each training epoch, start to start (the last one ends at on_train_end), so the
    module's own epoch-end work (train metrics) is inside the epoch it belongs to."""

    def __init__(self):
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.marks.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def rss_mb() -> float:
    """The resident set size now (Linux /proc), else the peak so far (ru_maxrss), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


def fresh_process(module: str, args: list[str], what: str) -> dict[str, Any]:
    """``python -m module args`` in a new interpreter; the JSON object on the last line it prints."""
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
