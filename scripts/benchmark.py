"""Training throughput of the Lightning path against a plain PyTorch loop on the same model and data.

What is measured (samples/s = epochs x train rows / wall seconds), all in one process, on the model,
data and optimizer that ``conf/train.yaml`` plus your overrides build:

- ``plain``: a bare loop over the train split, one batch per gather after a ``randperm`` (what
  ``TensorBatchLoader`` does): forward, per-task ``task.loss``, sum, ``zero_grad``, backward,
  optimizer step. No metrics, no logging. This is the reference (ratio 1.0).
- ``lightning``: ``MTLModule`` as configured (``module.train_metrics`` as you have it) trained by
  ``Trainer.fit`` over the datamodule's ``TensorBatchLoader``; only ``trainer.fit`` is timed. No
  logger, no checkpointing, no progress bar, no validation.
- ``lightning_no_train_metrics``: the same with ``module.train_metrics=false``, so the cost of the
  per-step train metric updates is visible (skipped when the config already turns them off).
- ``plain_dataloader``: the plain loop fed by a conventional per-sample ``Dataset`` (one
  ``__getitem__`` per row building the batch dict) and ``DataLoader(batch_size, shuffle=True)`` with
  default collate: the reason the package serves tabular data a whole batch per index operation.

Each model is freshly built with the run's seed, so every contender starts from identical weights.
The optimizer is the configured one (``optimizer=adam`` by default) over the same parameter groups as
``MTLModule.configure_optimizers``. The plain loops sum the task losses (equal weighting, the default
``loss=equal``); the Lightning path uses the configured weighting.

Timing on shared machines is noisy, so after one untimed warm-up epoch per contender the contenders
run interleaved (A, B, C, D, A, B, C, D, ...) for ``--repeats`` rounds; the table reports the median
samples/s of each and ratios of medians. Thread count is torch's default. The exit code is 0 whatever
the ratio: this is a measurement, not a test.

With ``--methods`` it instead measures the training step time of every loss weighting method
(``conf/loss/*.yaml``, or ``--methods-list a,b``) relative to ``loss=equal`` on the same model and
data, for each task count in ``--tasks`` (default 2 and 4; tasks beyond the config's are added as
binary tasks ``y3``, ``y4``, ...), interleaved the same way.

With ``--conflict`` it instead measures the cost of the task-conflict metrics: the Lightning path with
``module.conflict`` as configured (every 50 steps by default; 50 if the config turns it off) against the
same run with ``module.conflict.every_n_steps=0`` (and no affinity), interleaved the same way, and
prints the overhead (median samples/s off / on − 1). Use ``loss=...`` to measure it under a method
(a gradient method already computes the gradients the metrics reuse; ``equal`` is the worst case).

Run (any Hydra override of ``train.py`` applies)::

    python scripts/benchmark.py
    python scripts/benchmark.py --epochs 5 --repeats 5 --json bench.json
    python scripts/benchmark.py backbone=single_task data.batch_size=512
    python scripts/benchmark.py --methods --tasks 2,4 --json methods.json
    python scripts/benchmark.py --conflict --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtl_experiments import pipeline
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.errors import MTLError
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
TARGET_RATIO = 0.9

PLAIN = "plain"
LIGHTNING = "lightning"
LIGHTNING_NO_METRICS = "lightning_no_train_metrics"
PLAIN_DATALOADER = "plain_dataloader"
CONFLICT_ON = "conflict_on"
CONFLICT_OFF = "conflict_off"
CONFLICT_TARGET = 0.05


# -- building, the way pipeline.train does ------------------------------------------------------------
def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_model(cfg: DictConfig, datamodule: TabularDataModule) -> MultiTaskModel:
    """A fresh model seeded with ``cfg.seed``: every call returns the same initial weights."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return pipeline.build_model(cfg, datamodule)


def build_module(cfg: DictConfig, datamodule: TabularDataModule) -> MTLModule:
    return pipeline.build_module(cfg, datamodule, build_model(cfg, datamodule))


