"""Training throughput of the Lightning path against a plain PyTorch loop on the same model and data.

Six measurements, one at a time, each a module of ``mtl_experiments/bench/`` whose docstring says what it
measures and how (all share ``bench.timing``: an untimed warm-up, then the contenders interleaved for
``--repeats`` rounds, medians and ratios of medians):

- default: samples/s of ``plain`` loop, ``lightning``, ``lightning_no_train_metrics`` and ``plain_dataloader``
  (``bench.throughput``); ``--rechub`` adds torch-rechub's MMOE + MTLTrainer (``bench.rechub``);
- ``--census``: ``experiment=census_mmoe`` with the contenders ``plain``, ``lightning``, ``lightning_floor``,
  ``lightning_no_train_metrics`` and ``rechub``;
- ``--methods``: step time of every loss weighting method relative to ``equal`` (``bench.methods``);
- ``--conflict``: the cost of the task-conflict metrics (``bench.conflict``);
- ``--one-vs-many``: one multi-task model against T single-task models (``bench.one_vs_many``);
- ``--sparse-scale``: step time and peak memory of large id tables, dense against sparse, each in a fresh
  process (``bench.sparse_scale``).
- ``--stream-scale``: peak memory and samples/s of ``data=stream`` against the in-memory ``recsys_synthetic`` at
  1M and 10M rows (``--rows``), each in a fresh process (``bench.stream_scale``).
- ``--startup``: wall seconds of a config error, ``--help`` and census's cache-hit load, each in a fresh process,
  against ``python -c pass`` and ``import torch`` (``bench.startup``).

The exit code is 0 whatever the numbers: these are measurements, not tests. Run (any Hydra override of
``train.py`` applies)::

    python scripts/benchmark.py
    python scripts/benchmark.py --epochs 5 --repeats 5 --json bench.json
    python scripts/benchmark.py backbone=single_task data.batch_size=512
    python scripts/benchmark.py --methods --tasks 2,4 --json methods.json     # recsys MMoE and 665k MMoE
    python scripts/benchmark.py --methods --models config backbone=mmoe     # the config as given
    python scripts/benchmark.py --conflict --repeats 5
    python scripts/benchmark.py --census --json census.json          # plain, lightning, floor, rechub
    python scripts/benchmark.py --census --one-vs-many --json one_vs_many.json
    OMP_NUM_THREADS=1 python scripts/benchmark.py --sparse-scale --json sparse.json
    OMP_NUM_THREADS=1 python scripts/benchmark.py --stream-scale --rows 1000000,10000000 --json stream.json
    OMP_NUM_THREADS=1 python scripts/benchmark.py --startup --repeats 5 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from mtl_experiments.bench import conflict, methods
from mtl_experiments.bench import one_vs_many as one_vs_many_bench
from mtl_experiments.bench import sparse_scale as sparse_scale_bench
from mtl_experiments.bench import startup as startup_bench
from mtl_experiments.bench import stream_scale as stream_scale_bench
from mtl_experiments.bench import throughput as throughput_bench
from mtl_experiments.bench.rechub import RECHUB_INSTALL
from mtl_experiments.errors import MTLError

CENSUS_OVERRIDES = ["experiment=census_mmoe"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs per timed run (default 3; 5 for --one-vs-many)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--methods", action="store_true", help="step time of each loss method relative to equal")
    parser.add_argument("--methods-list", default=None, help="comma-separated methods (default: all conf/loss)")
    parser.add_argument("--tasks", default="2,4", help="task counts for --methods (default 2,4)")
    parser.add_argument(
        "--models",
        default=methods.DEFAULT_MODELS,
        help=f"models for --methods, of {','.join(methods.MODELS)} (default {methods.DEFAULT_MODELS}; config: the "
        "config as given)",
    )
    parser.add_argument("--conflict", action="store_true", help="overhead of the task-conflict metrics (on vs off)")
    parser.add_argument(
        "--rechub", action="store_true", help=f"add torch-rechub's MMOE + MTLTrainer as a contender ({RECHUB_INSTALL})"
    )
    parser.add_argument(
        "--census",
        action="store_true",
        help="experiment=census_mmoe; plain, lightning (with, without train metrics), lightning_floor, rechub",
    )
    parser.add_argument(
        "--one-vs-many", action="store_true", help="one multi-task model against T single-task models (table)"
    )
    parser.add_argument(
        "--sparse-scale",
        action="store_true",
        help="step time and peak memory of 10k..1M-row id tables, dense vs sparse",
    )
    parser.add_argument("--sizes", default="10000,100000,1000000", help="id table rows for --sparse-scale")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per --sparse-scale run (median)")
    parser.add_argument("--batch-size", type=int, default=512, help="batch size of --sparse-scale")
    parser.add_argument("--sparse-scale-one", default=None, help=argparse.SUPPRESS)  # MODE:ROWS, in a child process
    parser.add_argument("--stream-scale", action="store_true", help="data=stream vs in-memory: peak RSS, samples/s")
    parser.add_argument("--rows", default="1000000,10000000", help="log sizes for --stream-scale")
    parser.add_argument("--stream-steps", type=int, default=300, help="training steps per --stream-scale run")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of data=stream in --stream-scale")
    parser.add_argument(
        "--log-dir", type=Path, default=Path("stream-bench-logs"), help="where --stream-scale's logs go"
    )
    parser.add_argument("--startup", action="store_true", help="seconds of a config error, --help, census cache hit")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Any other argument is a Hydra override of conf/train.yaml, e.g. backbone=single_task.",
    )
    add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if (args.epochs is not None and args.epochs < 1) or args.repeats < 1:
        parser.error("--epochs and --repeats must be >= 1")
    if sum([args.methods, args.conflict, args.one_vs_many, args.sparse_scale, args.stream_scale, args.startup]) > 1:
        parser.error(
            "--methods, --conflict, --one-vs-many, --sparse-scale, --stream-scale and --startup are separate "
            "measurements: choose one"
        )
    unknown_models = set(args.models.split(",")) - set(methods.MODELS)
    if unknown_models:
        parser.error(f"--models must be among {','.join(methods.MODELS)}, got {','.join(sorted(unknown_models))}")
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    if args.rechub and (args.methods or args.conflict or args.one_vs_many or args.sparse_scale):
        parser.error(
            "--rechub adds a contender to the throughput measurement, not to --methods/--conflict/--one-vs-many"
        )
    if args.epochs is None:
        args.epochs = 5 if args.one_vs_many else 3
    if args.census:
        overrides = [*CENSUS_OVERRIDES, *overrides]  # the user's own overrides still apply on top
    return args, overrides


# -- the measurements: (args, overrides) -> the numbers --json writes --------------------------------------
def throughput(args: argparse.Namespace, overrides: list[str]) -> dict:
    return throughput_bench.run(overrides, args.epochs, args.repeats, rechub=args.rechub, census=args.census)


def method_step_times(args: argparse.Namespace, overrides: list[str]) -> dict:
    return methods.run(overrides, args.methods_list, args.tasks, args.epochs, args.repeats, args.models)


def conflict_overhead(args: argparse.Namespace, overrides: list[str]) -> dict:
    return conflict.run(overrides, args.epochs, args.repeats)


def one_vs_many(args: argparse.Namespace, overrides: list[str]) -> dict:
    return one_vs_many_bench.run(overrides, args.epochs, args.repeats)


def sparse_scale(args: argparse.Namespace, overrides: list[str]) -> dict:
    return sparse_scale_bench.run(args.sizes, args.steps, args.batch_size, args.repeats, overrides)


def sparse_scale_one(args: argparse.Namespace, overrides: list[str]) -> None:
    """One (mode, rows) measurement in this process; prints its JSON line (``bench.sparse_scale`` runs its own)."""
    print(json.dumps(sparse_scale_bench.measure_one(args.sparse_scale_one, args.steps, args.batch_size)))


def stream_scale(args: argparse.Namespace, overrides: list[str]) -> dict:
    return stream_scale_bench.run(args.rows, args.stream_steps, args.workers, args.repeats, args.log_dir, overrides)


def startup(args: argparse.Namespace, overrides: list[str]) -> dict:
    return startup_bench.run(args.repeats, overrides)


def measurement(args: argparse.Namespace):
    if args.startup:
        return startup
    if args.stream_scale:
        return stream_scale
    if args.sparse_scale_one:
        return sparse_scale_one
    if args.sparse_scale:
        return sparse_scale
    if args.methods:
        return method_step_times
    if args.conflict:
        return conflict_overhead
    if args.one_vs_many:
        return one_vs_many
    return throughput


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "consider more workers" and similar hints are about the user's setup, not this measurement
    warnings.filterwarnings("ignore", module=r"lightning\.")
    try:
        result = measurement(args)(args, overrides)
    except (MTLError, HydraException, OmegaConfBaseException) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if result is not None and args.json is not None:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
