"""Logs larger than memory (``--stream-scale``): peak memory and training throughput of ``data=stream`` against the
in-memory ``recsys_synthetic`` at the same number of rows.

For each size N (``--rows``, default 1M and 10M) the log is written once by ``scripts/make_log.py`` (100k users,
20k items, one shard per million rows, kept in ``--log-dir``). Each contender then runs in a fresh process
(``python -m mtl_experiments.bench.stream_scale MODE ROWS LOG_DIR STEPS WORKERS``), so every peak is its own:

- ``stream``: ``data=stream data.path=<log>`` with ``WORKERS`` DataLoader workers (``--workers``, default 2);
  the statistics pass runs uncached (a fresh cache folder) and is timed: rows/s of the pass;
- ``memory``: ``data=recsys_synthetic`` with the same users, items and N interactions, generated in memory; only
  up to ``MEMORY_MAX_ROWS`` (about 280 bytes per row per process: 100M rows would need ~28 GB).

Both train the default model (``backbone=shared_bottom``, the four default tasks, batch 512) for ``--steps``
steps (default 300) on a bare CPU trainer. Three clocks (``SteadyClock``), data loading included in each (that is
what streaming costs): ``samples_per_s`` = steps x batch / the wall time of ``fit`` (start-up charged to it);
``first_batch_s`` = from calling ``fit`` to the first step's start (the stream forks its workers and fills their
shuffle buffers then); ``steady_samples_per_s`` = the batches after the first ``warmup`` steps (the same k for both
contenders) / the wall time from the end of step k to the end of the last step. ``cpu_ms_per_step`` (the trainer
process) and ``worker_cpu_ms_per_step`` (its DataLoader workers together, reaped when ``fit`` ends) say where the
CPU time went: on a machine with fewer free cores than processes they compete. Peak RSS = the process's peak
resident set size plus the largest peak of its DataLoader workers (separate processes); set-up time = datamodule
construction and ``setup``.
Goals (issue 13): stream peak RSS flat in N (largest / smallest <= 1.2) and < 3 GB; stream samples/s >= 0.8 x the
in-memory path at 10M rows; statistics pass >= 1M rows/s. Run with ``OMP_NUM_THREADS=1`` for the docs' figures.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table

from mtl_experiments import checks
from mtl_experiments.bench.timing import PACKAGE_ROOT, fresh_process, interleaved, peak_rss_mb
from mtl_experiments.errors import ConfigError

MODULE = "mtl_experiments.bench.stream_scale"
WORLD = {"num_users": 100_000, "num_items": 20_000}
BATCH = 512
WARMUP_STEPS = 50  # steps left out of the steady-state figure (at most half the run)
MEMORY_MAX_ROWS = 20_000_000  # the largest log the in-memory path is measured at (2.8 GB at 10M rows)


def write_log(rows: int, log_dir: Path) -> Path:
    """``log_dir/rows-<N>``, written by scripts/make_log.py unless it is there already."""
    out = log_dir / f"rows-{rows}"
    shards = max(1, rows // 1_000_000)
    if len(list(out.glob("part-*.parquet"))) != shards:
        command = [
            sys.executable,
            str(PACKAGE_ROOT / "scripts" / "make_log.py"),
            "--rows",
            str(rows),
            "--shards",
            str(shards),
            "--out",
            str(out),
            "--users",
            str(WORLD["num_users"]),
            "--items",
            str(WORLD["num_items"]),
        ]
        subprocess.run(command, check=True, cwd=PACKAGE_ROOT)
    return out


def overrides_for(mode: str, rows: int, log: str, workers: int, cache: str) -> list[str]:
    if mode == "stream":
        return ["data=stream", f"data.path={log}", f"data.num_workers={workers}", f"data.cache_dir={cache}"]
    return [
        "data=recsys_synthetic",
        f"data.num_interactions={rows}",
        f"data.num_users={WORLD['num_users']}",
        f"data.num_items={WORLD['num_items']}",
        f"data.cache_dir={cache}",
    ]


class SteadyClock(pl.Callback):
    """Marks the start of ``fit``, the first step's start, the end of step ``warmup`` and the last step's end; after
    the warm-up it also sums the steps' own time (batch start to end) apart from the wait for the next batch."""

    def __init__(self, warmup: int):
        self.warmup, self.steps, self.in_steps = warmup, 0, 0.0
        self.begin = self.first = self.after_warmup = self.end = self.started = None

    def on_fit_start(self, trainer, pl_module):
        self.begin = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started = time.perf_counter()
        if self.first is None:
            self.first = self.started

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        self.end = time.perf_counter()
        if self.steps > self.warmup:
            self.in_steps += self.end - self.started
        elif self.steps == self.warmup:
            self.after_warmup = self.end

    def figures(self, batch: int) -> dict:
        """``first_batch_s``, ``steady_samples_per_s`` (the steps after ``warmup``, full batches of ``batch``) and
        their milliseconds per step in the training step itself and between steps (mostly the wait for data)."""
        steps, wall = self.steps - self.warmup, self.end - self.after_warmup
        return {
            "first_batch_s": self.first - self.begin,
            "steady_samples_per_s": steps * batch / wall,
            "step_ms": 1e3 * self.in_steps / steps,
            "between_steps_ms": 1e3 * (wall - self.in_steps) / steps,
            "warmup": self.warmup,
        }


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure_one(mode: str, rows: int, log: str, steps: int, workers: int) -> dict:
    """One contender in this (fresh) process: set-up seconds, pass rows/s (stream), samples/s, peak MB."""
    from mtl_experiments.bench.build import bare_trainer, compose_config
    from mtl_experiments.pipeline import build, build_model, build_module

    with tempfile.TemporaryDirectory() as cache:
        cfg = compose_config([*overrides_for(mode, rows, log, workers, cache), f"data.batch_size={BATCH}"])
        pl.seed_everything(cfg.seed)
        start = time.perf_counter()
        datamodule = build(cfg, "data")
        datamodule.setup()
        setup_s = time.perf_counter() - start
        module = build_module(cfg, datamodule, build_model(cfg, datamodule))
        clock = SteadyClock(min(WARMUP_STEPS, steps // 2))
        trainer = bare_trainer(1, callbacks=[clock], limit_train_batches=steps)
        cpu = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        fit_s = time.perf_counter() - start
        cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu[0], cpu_seconds(resource.RUSAGE_CHILDREN) - cpu[1]
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "setup_s": setup_s,
        "pass_rows_per_s": rows / setup_s if mode == "stream" else None,
        "samples_per_s": steps * BATCH / fit_s,
        **clock.figures(BATCH),
        "cpu_ms_per_step": 1e3 * cpu[0] / steps,
        "worker_cpu_ms_per_step": 1e3 * cpu[1] / steps,
        "load_average": os.getloadavg()[0],
        "peak_mb": peak_rss_mb() + (children if mode == "stream" and workers else 0.0),
    }


def parse_rows(rows: str) -> list[int]:
    try:
        out = [int(float(x)) for x in rows.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1000:
        checks.fail("--rows", "comma-separated row counts >= 1000", rows)
    return out


def report(result: dict) -> None:
    table = Table(
        title=f"data=stream vs in-memory recsys_synthetic: {result['steps']} steps of {BATCH}, "
        f"{result['workers']} stream worker(s), median of {result['repeats']} round(s); steady: after "
        f"{min(WARMUP_STEPS, result['steps'] // 2)} steps"
    )
    columns = ("rows", "mode", "peak RSS MB", "samples/s (fit)", "steady samples/s", "first batch s", "set-up s")
    for column in (*columns, "pass rows/s", "ms in | between steps", "CPU ms/step main | workers", "load"):
        table.add_column(column, justify="right")
    for key, r in result["runs"].items():
        mode, rows = key.split("@")
        rate = f"{r['pass_rows_per_s']:,.0f}" if r["pass_rows_per_s"] else ""
        table.add_row(
            f"{int(rows):,}",
            mode,
            f"{r['peak_mb']:.0f}",
            f"{r['samples_per_s']:,.0f}",
            f"{r['steady_samples_per_s']:,.0f}",
            f"{r['first_batch_s']:.2f}",
            f"{r['setup_s']:.1f}",
            rate,
            f"{r['step_ms']:.1f} | {r['between_steps_ms']:.1f}",
            f"{r['cpu_ms_per_step']:.1f} | {r['worker_cpu_ms_per_step']:.1f}",
            f"{r['load_average']:.1f}",
        )
    Console(width=140).print(table)
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}")


def run(rows: str, steps: int, workers: int, repeats: int, log_dir: Path, overrides: list[str] = ()) -> dict:
    """Writes the logs, measures each (mode, N) in a fresh process, prints the table; returns the numbers."""
    if overrides:
        raise ConfigError(f"--stream-scale builds its own configs and takes no Hydra overrides, got {overrides}.")
    sizes = parse_rows(rows)
    logs = {n: write_log(n, Path(log_dir)) for n in sizes}
    runs = {
        f"{mode}@{n}": lambda mode=mode, n=n: fresh_process(
            MODULE, [mode, str(n), str(logs[n]), str(steps), str(workers)], f"{mode} with {n} rows"
        )
        for n in sizes
        for mode in ("stream", "memory")
        if mode == "stream" or n <= MEMORY_MAX_ROWS
    }
    measured = interleaved(runs, repeats)
    med = {
        k: {m: statistics.median(r[m] for r in rs) if rs[0][m] is not None else None for m in rs[0]}
        for k, rs in measured.items()
    }
    small, large = min(sizes), max(sizes)
    ratios = {
        f"stream peak RSS {large:,} / {small:,} rows (goal <= 1.2)": med[f"stream@{large}"]["peak_mb"]
        / med[f"stream@{small}"]["peak_mb"],
    }
    held = max((n for n in sizes if n <= MEMORY_MAX_ROWS), default=None)
    if held is not None:
        stream, memory = med[f"stream@{held}"], med[f"memory@{held}"]
        ratios[f"stream / in-memory samples/s at {held:,} rows (goal >= 0.8)"] = (
            stream["samples_per_s"] / memory["samples_per_s"]
        )
        ratios[f"stream / in-memory steady samples/s at {held:,} rows (goal >= 0.8)"] = (
            stream["steady_samples_per_s"] / memory["steady_samples_per_s"]
        )
    result = {"sizes": sizes, "steps": steps, "workers": workers, "repeats": repeats, "runs": med, "ratios": ratios}
    report(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """The child process: ``MODE ROWS LOG_DIR STEPS WORKERS``; prints one JSON line."""
    mode, rows, log, steps, workers = sys.argv[1:] if argv is None else argv
    print(json.dumps(measure_one(mode, int(rows), log, int(steps), int(workers))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