def build_optimizer(cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # the same parameter groups as MTLModule.configure_optimizers (a loss-level weighting adds none)
    return instantiate(cfg.optimizer, _convert_="all")([{"params": list(model.parameters())}])


# -- the contenders: each builds its state untimed and returns the timed seconds for `epochs` -------
def _take(tree, index):
    if isinstance(tree, Tensor):
        return tree[index]
    return {key: _take(value, index) for key, value in tree.items()}


def _num_rows(split: dict) -> int:
    return next(iter(split["labels"].values())).shape[0]


def _train_step(model, tasks, optimizer, batch: dict) -> None:
    outputs = model(batch["features"])
    loss = torch.stack([task.loss(outputs[name], batch["labels"][name]) for name, task in tasks.items()]).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def plain_sliced(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> float:
    model, tasks = build_model(cfg, datamodule), datamodule.tasks
    optimizer = build_optimizer(cfg, model)
    model.train()
    split, batch_size = datamodule.splits["train"], datamodule.batch_size
    n = _num_rows(split)
    start = time.perf_counter()
    for epoch in range(epochs):
        # the same batch order as TensorBatchLoader: its own generator, seeded per epoch
        g = torch.Generator().manual_seed(datamodule.shuffle_seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
        for lo in range(0, n, batch_size):
            _train_step(model, tasks, optimizer, _take(split, order[lo : lo + batch_size]))
    return time.perf_counter() - start


class PerSampleDataset(Dataset):
    """The conventional map-style dataset: one row per ``__getitem__``, batches built by collate."""

    def __init__(self, split: dict):
        self.split = split

    def __len__(self) -> int:
        return _num_rows(self.split)

    def __getitem__(self, i: int) -> dict:
        return _take(self.split, i)


def plain_dataloader(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> float:
    model, tasks = build_model(cfg, datamodule), datamodule.tasks
    optimizer = build_optimizer(cfg, model)
    model.train()
    loader = DataLoader(
        PerSampleDataset(datamodule.splits["train"]),
        batch_size=datamodule.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(datamodule.shuffle_seed),
    )
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            _train_step(model, tasks, optimizer, batch)
    return time.perf_counter() - start


class StepTimer(pl.Callback):
    """Wall time of the training steps alone (batch start to batch end), without fit set-up or epoch ends."""

    def __init__(self):
        self.seconds, self.steps, self._start = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._start
        self.steps += 1


def lightning_fit(
    cfg: DictConfig, datamodule: TabularDataModule, epochs: int, callbacks=(), log_every_n_steps: int = 50
) -> float:
    module = build_module(cfg, datamodule)
    trainer = pl.Trainer(
        callbacks=list(callbacks),
        max_epochs=epochs,
        log_every_n_steps=log_every_n_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def with_train_metrics(cfg: DictConfig, enabled: bool) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.module.train_metrics = enabled
    return cfg


# -- measuring and reporting ------------------------------------------------------------------------
def measure(
    contenders: dict[str, Callable[[int], float]], epochs: int, repeats: int, samples_per_epoch: int
) -> dict[str, list[float]]:
    """One untimed 1-epoch warm-up each, then ``repeats`` interleaved rounds; samples/s per run."""
    for run in contenders.values():
        run(1)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            rates[name].append(epochs * samples_per_epoch / run(epochs))
    return rates


def summarize(rates: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {f"{name}/{PLAIN}": medians[name] / medians[PLAIN] for name in medians if name != PLAIN}
    return medians, ratios


def report(rates: dict[str, list[float]], medians: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("contender", no_wrap=True)
    table.add_column("median samples/s", justify="right")
    table.add_column(f"/ {PLAIN}", justify="right")
    table.add_column("best samples/s", justify="right")
    table.add_column("runs (samples/s)", justify="right")
    for name, values in rates.items():
        ratio = medians[name] / medians[PLAIN]
        runs = " ".join(f"{v:,.0f}" for v in values)
        table.add_row(name, f"{medians[name]:,.0f}", f"{ratio:.2f}", f"{max(values):,.0f}", runs)
    Console(width=max(120, len(title))).print(table)


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Any other argument is a Hydra override of conf/train.yaml, e.g. backbone=single_task.",
    )
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per timed run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--methods", action="store_true", help="step time of each loss method relative to equal")
    parser.add_argument("--methods-list", default=None, help="comma-separated methods (default: all conf/loss)")
    parser.add_argument("--tasks", default="2,4", help="task counts for --methods (default 2,4)")
    parser.add_argument("--conflict", action="store_true", help="overhead of the task-conflict metrics (on vs off)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be >= 1")
    return args, overrides


def task_overrides(cfg: DictConfig, num_tasks: int) -> list[str]:
    """Overrides that give the config ``num_tasks`` tasks (extra ones binary, named y3, y4, ...)."""
    have = list(cfg.data.tasks)
    if num_tasks < len(have):
        return [f"~data.tasks.{name}" for name in have[num_tasks:]]
    return [f"+data.tasks.y{i + 1}={{kind: binary}}" for i in range(len(have), num_tasks)]


def method_step_times(args: argparse.Namespace, overrides: list[str]) -> int:
    """Per-step training time of each loss method relative to ``equal``, per task count."""
    methods = (
        args.methods_list.split(",")
        if args.methods_list
        else sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))
    )
    methods = ["equal", *[m for m in methods if m != "equal"]]
    task_counts = [int(t) for t in args.tasks.split(",")]
    base = compose_config(overrides)
    setups = {}
    for t in task_counts:
        for method in methods:
            cfg = compose_config([*overrides, *task_overrides(base, t), f"loss={method}"])
            datamodule = instantiate(cfg.data, _convert_="all")
            datamodule.setup()
            setups[(t, method)] = (cfg, datamodule)

    def step_ms(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> float:
        timer = StepTimer()
        lightning_fit(cfg, datamodule, epochs, callbacks=[timer])
        return 1e3 * timer.seconds / timer.steps

    for cfg, datamodule in setups.values():  # warm-up, untimed
        step_ms(cfg, datamodule, 1)
    times: dict[tuple[int, str], list[float]] = {key: [] for key in setups}
    for _ in range(args.repeats):
        for key, (cfg, datamodule) in setups.items():
            times[key].append(step_ms(cfg, datamodule, args.epochs))
    ms = {key: statistics.median(values) for key, values in times.items()}
    table = Table(title=f"step time per loss method ({args.epochs} epoch(s) x {args.repeats} round(s), median)")
    table.add_column("method")
    for t in task_counts:
        table.add_column(f"T={t} ms/step", justify="right")
        table.add_column(f"T={t} / equal", justify="right")
    for method in methods:
        row = []
        for t in task_counts:
            row += [f"{ms[(t, method)]:.2f}", f"{ms[(t, method)] / ms[(t, 'equal')]:.2f}x"]
        table.add_row(method, *row)
    Console(width=120).print(table)
    if args.json is not None:
        result = {
            "overrides": overrides,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "num_threads": torch.get_num_threads(),
            "ms_per_step": {f"{m}@T{t}": v for (t, m), v in ms.items()},
            "ratio_to_equal": {f"{m}@T{t}": v / ms[(t, "equal")] for (t, m), v in ms.items()},
        }
        write_json(args.json, result)
    return 0


def with_conflict(cfg: DictConfig, every_n_steps: int) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.module.conflict = {**(cfg.module.get("conflict") or {}), "every_n_steps": every_n_steps}
        if every_n_steps == 0:
            cfg.module.conflict.affinity_every_n_steps = 0
    return cfg


def conflict_overhead(args: argparse.Namespace, overrides: list[str]) -> int:
    """The conflict metrics' cost, two ways, all contenders interleaved:

    - whole fits with the metrics on (as configured, default every 50 steps) against off: the direct
      answer, but a few % is within this machine's run-to-run noise;
    - the cost of one measurement: ms per training step with the metrics measured (and logged) at every
      step against never, both logging every step. Divided by ``every`` x the step time without metrics it
      estimates the overhead at that cadence from many more measurements, so it is far less noisy.
    """
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    rows = _num_rows(datamodule.splits["train"])
    every = (cfg.module.get("conflict") or {}).get("every_n_steps") or 50
    on_cfg, off_cfg, each_cfg = with_conflict(cfg, every), with_conflict(cfg, 0), with_conflict(cfg, 1)

    def step_ms(run_cfg: DictConfig, epochs: int) -> float:
        timer = StepTimer()
        lightning_fit(run_cfg, datamodule, epochs, callbacks=[timer], log_every_n_steps=1)
        return 1e3 * timer.seconds / timer.steps

    fits = {CONFLICT_ON: on_cfg, CONFLICT_OFF: off_cfg}
    steps = {"measured_every_step": each_cfg, "never_measured": off_cfg}
    for run_cfg in fits.values():  # warm-up, untimed
        lightning_fit(run_cfg, datamodule, 1)
    for run_cfg in steps.values():
        step_ms(run_cfg, 1)
    rates: dict[str, list[float]] = {name: [] for name in fits}
    ms: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, run_cfg in fits.items():
            rates[name].append(args.epochs * rows / lightning_fit(run_cfg, datamodule, args.epochs))
        for name, run_cfg in steps.items():
            ms[name].append(step_ms(run_cfg, args.epochs))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ms_medians = {name: statistics.median(values) for name, values in ms.items()}
    overhead = medians[CONFLICT_OFF] / medians[CONFLICT_ON] - 1
    per_measurement_ms = ms_medians["measured_every_step"] - ms_medians["never_measured"]
    estimate = per_measurement_ms / (every * 1e3 * datamodule.batch_size / medians[CONFLICT_OFF])

    table = Table(
        title=f"conflict metrics every {every} steps vs off: {rows} train rows, batch {datamodule.batch_size}, "
        f"loss {cfg.loss._target_.rsplit('.', 1)[-1]}, {args.epochs} epoch(s) x {args.repeats} round(s)"
    )
    table.add_column("contender")
    table.add_column("median", justify="right")
    table.add_column("runs", justify="right")
    for name, values in rates.items():
        table.add_row(name, f"{medians[name]:,.0f} samples/s", " ".join(f"{v:,.0f}" for v in values))
    for name, values in ms.items():
        table.add_row(
            f"{name} (log every step)", f"{ms_medians[name]:.2f} ms/step", " ".join(f"{v:.2f}" for v in values)
        )
    Console(width=120).print(table)
    print(f"conflict metrics overhead (whole fits) = {overhead:+.1%} (median off / on - 1; target <= 5%)")
    print(
        f"one measurement costs {per_measurement_ms:+.2f} ms: estimated overhead every {every} steps = {estimate:+.1%}"
    )
    if args.json is not None:
        result = {
            "overrides": overrides,
            "every_n_steps": every,
            "train_rows": rows,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "num_threads": torch.get_num_threads(),
            "samples_per_s": medians,
            "runs_samples_per_s": rates,
            "overhead": overhead,
            "ms_per_step": ms_medians,
            "runs_ms_per_step": ms,
            "ms_per_measurement": per_measurement_ms,
            "estimated_overhead": estimate,
            "target_overhead": CONFLICT_TARGET,
        }
        write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "consider more workers" and similar hints are about the user's setup, not this measurement
    warnings.filterwarnings("ignore", module=r"lightning\.")

    if args.methods or args.conflict:
        try:
            return method_step_times(args, overrides) if args.methods else conflict_overhead(args, overrides)
        except (MTLError, HydraException, OmegaConfBaseException) as e:
            print(f"Error: {e}", file=sys.stderr)
            return 2
    try:
        cfg = compose_config(overrides)
        datamodule = instantiate(cfg.data, _convert_="all")
        datamodule.setup()
    except (MTLError, HydraException, OmegaConfBaseException) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    rows = _num_rows(datamodule.splits["train"])

    contenders: dict[str, Callable[[int], float]] = {
        PLAIN: lambda e: plain_sliced(cfg, datamodule, e),
        LIGHTNING: lambda e: lightning_fit(cfg, datamodule, e),
    }
    if cfg.module.get("train_metrics", True):
        no_metrics_cfg = with_train_metrics(cfg, False)
        contenders[LIGHTNING_NO_METRICS] = lambda e: lightning_fit(no_metrics_cfg, datamodule, e)
    contenders[PLAIN_DATALOADER] = lambda e: plain_dataloader(cfg, datamodule, e)

    rates = measure(contenders, args.epochs, args.repeats, rows)
    medians, ratios = summarize(rates)
    title = (
        f"training throughput: {rows} train rows, batch {datamodule.batch_size}, {args.epochs} epoch(s) x "
        f"{args.repeats} round(s), {torch.get_num_threads()} threads"
    )
    report(rates, medians, title)
    if LIGHTNING_NO_METRICS not in medians:
        print("(module.train_metrics is already false: the lightning row has no train metrics)")
    print(f"ratio {PLAIN_DATALOADER}/{PLAIN} = {ratios[f'{PLAIN_DATALOADER}/{PLAIN}']:.2f} (per-sample loading)")
    print(f"ratio {LIGHTNING}/{PLAIN} = {ratios[f'{LIGHTNING}/{PLAIN}']:.2f} (target >= {TARGET_RATIO:.2f})")

    if args.json is not None:
        result = {
            "overrides": overrides,
            "config": {
                key: OmegaConf.to_container(cfg[key], resolve=True)
                for key in ("data", "features", "backbone", "loss", "module", "optimizer")
            },
            "train_rows": rows,
            "batch_size": datamodule.batch_size,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "num_threads": torch.get_num_threads(),
            "samples_per_s": medians,
            "best_samples_per_s": {name: max(values) for name, values in rates.items()},
            "runs_samples_per_s": rates,
            "ratios": ratios,
            "target_ratio": TARGET_RATIO,
        }
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
