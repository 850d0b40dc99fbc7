"""One multi-task model against T single-task models (``--one-vs-many``), the promise multi-task models are
adopted for.

Each single-task model is the configured model built for one task alone (its own embeddings, experts, gate,
tower and head: with ``--census`` an MMoE with one gate): the same architecture and capacity per task, so the
T models are what one would deploy without multi-task learning. (The ``single_task`` backbone is not used for
them: it keeps one embedding table shared by all tasks, so it is not T separate models.) Every model is trained
``--epochs`` epochs (default 5) by ``Trainer.fit`` with the configured module, validation and the conflict
metrics off. The table has parameters, train seconds per epoch (median over the epochs after the first, which
warms up; the models train one after another, not interleaved), inference latency per 10k samples (eval mode,
``torch.inference_mode``, one batch of 10k test rows, median of ``--repeats`` x 10 interleaved rounds; T models
= T forward passes) and the test AUROC of the final weights, so "comparable AUC" is visible; the T-model row
sums parameters, times and latencies.
"""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from torchmetrics.functional.classification import binary_auroc

from mtl_experiments.bench.build import (
    bare_trainer,
    build_module,
    compose_config,
    load_data,
    parameter_count,
    with_conflict,
)
from mtl_experiments.bench.timing import EpochTimer, interleaved, medians
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.data.spec import gather, num_rows
from mtl_experiments.errors import ConfigError
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule

LATENCY_ROWS = 10_000
SUMMED = ("parameters", "train_s_per_epoch", "latency_ms_per_10k")


class OneTaskData(TabularDataModule):
    """One task of a set-up datamodule: the same tensors (not copied), only that task's labels."""

    def __init__(self, source: TabularDataModule, task: str):
        super().__init__(
            tasks={task: {"kind": source.tasks[task].kind}},
            batch_size=source.batch_size,
            eval_batch_size=source.eval_batch_size,
            shuffle_seed=source.shuffle_seed,
        )
        self.tasks = {task: source.tasks[task]}  # the source's own Task object, options included
        self.source = source

    def load(self):
        (task,) = self.tasks
        splits = {k: {**v, "labels": {task: v["labels"][task]}} for k, v in self.source.splits.items()}
        return splits["train"], splits["val"], splits["test"], self.source.feature_spec


