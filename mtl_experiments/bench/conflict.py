"""The cost of the task-conflict metrics (``--conflict``), measured two ways, all contenders interleaved.

- Whole fits: the Lightning path with ``module.conflict`` as configured (every 50 steps by default; 50 if the
  config turns it off) against the same run with ``module.conflict.every_n_steps=0`` (and no affinity); the
  overhead is median samples/s off / on - 1. The direct answer, but a few % is within a shared machine's
  run-to-run noise.
- One measurement: ms per training step with the metrics measured (and logged) at every step against never,
  both logging every step. Divided by ``every`` x the step time without metrics it estimates the overhead at
  that cadence from many more measurements, so it is far less noisy.
  The measured steps include the low-noise estimators' updates (after their initial window they are tracked on
  the measured steps only).
- One tracked step of the initial window (``track_every_n_steps`` until ``initial_cosine`` has ``initial_steps``
  values: a per-task gradient computation of its own): ms per step tracking every step (window never ending)
  against never; the window costs ``initial_steps`` of them once per run, reported in training steps.

Use ``loss=...`` to measure it under a method (a gradient method already computes the gradients the metrics
reuse; ``equal`` is the worst case).
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from mtl_experiments.bench.build import (
    compose_config,
    lightning_fit,
    load_data,
    step_ms,
    with_conflict,
    with_module_option,
)
from mtl_experiments.bench.timing import interleaved, medians
from mtl_experiments.data.spec import num_rows

CONFLICT_ON = "conflict_on"
CONFLICT_OFF = "conflict_off"
EVERY_STEP = "measured_every_step"
TRACKED_EVERY_STEP = "tracked_every_step"
NEVER = "never_measured"
CONFLICT_TARGET = 0.05


def report(rates: dict[str, list[float]], ms: dict[str, list[float]], title: str) -> None:
    table = Table(title=title)
    table.add_column("contender")
    table.add_column("median", justify="right")
    table.add_column("runs", justify="right")
    for name, value in medians(rates).items():
        table.add_row(name, f"{value:,.0f} samples/s", " ".join(f"{v:,.0f}" for v in rates[name]))
    for name, value in medians(ms).items():
        table.add_row(f"{name} (log every step)", f"{value:.2f} ms/step", " ".join(f"{v:.2f}" for v in ms[name]))
    Console(width=120).print(table)


def with_tracking(cfg, every_n_steps: int, track_every_n_steps: int, **options):
    """``with_conflict`` with the low-noise estimators tracked every ``track_every_n_steps`` steps (0: never)."""
    cfg = with_conflict(cfg, every_n_steps)
    conflict = {**cfg.module.conflict, "track_every_n_steps": track_every_n_steps, **options}
    return with_module_option(cfg, "conflict", conflict)


def run(overrides: list[str], epochs: int, repeats: int) -> dict:
    """The conflict metrics' cost, whole fits on against off and per measurement; prints the table and the
    overheads and returns the numbers ``--json`` writes."""
    cfg = compose_config(overrides)
    datamodule = load_data(cfg)
    rows = num_rows(datamodule.splits["train"])
    every = (cfg.module.get("conflict") or {}).get("every_n_steps") or 50
    track = (cfg.module.get("conflict") or {}).get("track_every_n_steps") or 0
    on_cfg, off_cfg = with_tracking(cfg, every, track), with_tracking(cfg, 0, 0)
    fits = {CONFLICT_ON: on_cfg, CONFLICT_OFF: off_cfg}
    window = with_tracking(cfg, 0, 1, initial_steps=10**9)  # the initial window, never ending
    steps = {EVERY_STEP: with_tracking(cfg, 1, track), TRACKED_EVERY_STEP: window, NEVER: off_cfg}
    for run_cfg in fits.values():  # warm-up, untimed
        lightning_fit(run_cfg, datamodule, 1)
    for run_cfg in steps.values():
        step_ms(run_cfg, datamodule, 1, log_every_n_steps=1)
    runs = {name: (lambda c=c: epochs * rows / lightning_fit(c, datamodule, epochs)) for name, c in fits.items()}
    runs |= {name: (lambda c=c: step_ms(c, datamodule, epochs, log_every_n_steps=1)) for name, c in steps.items()}
    values = interleaved(runs, repeats)  # per round: the two fits, then the two step timings
    rates, ms = {name: values[name] for name in fits}, {name: values[name] for name in steps}
    median, ms_median = medians(rates), medians(ms)
    overhead = median[CONFLICT_OFF] / median[CONFLICT_ON] - 1
    per_measurement_ms = ms_median[EVERY_STEP] - ms_median[NEVER]
    per_tracked_ms = ms_median[TRACKED_EVERY_STEP] - ms_median[NEVER]
    step_ms_off = 1e3 * datamodule.batch_size / median[CONFLICT_OFF]
    estimate = per_measurement_ms / (every * step_ms_off)
    initial_steps = (cfg.module.get("conflict") or {}).get("initial_steps") or 0
    window_steps = initial_steps * per_tracked_ms / step_ms_off if track else 0.0
    report(
        rates,
        ms,
        f"conflict metrics every {every} steps, tracked every {track or 'never'} vs off: {rows} train rows, "
        f"batch {datamodule.batch_size}, "
        f"loss {cfg.loss._target_.rsplit('.', 1)[-1]}, {epochs} epoch(s) x {repeats} round(s)",
    )
    print(f"conflict metrics overhead (whole fits) = {overhead:+.1%} (median off / on - 1; target <= 5%)")
    print(
        f"one measurement costs {per_measurement_ms:+.2f} ms: estimated overhead every {every} steps = {estimate:+.1%}"
        "; "
        f"one tracked step {per_tracked_ms:+.2f} ms: the initial window ({initial_steps} tracked steps) costs "
        f"{window_steps:.1f} training steps once per run"
    )
    return {
        "overrides": overrides,
        "every_n_steps": every,
        "track_every_n_steps": track,
        "train_rows": rows,
        "epochs": epochs,
        "repeats": repeats,
        "num_threads": torch.get_num_threads(),
        "samples_per_s": median,
        "runs_samples_per_s": rates,
        "overhead": overhead,
        "ms_per_step": ms_median,
        "runs_ms_per_step": ms,
        "ms_per_measurement": per_measurement_ms,
        "ms_per_tracked_step": per_tracked_ms,
        "initial_window_in_steps": window_steps,
        "estimated_overhead": estimate,
        "target_overhead": CONFLICT_TARGET,
    }
