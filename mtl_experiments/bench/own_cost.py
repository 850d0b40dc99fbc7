"""Where ``MTLModule``'s own cost per step goes: thread CPU time of each part of its step, beside Lightning's floor.

``python -m mtl_experiments.bench.own_cost [--epochs 3] [--rounds 3] [overrides...]`` trains ``MTLModule`` as
configured and ``bench.floor.FloorModule`` (the plain step under the same bare ``Trainer``) in interleaved rounds,
after one untimed epoch each, and prints the median CPU µs per optimizer step of: each whole fit, each training
step, and the parts of ours (``PARTS``: the methods of the step's path, each timed while it runs). CPU time of the
one training thread (run it with ``OMP_NUM_THREADS=1``), not wall time: on a shared machine another process's load
inflates both alike but does not enter the figure as waiting. Parts nest (``_backward`` holds ``manual_backward``),
so they do not add up; ours minus the floor is the cost to account for. The timers cost ~1 µs per call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mtl_experiments import grads, module
from mtl_experiments.bench.build import compose_config, lightning_fit, load_data
from mtl_experiments.bench.floor import FloorModule, floor_fit
from mtl_experiments.kept_outputs import KeptOutputs
from mtl_experiments.metrics.conflict import ConflictTracker

# (owner, method name, label): the step's path, in the order it runs
PARTS = (
    (module.MTLModule, "training_step", "ours: training_step"),
    (module.MTLModule, "_losses", "_losses"),
    (module.MTLModule, "_check_losses", "_check_losses (non-finite, divergence)"),
    (grads, "plan", "grads.plan"),
    (grads.StepGradients, "compute", "StepGradients.compute (G)"),
    (module.MTLModule, "_backward", "_backward"),
    (module.MTLModule, "manual_backward", "  manual_backward"),
    (module.MTLModule, "_measure", "_measure (conflict, affinity)"),
    (ConflictTracker, "track_outputs", "ConflictTracker.track_outputs"),
    (KeptOutputs, "append", "KeptOutputs.append"),
    (module.MTLModule, "_log_step", "_log_step"),
    (module.MTLModule, "on_train_epoch_end", "on_train_epoch_end (train metrics)"),
    (FloorModule, "training_step", "floor: training_step"),
    (FloorModule, "manual_backward", "floor:   manual_backward"),
)


@contextmanager
def timed_parts(parts=PARTS) -> Iterator[Counter]:
    """Each part's method wrapped to add its thread CPU seconds to the yielded counter; restored on exit."""
    seconds: Counter = Counter()
    saved = [(owner, name, vars(owner).get(name)) for owner, name, _ in parts]  # None: inherited
    for owner, name, label in parts:
        setattr(owner, name, _timer(getattr(owner, name), label, seconds))
    try:
        yield seconds
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _timer(fn: Callable, label: str, seconds: Counter) -> Callable:
    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[label] += time.thread_time() - start

    return timed


def measure(overrides: list[str], epochs: int, rounds: int) -> tuple[dict[str, float], int]:
    """Median CPU µs per step of each fit and part over ``rounds`` interleaved rounds; the steps per fit."""
    cfg = compose_config(overrides)
    datamodule = load_data(cfg)
    steps = epochs * len(datamodule.train_dataloader())
    fits = {"ours: fit": lightning_fit, "floor: fit": floor_fit}
    for fit in fits.values():  # warm-up: first calls, caches
        fit(cfg, datamodule, 1)
    per_round: dict[str, list[float]] = defaultdict(list)
    with timed_parts() as seconds:
        for _ in range(rounds):
            seconds.clear()
            for label, fit in fits.items():
                per_round[label].append(fit(cfg, datamodule, epochs).cpu)  # the process's CPU time of fit alone
            for label, value in seconds.items():
                per_round[label].append(value)
    return {label: 1e6 * statistics.median(v) / steps for label, v in per_round.items()}, steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_args(argv)
    us, steps = measure(args.overrides, args.epochs, args.rounds)
    print(f"CPU µs per step, median of {args.rounds} rounds of {steps} steps ({args.epochs} epochs)")
    order = ["ours: fit", "floor: fit", *(label for _, _, label in PARTS)]
    for label in sorted(us, key=order.index):
        print(f"{label:42s} {us[label]:9.1f}")
    print(f"{'ours - floor (the cost to account for)':42s} {us['ours: fit'] - us['floor: fit']:9.1f}")
    return us


if __name__ == "__main__":
    main()
