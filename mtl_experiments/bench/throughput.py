"""Training throughput of the Lightning path against a plain PyTorch loop on the same model and data.

What is measured (samples/s = epochs x train rows / wall seconds), all in one process, on the model,
data and optimizer that ``conf/train.yaml`` plus the overrides build:

- ``plain``: a bare loop over the train split, one batch per gather after a ``randperm`` (what
  ``TensorBatchLoader`` does): forward, per-task ``task.loss``, sum, ``zero_grad``, backward,
  optimizer step. No metrics, no logging. This is the reference (ratio 1.0).
- ``lightning``: ``MTLModule`` as configured (``module.train_metrics`` as you have it) trained by
  ``Trainer.fit`` over the datamodule's ``TensorBatchLoader``; only ``trainer.fit`` is timed. No
  logger, no checkpointing, no progress bar, no validation.
- ``lightning_no_train_metrics``: the same with ``module.train_metrics=false``, so the cost of the
  per-step train metric updates is visible (skipped when the config already turns them off).
- ``lightning_floor``: the plain loop's step inside a bare ``LightningModule`` under manual optimization,
  trained by the same bare ``Trainer`` (``bench.floor``): Lightning's own per-step cost, the floor ``lightning``
  cannot go under. ``lightning/lightning_floor`` and ``own_us_per_step`` (ours minus the floor, in µs per
  step) are ``MTLModule``'s own cost.
- ``lightning_no_conflict``: the same with the task-conflict metrics off (``module.conflict`` null: no measured,
  lookahead or tracked steps), so their cost is visible too (skipped when the config already turns them off).
- ``plain_dataloader``: the plain loop fed by a conventional per-sample ``Dataset`` (one
  ``__getitem__`` per row building the batch dict) and ``DataLoader(batch_size, shuffle=True)`` with
  default collate: the reason the package serves tabular data a whole batch per index operation.
- ``rechub`` (``--rechub``, implied by ``--census``): torch-rechub's trainer, see ``bench.rechub``.
  ``lightning/rechub`` is the ratio its issue asks for (target >= 3x), next to ``lightning/plain``
  (target >= 0.95x on census, 0.85x in the default setting).

The optimizer is the configured one (``optimizer=adam`` by default) over the same parameter groups as
``MTLModule.configure_optimizers``. The plain loops sum the task losses (equal weighting, the default
``loss=equal``); the Lightning path uses the configured weighting. After one untimed warm-up epoch per
contender the contenders run interleaved (``bench.timing``); the table reports the median samples/s of each
and ratios of medians, by wall time and by the process's CPU time over the same span (``cpu_samples_per_s``,
``cpu_ratios``, ``own_cpu_us_per_step`` in ``--json``; the wall-time keys keep their meaning).

``--census`` is the census setting in one flag: ``experiment=census_mmoe`` (Census-Income, embeddings
of 4, 8 experts of 16, towers of 8, Adam 1e-3 / 1e-4, batch 1024; 21.3k parameters) and the contenders
``plain``, ``lightning``, ``lightning_floor``, ``lightning_no_train_metrics`` and ``rechub``. The data is read from
``$MTL_CENSUS_ROOT`` (default ``../shared/data/census-income``); the first load parses the files (~9 s), later ones
read the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from mtl_experiments.bench.build import (
    build_model,
    build_optimizer,
    compose_config,
    lightning_fit,
    load_data,
    parameter_count,
    with_module_option,
)
from mtl_experiments.bench.floor import floor_fit
from mtl_experiments.bench.rechub import RECHUB, RECHUB_INSTALL, build_rechub, rechub_fit, rechub_missing
from mtl_experiments.bench.timing import Seconds, Stopwatch, interleaved, medians
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.data.spec import gather, num_rows

PLAIN = "plain"
LIGHTNING = "lightning"
LIGHTNING_NO_METRICS = "lightning_no_train_metrics"
PLAIN_DATALOADER = "plain_dataloader"
LIGHTNING_FLOOR = "lightning_floor"
LIGHTNING_NO_CONFLICT = "lightning_no_conflict"
TARGET_RATIO = 0.85  # issue 17: the default synthetic setting (batch 256, a ~1.5 ms step)
CENSUS_TARGET_RATIO = 0.95  # issue 17: census (batch 1024)
RECHUB_TARGET = 3.0


def train_step(model, tasks, optimizer, batch: dict) -> None:
    outputs = model(batch["features"])
    loss = torch.stack([task.loss(outputs[name], batch["labels"][name]) for name, task in tasks.items()]).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def plain_sliced(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> Seconds:
    model, tasks = build_model(cfg, datamodule), datamodule.tasks
    optimizer = build_optimizer(cfg, model)
    model.train()
    split, batch_size = datamodule.splits["train"], datamodule.batch_size
    n = num_rows(split)
    clock = Stopwatch()
    for epoch in range(epochs):
        # the same batch order as TensorBatchLoader: its own generator, seeded per epoch
        g = torch.Generator().manual_seed(datamodule.shuffle_seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
        for lo in range(0, n, batch_size):
            train_step(model, tasks, optimizer, gather(split, order[lo : lo + batch_size]))
    return clock.elapsed()


class PerSampleDataset(Dataset):
    """The conventional map-style dataset: one row per ``__getitem__``, batches built by collate."""

    def __init__(self, split: dict):
        self.split = split

    def __len__(self) -> int:
        return num_rows(self.split)

    def __getitem__(self, i: int) -> dict:
        return gather(self.split, i)


def plain_dataloader(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> Seconds:
    model, tasks = build_model(cfg, datamodule), datamodule.tasks
    optimizer = build_optimizer(cfg, model)
    model.train()
    loader = DataLoader(
        PerSampleDataset(datamodule.splits["train"]),
        batch_size=datamodule.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(datamodule.shuffle_seed),
    )
    clock = Stopwatch()
    for _ in range(epochs):
        for batch in loader:
            train_step(model, tasks, optimizer, batch)
    return clock.elapsed()


def contenders(
    cfg: DictConfig, datamodule: TabularDataModule, rechub: bool, census: bool
) -> tuple[dict[str, Callable[[int], Seconds]], dict[str, int], dict[str, str]]:
    """The timed runs (epochs -> seconds), the parameter counts, and why a contender is skipped."""
    runs: dict[str, Callable[[int], Seconds]] = {
        PLAIN: lambda e: plain_sliced(cfg, datamodule, e),
        LIGHTNING: lambda e: lightning_fit(cfg, datamodule, e),
        LIGHTNING_FLOOR: lambda e: floor_fit(cfg, datamodule, e),
    }
    if cfg.module.get("train_metrics", True):  # on census too: their epoch-end exact AUROC over ~200k rows
        no_metrics_cfg = with_module_option(cfg, "train_metrics", False)
        runs[LIGHTNING_NO_METRICS] = lambda e: lightning_fit(no_metrics_cfg, datamodule, e)
    if not census:
        if cfg.module.get("conflict"):
            no_conflict_cfg = with_module_option(cfg, "conflict", None)
            runs[LIGHTNING_NO_CONFLICT] = lambda e: lightning_fit(no_conflict_cfg, datamodule, e)
        runs[PLAIN_DATALOADER] = lambda e: plain_dataloader(cfg, datamodule, e)
    skipped: dict[str, str] = {}
    parameters = {"ours": parameter_count(build_model(cfg, datamodule))}  # plain and lightning
    if rechub or census:
        missing = rechub_missing()
        if missing:
            skipped[RECHUB] = f"{missing}; install it in the benchmark's environment: {RECHUB_INSTALL}"
        else:
            parameters[RECHUB] = parameter_count(build_rechub(cfg, datamodule)[0].model)  # checks the config too
            runs[RECHUB] = lambda e: rechub_fit(cfg, datamodule, e)
    return runs, parameters, skipped


def measure(
    runs: dict[str, Callable[[int], Seconds]], epochs: int, repeats: int, samples_per_epoch: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One untimed 1-epoch warm-up each, then ``repeats`` interleaved rounds; samples/s per run and round, by wall
    time and by the process's CPU time over the same spans."""
    for run in runs.values():
        run(1)
    spans = interleaved({name: (lambda run=run: run(epochs)) for name, run in runs.items()}, repeats)
    samples = epochs * samples_per_epoch
    by_wall = {name: [samples / s for s in values] for name, values in spans.items()}
    by_cpu = {name: [samples / s.cpu for s in values] for name, values in spans.items()}
    return by_wall, by_cpu


