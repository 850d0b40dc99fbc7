"""What MLflow's metric writes cost the training thread: synchronous against the logger's writer thread (issue 17).

Two measurements in one process, on a real SQLite store in a temporary folder (its schema made once, untimed):

- ``call_us``: microseconds one ``ResilientMLFlowLogger.log_metrics`` call of ``keys`` values keeps the calling
  thread, median of ``calls`` calls, ``synchronous=True`` (the write happens in the call) against the default (the
  call queues the values; one ``flush`` at the end, timed apart as ``flush_ms``);
- ``run``: seconds per training step of a real run (the configured model, data and ``trainer.log_every_n_steps``;
  no validation, checkpoints or progress bar, as ``bench.build.bare_trainer``) with no logger, with the logger
  writing synchronously and with its writer thread, from the first step to the end of training (``end_ms``: from
  there until ``fit`` returned, the final drain of the queue and the run's status), contenders interleaved for
  ``repeats`` rounds after a warm-up, medians (``us_per_step_rounds``: every round); ``async_us_per_step`` /
  ``sync_us_per_step``: each minus no logger, per step. Beside the wall time, ``thread_cpu_us_per_step`` (the
  training thread's CPU time, which load on a shared machine disturbs less) and ``process_cpu_us_per_step`` (all
  threads: the writer's work too, which still holds the GIL for its Python part).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mtl_experiments.bench.build import bare_trainer, build_module, compose_config, load_data
from mtl_experiments.bench.timing import Seconds, Stopwatch, interleaved
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.tracking import ResilientMLFlowLogger, ensure_experiment

NONE, SYNC, ASYNC = "no_logger", "mlflow_sync", "mlflow_async"
EXPERIMENT = "bench-tracking-writes"


class TrainClock(pl.Callback):
    """When training starts (after set-up and the run's params) and ends (before ``finalize``), and its steps; wall
    time, the training thread's CPU time and the process's (all threads: the writer's too)."""

    def __init__(self):
        self.clock = self.after = Stopwatch()
        self.span, self.steps = Seconds(0.0, 0.0, 0.0), 0

    def on_train_start(self, trainer, pl_module):
        self.clock = Stopwatch()

    def on_train_end(self, trainer, pl_module):
        self.span, self.steps, self.after = self.clock.elapsed(), trainer.global_step, Stopwatch()

    def per_step(self) -> tuple[float, float, float]:
        return tuple(seconds / self.steps for seconds in (float(self.span), self.span.thread, self.span.cpu))


def new_logger(uri: str, synchronous: bool) -> ResilientMLFlowLogger:
    logger = ResilientMLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=uri, synchronous=synchronous)
    logger.experiment  # noqa: B018 - the run is created here, untimed (a real run creates it before fit)
    return logger


def call_us(uri: str, synchronous: bool, calls: int, keys: int) -> tuple[float, float]:
    """(median µs per ``log_metrics`` call on the calling thread, ms of the final flush)."""
    logger = new_logger(uri, synchronous)
    times = []
    for step in range(calls):
        metrics = {f"train/m{i}": step + i / 7 for i in range(keys)}
        start = time.perf_counter()
        logger.log_metrics(metrics, step=step)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    logger.finalize("success")
    return 1e6 * statistics.median(times), 1e3 * (time.perf_counter() - start)


def run_seconds(cfg: DictConfig, datamodule: TabularDataModule, epochs: int, uri: str, mode: str) -> tuple:
    """(wall, training-thread CPU, process CPU seconds per training step; seconds from the end of training until
    ``fit`` returned: finalize, the drain)."""
    clock = TrainClock()
    trainer = bare_trainer(epochs, [clock], int(cfg.trainer.log_every_n_steps))
    if mode != NONE:
        trainer.loggers = [new_logger(uri, synchronous=mode == SYNC)]
    trainer.fit(build_module(cfg, datamodule), datamodule=datamodule)
    return (*clock.per_step(), float(clock.after.elapsed()))


def run(overrides: list[str], epochs: int, repeats: int, calls: int = 200, keys: int = 12) -> dict:
    cfg = compose_config(overrides)
    datamodule = load_data(cfg)
    with tempfile.TemporaryDirectory(prefix="mtl-bench-tracking-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        ensure_experiment(uri, EXPERIMENT)
        per_call = interleaved(
            {SYNC: lambda: call_us(uri, True, calls, keys), ASYNC: lambda: call_us(uri, False, calls, keys)}, repeats
        )
        modes = {m: (lambda m=m: run_seconds(cfg, datamodule, epochs, uri, m)) for m in (NONE, SYNC, ASYNC)}
        interleaved(modes, 1)  # warm-up
        runs = interleaved(modes, repeats)
    steps = {m: statistics.median(v[0] for v in values) for m, values in runs.items()}
    result = {
        "call_us": {m: statistics.median(v[0] for v in values) for m, values in per_call.items()},
        "flush_ms": {m: statistics.median(v[1] for v in values) for m, values in per_call.items()},
        "us_per_step": {m: 1e6 * s for m, s in steps.items()},
        "us_per_step_rounds": {m: [round(1e6 * v[0]) for v in values] for m, values in runs.items()},
        "thread_cpu_us_per_step": {m: 1e6 * statistics.median(v[1] for v in values) for m, values in runs.items()},
        "process_cpu_us_per_step": {m: 1e6 * statistics.median(v[2] for v in values) for m, values in runs.items()},
        "end_ms": {m: 1e3 * statistics.median(v[3] for v in values) for m, values in runs.items()},
        "sync_us_per_step": 1e6 * (steps[SYNC] - steps[NONE]),
        "async_us_per_step": 1e6 * (steps[ASYNC] - steps[NONE]),
        "ratio_async_sync": steps[ASYNC] / steps[SYNC],
        "steps": epochs * len(datamodule.train_dataloader()),
        "log_every_n_steps": int(cfg.trainer.log_every_n_steps),
        "keys": keys,
        "overrides": overrides,
    }
    print_table(result)
    return result


def print_table(result: dict) -> None:
    title = f"MLflow metric writes and the training thread (SQLite store, {result['keys']} values per call)"
    table = Table(title=title)
    columns = ("", "µs per call", "flush ms", "µs/step wall", "rounds", "thread CPU µs/step", "process CPU", "end ms")
    for column in columns:
        table.add_column(column)
    for mode in (NONE, SYNC, ASYNC):
        table.add_row(
            mode,
            f"{result['call_us'][mode]:.0f}" if mode != NONE else "",
            f"{result['flush_ms'][mode]:.1f}" if mode != NONE else "",
            f"{result['us_per_step'][mode]:.0f}",
            " ".join(str(v) for v in result["us_per_step_rounds"][mode]),
            f"{result['thread_cpu_us_per_step'][mode]:.0f}",
            f"{result['process_cpu_us_per_step'][mode]:.0f}",
            f"{result['end_ms'][mode]:.0f}",
        )
    Console().print(table)
    Console().print(
        f"wall per step minus no logger: sync {result['sync_us_per_step']:+.0f} µs, async "
        f"{result['async_us_per_step']:+.0f} µs; async / sync {result['ratio_async_sync']:.3f} "
        f"({result['steps']} steps, log_every_n_steps={result['log_every_n_steps']})"
    )