def train_for(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> tuple[MTLModule, list[float]]:
    """A freshly seeded module trained ``epochs`` epochs by Trainer.fit (no validation); seconds per epoch."""
    module, timer = build_module(cfg, datamodule), EpochTimer()
    trainer = bare_trainer(epochs, [timer])
    trainer.fit(module, datamodule=datamodule)
    return module, timer.seconds


@torch.inference_mode()
def test_auroc(model: MultiTaskModel, datamodule: TabularDataModule) -> dict[str, float]:
    model.eval()
    split = datamodule.splits["test"]
    outputs = model(split["features"])
    return {
        name: float(binary_auroc(task.predict(outputs[name]), split["labels"][name].long()))
        for name, task in datamodule.tasks.items()
    }


def latency_batch(datamodule: TabularDataModule) -> dict:
    """``LATENCY_ROWS`` test rows (cycled when the test split is smaller), as one batch of features."""
    split = datamodule.splits["test"]
    return gather(split["features"], torch.arange(LATENCY_ROWS) % num_rows(split))


def latencies(serve: dict[str, list[MultiTaskModel]], batch: dict, rounds: int) -> dict[str, list[float]]:
    """Milliseconds for each group of models to score ``batch`` one model after another, interleaved rounds."""

    @torch.inference_mode()
    def latency_ms(group: list[MultiTaskModel]) -> float:
        start = time.perf_counter()
        for model in group:
            model(batch)
        return 1e3 * (time.perf_counter() - start)

    for group in serve.values():
        for model in group:
            model.eval()
        latency_ms(group)  # warm-up
    return interleaved({name: (lambda group=group: latency_ms(group)) for name, group in serve.items()}, rounds)


def check_tasks(datamodule: TabularDataModule) -> list[str]:
    tasks = list(datamodule.tasks)
    if len(tasks) < 2:
        raise ConfigError(f"--one-vs-many compares one model of T >= 2 tasks with T models; data.tasks has {tasks}.")
    not_binary = [n for n, t in datamodule.tasks.items() if t.kind != "binary"]
    if not_binary:
        raise ConfigError(f"--one-vs-many reports test AUROC, so every task must be binary; {not_binary} are not.")
    return tasks


def train_each(cfg: DictConfig, data: dict[str, TabularDataModule], epochs: int):
    """Every model trained in turn: its numbers (parameters, seconds per epoch, test AUROC) and the model."""
    results: dict[str, dict] = {}
    models: dict[str, MultiTaskModel] = {}
    for name, dm in data.items():
        dm.setup()
        module, seconds = train_for(cfg, dm, epochs)
        models[name] = module.model
        results[name] = {
            "parameters": parameter_count(module.model),
            "train_s_per_epoch": statistics.median(seconds[1:] or seconds),  # the first epoch warms up
            "train_s_epochs": seconds,
            "test_auroc": test_auroc(module.model, dm),
        }
    return results, models


def report(multi: dict, results: dict[str, dict], singles: dict, tasks: list[str], title: str) -> None:
    table = Table(title=title)
    table.add_column("model(s)", no_wrap=True)
    table.add_column("parameters", justify="right")
    table.add_column("train s/epoch", justify="right")
    table.add_column(f"ms per {LATENCY_ROWS // 1000}k (inference)", justify="right")
    for task in tasks:
        table.add_column(f"test AUROC {task}", justify="right")

    def row(label: str, r: dict, auroc: dict[str, float], latency: str) -> None:
        cells = [f"{auroc[t]:.4f}" if t in auroc else "" for t in tasks]
        table.add_row(label, f"{r['parameters']:,}", f"{r['train_s_per_epoch']:.2f}", latency, *cells)

    row(f"1 multi-task model ({len(tasks)} tasks)", multi, multi["test_auroc"], f"{multi['latency_ms_per_10k']:.1f}")
    for task in tasks:
        row(f"  single-task model: {task}", results[task], results[task]["test_auroc"], "")
    row(
        f"{len(tasks)} single-task models (sum)",
        singles,
        singles["test_auroc"],
        f"{singles['latency_ms_per_10k']:.1f}",
    )
    Console(width=140).print(table)


def run(overrides: list[str], epochs: int, repeats: int) -> dict:
    """One multi-task model against T single-task models: parameters, train time, latency, test AUROC. Prints
    the table and the ratios and returns the numbers ``--json`` writes."""
    cfg = with_conflict(compose_config(overrides), 0)  # a diagnostic of multi-task training, off for both
    datamodule = load_data(cfg)
    tasks = check_tasks(datamodule)
    data = {"multi": datamodule, **{task: OneTaskData(datamodule, task) for task in tasks}}
    results, models = train_each(cfg, data, epochs)
    serve = {"multi": [models["multi"]], "singles": [models[t] for t in tasks]}
    ms = latencies(serve, latency_batch(datamodule), 10 * repeats)
    latency = medians(ms)
    singles = {
        "parameters": sum(results[t]["parameters"] for t in tasks),
        "train_s_per_epoch": sum(results[t]["train_s_per_epoch"] for t in tasks),
        "latency_ms_per_10k": latency["singles"],
        "test_auroc": {t: results[t]["test_auroc"][t] for t in tasks},
    }
    multi = {**results["multi"], "latency_ms_per_10k": latency["multi"]}
    ratios = {key: multi[key] / singles[key] for key in SUMMED}
    backbone, rows = cfg.backbone._target_.rsplit(".", 1)[-1], num_rows(datamodule.splits["train"])
    title = (
        f"one {backbone} for {len(tasks)} tasks vs {len(tasks)} single-task {backbone}s: {rows} train rows, "
        f"{epochs} epoch(s) each, batch {datamodule.batch_size}, {torch.get_num_threads()} threads"
    )
    report(multi, results, singles, tasks, title)
    print(
        f"multi / {len(tasks)} single: parameters {ratios['parameters']:.2f}x, train time per epoch "
        f"{ratios['train_s_per_epoch']:.2f}x, inference latency {ratios['latency_ms_per_10k']:.2f}x; test AUROC "
        + ", ".join(f"{t} {multi['test_auroc'][t] - singles['test_auroc'][t]:+.4f}" for t in tasks)
        + " (multi - single)"
    )
    return {
        "overrides": overrides,
        "epochs": epochs,
        "num_threads": torch.get_num_threads(),
        "train_rows": rows,
        "latency_rows": LATENCY_ROWS,
        "latency_rounds": 10 * repeats,
        "multi": multi,
        "single": {t: results[t] for t in tasks},
        "singles_total": singles,
        "ratios_multi_to_singles": ratios,
        "runs_latency_ms": ms,
    }