def summarize(rates: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    median = medians(rates)
    ratios = {f"{name}/{PLAIN}": median[name] / median[PLAIN] for name in median if name != PLAIN}
    ratios[f"{LIGHTNING}/{LIGHTNING_FLOOR}"] = median[LIGHTNING] / median[LIGHTNING_FLOOR]
    if RECHUB in median:
        ratios[f"{LIGHTNING}/{RECHUB}"] = median[LIGHTNING] / median[RECHUB]
    return median, ratios


def own_cost_us(median: dict[str, float], batch_size: int) -> float:
    """``MTLModule``'s own cost per step beyond Lightning's floor, in µs: batch / rate of each, subtracted."""
    return 1e6 * batch_size * (1 / median[LIGHTNING] - 1 / median[LIGHTNING_FLOOR])


def report(rates: dict[str, list[float]], median: dict[str, float], cpu_median: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("contender", no_wrap=True)
    table.add_column("median samples/s", justify="right")
    table.add_column(f"/ {PLAIN}", justify="right")
    table.add_column(f"/ {PLAIN} by CPU time", justify="right")
    table.add_column("best samples/s", justify="right")
    table.add_column("runs (samples/s)", justify="right")
    for name, values in rates.items():
        ratio, cpu_ratio = median[name] / median[PLAIN], cpu_median[name] / cpu_median[PLAIN]
        runs = " ".join(f"{v:,.0f}" for v in values)
        table.add_row(name, f"{median[name]:,.0f}", f"{ratio:.2f}", f"{cpu_ratio:.2f}", f"{max(values):,.0f}", runs)
    Console(width=max(120, len(title))).print(table)


def print_ratios(result: dict) -> None:
    """The lines under the table: skipped contenders, parameter counts, the ratios and their targets."""
    median, ratios, parameters = result["samples_per_s"], result["ratios"], result["parameters"]
    if LIGHTNING_NO_METRICS not in median:
        print("(module.train_metrics is already false: the lightning row has no train metrics)")
    for name, reason in result["skipped"].items():
        print(f"{name}: skipped ({reason})")
    if RECHUB in parameters:
        print(
            f"parameters: ours {parameters['ours']:,}, torch-rechub's MMOE {parameters[RECHUB]:,} "
            "(its MLP layers add a BatchNorm after every Linear)"
        )
    if PLAIN_DATALOADER in median:
        print(f"ratio {PLAIN_DATALOADER}/{PLAIN} = {ratios[f'{PLAIN_DATALOADER}/{PLAIN}']:.2f} (per-sample loading)")
    target = result["target_ratio"]
    print(f"ratio {LIGHTNING}/{PLAIN} = {ratios[f'{LIGHTNING}/{PLAIN}']:.2f} (target >= {target:.2f})")
    floor = ratios[f"{LIGHTNING_FLOOR}/{PLAIN}"]
    print(
        f"Lightning's floor: {LIGHTNING_FLOOR}/{PLAIN} = {floor:.2f}; {LIGHTNING}/{LIGHTNING_FLOOR} = "
        f"{ratios[f'{LIGHTNING}/{LIGHTNING_FLOOR}']:.2f}, MTLModule's own cost {result['own_us_per_step']:.0f} µs/step"
    )
    cpu = result["cpu_ratios"]
    print(
        f"by process CPU time (no waiting for a core): {LIGHTNING}/{PLAIN} = {cpu[f'{LIGHTNING}/{PLAIN}']:.2f}, "
        f"{LIGHTNING_FLOOR}/{PLAIN} = {cpu[f'{LIGHTNING_FLOOR}/{PLAIN}']:.2f}, {LIGHTNING}/{LIGHTNING_FLOOR} = "
        f"{cpu[f'{LIGHTNING}/{LIGHTNING_FLOOR}']:.2f}, own cost {result['own_cpu_us_per_step']:.0f} µs/step of CPU"
    )
    if RECHUB in median:
        print(f"ratio {LIGHTNING}/{RECHUB} = {ratios[f'{LIGHTNING}/{RECHUB}']:.2f} (target >= {RECHUB_TARGET:.2f})")


def run(overrides: list[str], epochs: int, repeats: int, rechub: bool = False, census: bool = False) -> dict:
    """samples/s of each contender, interleaved; ratios to the plain loop (and lightning/rechub). Prints the
    table and returns the numbers ``--json`` writes."""
    cfg = compose_config(overrides)
    datamodule = load_data(cfg)
    rows = num_rows(datamodule.splits["train"])
    runs, parameters, skipped = contenders(cfg, datamodule, rechub, census)
    rates, cpu_rates = measure(runs, epochs, repeats, rows)
    median, ratios = summarize(rates)
    cpu_median, cpu_ratios = summarize(cpu_rates)
    title = (
        f"training throughput: {rows} train rows, batch {datamodule.batch_size}, {epochs} epoch(s) x "
        f"{repeats} round(s), {torch.get_num_threads()} threads"
    )
    report(rates, median, cpu_median, title)
    result = {
        "overrides": overrides,
        "config": {
            key: OmegaConf.to_container(cfg[key], resolve=True)
            for key in ("data", "features", "backbone", "loss", "module", "optimizer")
        },
        "train_rows": rows,
        "batch_size": datamodule.batch_size,
        "epochs": epochs,
        "repeats": repeats,
        "num_threads": torch.get_num_threads(),
        "parameters": parameters,
        "samples_per_s": median,
        "best_samples_per_s": {name: max(values) for name, values in rates.items()},
        "runs_samples_per_s": rates,
        "ratios": ratios,
        "own_us_per_step": own_cost_us(median, datamodule.batch_size),
        # the same by process CPU time (all threads) over the same spans
        "cpu_samples_per_s": cpu_median,
        "runs_cpu_samples_per_s": cpu_rates,
        "cpu_ratios": cpu_ratios,
        "own_cpu_us_per_step": own_cost_us(cpu_median, datamodule.batch_size),
        "target_ratio": CENSUS_TARGET_RATIO if census else TARGET_RATIO,
        "skipped": skipped,
    }
    if RECHUB in median or RECHUB in skipped:
        result["target_ratio_rechub"] = RECHUB_TARGET
    print_ratios(result)
    return result
