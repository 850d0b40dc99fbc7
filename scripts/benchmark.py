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

With ``--rechub`` (implied by ``--census``) a ``rechub`` contender joins: torch-rechub's own ``MMOE``
trained by its own ``MTLTrainer.train_one_epoch`` on the same train tensors (converted to the numpy
columns its ``DataGenerator`` takes, as its ``examples/ranking/run_census.py`` does), sized from the
config: the same categorical columns and cardinalities, the same embedding dimension per column, the
same numeric columns (one ``DenseFeature`` each), experts, towers, optimizer and batch size. Its MLP
layers add a BatchNorm after every Linear (its design; the parameter counts of both are printed), its
DataLoader builds each batch from per-row ``__getitem__`` + collate, and its tqdm bar and per-epoch
print go to /dev/null. It needs the optional package, installed in the benchmark's environment only
(never a project dependency)::

    pip install torch-rechub        # 0.9.0 measured; it needs nothing the project does not already have

Without it the contender is skipped and the output says why. ``lightning/rechub`` is the ratio the
issue asks for (target >= 3x), next to ``lightning/plain`` (target >= 0.9x).

``--census`` is the census setting in one flag: ``experiment=census_mmoe`` (Census-Income, embeddings
of 4, 8 experts of 16, towers of 8, Adam 1e-3 / 1e-4, batch 1024; 21.3k parameters) and the contenders
``plain``, ``lightning`` and ``rechub``. The data is read from ``$MTL_CENSUS_ROOT`` (default
``../shared/data/census-income``); the first load parses the files (~9 s), later ones read the cache.

With ``--one-vs-many`` it instead compares one multi-task model with T single-task models, the promise
multi-task models are adopted for. Each single-task model is the configured model built for one task
alone (its own embeddings, experts, gate, tower and head: with ``--census`` an MMoE with one gate):
the same architecture and capacity per task, so the T models are what one would deploy without
multi-task learning. (The ``single_task`` backbone is not used for them: it keeps one embedding table
shared by all tasks, so it is not T separate models.) Every model is trained ``--epochs`` epochs
(default 5) by ``Trainer.fit`` with the configured module, validation and the conflict metrics off;
the table has parameters, train seconds per epoch (median over the epochs after the first, which warms
up; the models train one after another, not interleaved), inference latency per 10k
samples (eval mode, ``torch.inference_mode``, one batch of 10k test rows, median of ``--repeats`` x 10
interleaved rounds; T models = T forward passes) and the test AUROC of the final weights, so
"comparable AUC" is visible; the T-model row sums parameters, times and latencies.

With ``--sparse-scale`` it instead measures what large id tables cost per training step: a model of a user
and an item id table of N rows each (``--sizes``, default 10k, 100k and 1M; the real ``FeatureEncoder``,
embedding dimension 16) and a small MLP (32 -> 64 -> 1, binary cross-entropy on random labels), batch 512 of
uniformly drawn ids (``--batch-size``), in two modes: ``dense`` (ordinary tables, dense gradients, ``torch.optim.Adam``:
every step reads and writes every row and its moments) and ``sparse`` (``features.sparse=true`` tables and
``optimizer=sparse_adam``: SparseAdam for the tables, AdamW for the MLP). Step time = zero_grad + forward +
backward + optimizer step, median of ``--steps`` steps (default 50) after 5 untimed warm-up steps. Peak memory
= the peak resident set size (``ru_maxrss``) minus the RSS after imports, so it covers the model, gradients,
optimizer state, batches and activations; each (mode, N) runs in a fresh process so every peak is its own
(tracemalloc cannot see torch's allocations). The ``--repeats`` rounds run every configuration once each,
interleaved; the table reports the medians over rounds and the ratios largest N / smallest N per mode (aim:
the sparse step time grows <= 1.5x from 10k to 1M rows). Run it with ``OMP_NUM_THREADS=1`` to compare with
the figures in the docs.

Run (any Hydra override of ``train.py`` applies)::

    python scripts/benchmark.py
    python scripts/benchmark.py --epochs 5 --repeats 5 --json bench.json
    python scripts/benchmark.py backbone=single_task data.batch_size=512
    python scripts/benchmark.py --methods --tasks 2,4 --json methods.json
    python scripts/benchmark.py --conflict --repeats 5
    python scripts/benchmark.py --census --json census.json          # plain, lightning, rechub
    python scripts/benchmark.py --census --one-vs-many --json one_vs_many.json
    OMP_NUM_THREADS=1 python scripts/benchmark.py --sparse-scale --json sparse.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_auroc

from mtl_experiments import pipeline
from mtl_experiments.data.base import FeatureSpec, TabularDataModule
from mtl_experiments.errors import ConfigError, MTLError
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
TARGET_RATIO = 0.9

PLAIN = "plain"
LIGHTNING = "lightning"
LIGHTNING_NO_METRICS = "lightning_no_train_metrics"
PLAIN_DATALOADER = "plain_dataloader"
RECHUB = "rechub"
RECHUB_TARGET = 3.0
RECHUB_INSTALL = "pip install torch-rechub"
CENSUS_OVERRIDES = ["experiment=census_mmoe"]
MMOE_TARGET = "mtl_experiments.backbone.mmoe.MMoE"
LATENCY_ROWS = 10_000
CONFLICT_ON = "conflict_on"
CONFLICT_OFF = "conflict_off"
CONFLICT_TARGET = 0.05


# -- building, the way pipeline.train does ------------------------------------------------------------
def compose_config(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()  # callable from a process that composed before (tests, notebooks)
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


# -- torch-rechub's MMOE and MTLTrainer (optional package, benchmark only) --------------------------
def rechub_missing() -> str | None:
    """Why the rechub contender cannot run here, or None when it can."""
    try:
        import torch_rechub.trainers  # noqa: F401
    except Exception as e:  # not installed, or installed against versions it cannot import with
        return f"torch_rechub cannot be imported ({type(e).__name__}: {e})"
    return None


def rechub_columns(split: dict, spec: FeatureSpec) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A split as the ``{column: numpy array}`` + ``labels[N, T]`` that torch-rechub's ``DataGenerator`` takes."""
    features = split["features"]
    x = {name: features["categorical"][:, i].numpy() for i, name in enumerate(spec.categorical)}
    x.update({name: features["numeric"][:, j].numpy() for j, name in enumerate(spec.numeric)})
    y = np.stack([label.numpy() for label in split["labels"].values()], axis=1)
    return x, y


def build_rechub(cfg: DictConfig, datamodule: TabularDataModule):
    """torch-rechub's MMOE, MTLTrainer and train DataLoader sized from ``cfg`` (as its run_census.py builds them)."""
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    backbone = cfg.backbone
    if backbone._target_ != MMOE_TARGET:
        raise ConfigError(
            f"The rechub contender trains torch-rechub's MMOE, so it needs backbone=mmoe; this config has "
            f"{backbone._target_}. Use --census, or add backbone=mmoe."
        )
    if str(backbone.get("activation", "ReLU")) != "ReLU":
        raise ConfigError("The rechub contender uses ReLU (torch-rechub's default); set backbone.activation=ReLU.")
    kinds = {"binary": "classification", "regression": "regression"}
    task_types = []
    for name, task in datamodule.tasks.items():
        if task.kind not in kinds:
            raise ConfigError(
                f"torch-rechub's MTLTrainer has binary and regression tasks only; '{name}' is {task.kind}."
            )
        task_types.append(kinds[task.kind])
    spec = datamodule.feature_spec
    encoder = pipeline.build(cfg, "features", spec=spec)  # the embedding dimension of each column, as ours
    features = [SparseFeature(c, card, embed_dim=encoder.embedding_dims[c]) for c, card in spec.categorical.items()]
    features += [DenseFeature(c) for c in spec.numeric]
    dropout = float(backbone.get("dropout", 0.0))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = MMOE(
        features,
        task_types,
        int(backbone.num_experts),
        expert_params={"dims": list(backbone.expert_dims), "dropout": dropout},
        tower_params_list=[{"dims": list(backbone.tower_dims), "dropout": dropout}] * len(task_types),
    )
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer_fn = get_class(optimizer.pop("_target_"))
    optimizer.pop("_partial_", None)
    trainer = MTLTrainer(model, task_types, optimizer_fn=optimizer_fn, optimizer_params=optimizer, device="cpu")
    x, y = rechub_columns(datamodule.splits["train"], spec)
    x_val, y_val = rechub_columns(datamodule.splits["val"], spec)
    loaders = DataGenerator(x, y).generate_dataloader(
        x_val=x_val, y_val=y_val, x_test=x_val, y_test=y_val, batch_size=datamodule.batch_size
    )
    return trainer, loaders[0]


def rechub_fit(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> float:
    trainer, loader = build_rechub(cfg, datamodule)
    # its trainer has no switch for its tqdm bar and per-epoch print: they still run, into /dev/null
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        start = time.perf_counter()
        for _ in range(epochs):
            trainer.train_one_epoch(loader)
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


def bare_trainer(epochs: int, callbacks=(), log_every_n_steps: int = 50) -> pl.Trainer:
    """A CPU Trainer that only trains: no logger, checkpoints, progress bar, summary or validation."""
    return pl.Trainer(
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


def lightning_fit(
    cfg: DictConfig, datamodule: TabularDataModule, epochs: int, callbacks=(), log_every_n_steps: int = 50
) -> float:
    module = build_module(cfg, datamodule)
    trainer = bare_trainer(epochs, callbacks, log_every_n_steps)
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
    if RECHUB in medians:
        ratios[f"{LIGHTNING}/{RECHUB}"] = medians[LIGHTNING] / medians[RECHUB]
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
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs per timed run (default 3; 5 for --one-vs-many)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--methods", action="store_true", help="step time of each loss method relative to equal")
    parser.add_argument("--methods-list", default=None, help="comma-separated methods (default: all conf/loss)")
    parser.add_argument("--tasks", default="2,4", help="task counts for --methods (default 2,4)")
    parser.add_argument("--conflict", action="store_true", help="overhead of the task-conflict metrics (on vs off)")
    parser.add_argument(
        "--rechub", action="store_true", help=f"add torch-rechub's MMOE + MTLTrainer as a contender ({RECHUB_INSTALL})"
    )
    parser.add_argument(
        "--census",
        action="store_true",
        help="the census setting: experiment=census_mmoe; contenders plain, lightning, rechub",
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
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if (args.epochs is not None and args.epochs < 1) or args.repeats < 1:
        parser.error("--epochs and --repeats must be >= 1")
    if sum([args.methods, args.conflict, args.one_vs_many, args.sparse_scale]) > 1:
        parser.error("--methods, --conflict, --one-vs-many and --sparse-scale are separate measurements: choose one")
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


# -- one multi-task model against T single-task models ---------------------------------------------
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
    return _take(split["features"], torch.arange(LATENCY_ROWS) % _num_rows(split))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def one_vs_many(args: argparse.Namespace, overrides: list[str]) -> int:
    """One multi-task model against T single-task models: parameters, train time, latency, test AUROC."""
    cfg = with_conflict(compose_config(overrides), 0)  # a diagnostic of multi-task training, off for both
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    tasks = list(datamodule.tasks)
    if len(tasks) < 2:
        raise ConfigError(f"--one-vs-many compares one model of T >= 2 tasks with T models; data.tasks has {tasks}.")
    not_binary = [n for n, t in datamodule.tasks.items() if t.kind != "binary"]
    if not_binary:
        raise ConfigError(f"--one-vs-many reports test AUROC, so every task must be binary; {not_binary} are not.")
    epochs = args.epochs
    data = {"multi": datamodule, **{task: OneTaskData(datamodule, task) for task in tasks}}

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

    # latency: the multi-task model against the T models one after another, interleaved rounds
    batch = latency_batch(datamodule)
    serve = {"multi": [models["multi"]], "singles": [models[t] for t in tasks]}

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
    ms: dict[str, list[float]] = {name: [] for name in serve}
    for _ in range(10 * args.repeats):
        for name, group in serve.items():
            ms[name].append(latency_ms(group))
    singles = {
        "parameters": sum(results[t]["parameters"] for t in tasks),
        "train_s_per_epoch": sum(results[t]["train_s_per_epoch"] for t in tasks),
        "latency_ms_per_10k": statistics.median(ms["singles"]),
        "test_auroc": {t: results[t]["test_auroc"][t] for t in tasks},
    }
    multi = {**results["multi"], "latency_ms_per_10k": statistics.median(ms["multi"])}
    ratios = {key: multi[key] / singles[key] for key in ("parameters", "train_s_per_epoch", "latency_ms_per_10k")}

    backbone = cfg.backbone._target_.rsplit(".", 1)[-1]
    table = Table(
        title=f"one {backbone} for {len(tasks)} tasks vs {len(tasks)} single-task {backbone}s: "
        f"{_num_rows(datamodule.splits['train'])} train rows, {epochs} epoch(s) each, batch {datamodule.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
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
    print(
        f"multi / {len(tasks)} single: parameters {ratios['parameters']:.2f}x, train time per epoch "
        f"{ratios['train_s_per_epoch']:.2f}x, inference latency {ratios['latency_ms_per_10k']:.2f}x; test AUROC "
        + ", ".join(f"{t} {multi['test_auroc'][t] - singles['test_auroc'][t]:+.4f}" for t in tasks)
        + " (multi - single)"
    )
    if args.json is not None:
        write_json(
            args.json,
            {
                "overrides": overrides,
                "epochs": epochs,
                "num_threads": torch.get_num_threads(),
                "train_rows": _num_rows(datamodule.splits["train"]),
                "latency_rows": LATENCY_ROWS,
                "latency_rounds": 10 * args.repeats,
                "multi": multi,
                "single": {t: results[t] for t in tasks},
                "singles_total": singles,
                "ratios_multi_to_singles": ratios,
                "runs_latency_ms": ms,
            },
        )
    return 0


def throughput(args: argparse.Namespace, overrides: list[str]) -> int:
    """samples/s of each contender, interleaved; ratios to the plain loop (and lightning/rechub)."""
    epochs = args.epochs
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    rows = _num_rows(datamodule.splits["train"])

    contenders: dict[str, Callable[[int], float]] = {
        PLAIN: lambda e: plain_sliced(cfg, datamodule, e),
        LIGHTNING: lambda e: lightning_fit(cfg, datamodule, e),
    }
    if not args.census:
        if cfg.module.get("train_metrics", True):
            no_metrics_cfg = with_train_metrics(cfg, False)
            contenders[LIGHTNING_NO_METRICS] = lambda e: lightning_fit(no_metrics_cfg, datamodule, e)
        contenders[PLAIN_DATALOADER] = lambda e: plain_dataloader(cfg, datamodule, e)
    skipped: dict[str, str] = {}
    parameters = {"ours": parameter_count(build_model(cfg, datamodule))}  # plain and lightning
    if args.rechub or args.census:
        missing = rechub_missing()
        if missing:
            skipped[RECHUB] = f"{missing}; install it in the benchmark's environment: {RECHUB_INSTALL}"
        else:
            parameters[RECHUB] = parameter_count(build_rechub(cfg, datamodule)[0].model)  # checks the config too
            contenders[RECHUB] = lambda e: rechub_fit(cfg, datamodule, e)

    rates = measure(contenders, epochs, args.repeats, rows)
    medians, ratios = summarize(rates)
    title = (
        f"training throughput: {rows} train rows, batch {datamodule.batch_size}, {epochs} epoch(s) x "
        f"{args.repeats} round(s), {torch.get_num_threads()} threads"
    )
    report(rates, medians, title)
    if LIGHTNING_NO_METRICS not in medians and not args.census:
        print("(module.train_metrics is already false: the lightning row has no train metrics)")
    for name, reason in skipped.items():
        print(f"{name}: skipped ({reason})")
    if RECHUB in parameters:
        print(
            f"parameters: ours {parameters['ours']:,}, torch-rechub's MMOE {parameters[RECHUB]:,} "
            "(its MLP layers add a BatchNorm after every Linear)"
        )
    if PLAIN_DATALOADER in medians:
        print(f"ratio {PLAIN_DATALOADER}/{PLAIN} = {ratios[f'{PLAIN_DATALOADER}/{PLAIN}']:.2f} (per-sample loading)")
    print(f"ratio {LIGHTNING}/{PLAIN} = {ratios[f'{LIGHTNING}/{PLAIN}']:.2f} (target >= {TARGET_RATIO:.2f})")
    if RECHUB in medians:
        print(f"ratio {LIGHTNING}/{RECHUB} = {ratios[f'{LIGHTNING}/{RECHUB}']:.2f} (target >= {RECHUB_TARGET:.2f})")

    if args.json is not None:
        result = {
            "overrides": overrides,
            "config": {
                key: OmegaConf.to_container(cfg[key], resolve=True)
                for key in ("data", "features", "backbone", "loss", "module", "optimizer")
            },
            "train_rows": rows,
            "batch_size": datamodule.batch_size,
            "epochs": epochs,
            "repeats": args.repeats,
            "num_threads": torch.get_num_threads(),
            "parameters": parameters,
            "samples_per_s": medians,
            "best_samples_per_s": {name: max(values) for name, values in rates.items()},
            "runs_samples_per_s": rates,
            "ratios": ratios,
            "target_ratio": TARGET_RATIO,
            "skipped": skipped,
        }
        if RECHUB in medians or RECHUB in skipped:
            result["target_ratio_rechub"] = RECHUB_TARGET
        write_json(args.json, result)
    return 0


# -- --sparse-scale: large id tables, dense Adam against sparse gradients + SparseAdam -------------------------
SPARSE_MODES = ("dense", "sparse")
SPARSE_DIM = 16
SPARSE_WARMUP = 5
SPARSE_TARGET = 1.5


def _rss_mb() -> float:
    """The resident set size now (Linux /proc), else the peak so far (ru_maxrss), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KB on Linux


def sparse_scale_model(rows: int, sparse: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """User and item id tables of ``rows`` rows each (+ the id 0) through the real encoder, and a small MLP."""
    from mtl_experiments.features import FeatureEncoder
    from mtl_experiments.optimizer.sparse_adam import SparseDenseAdam

    spec = FeatureSpec(
        categorical={"user_id": rows + 1, "item_id": rows + 1}, id_columns={"user_id": "user_id", "item_id": "item_id"}
    )
    torch.manual_seed(0)
    encoder = FeatureEncoder(spec, embedding_dim=SPARSE_DIM, sparse=sparse)
    model = torch.nn.Sequential(
        encoder, torch.nn.Linear(encoder.output_dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1), torch.nn.Flatten(0)
    )
    optimizer = (
        SparseDenseAdam(model.parameters(), lr=1e-3) if sparse else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    return model, optimizer


def sparse_scale_one(args: argparse.Namespace, overrides: list[str]) -> int:
    """One (mode, rows) measurement in this (fresh) process; prints its JSON line."""
    mode, rows = args.sparse_scale_one.split(":")
    rows = int(rows)
    baseline = _rss_mb()
    model, optimizer = sparse_scale_model(rows, sparse=mode == "sparse")
    g = torch.Generator().manual_seed(0)
    n = SPARSE_WARMUP + args.steps
    ids = torch.randint(1, rows + 1, (n, args.batch_size, 2), generator=g)
    labels = (torch.rand(n, args.batch_size, generator=g) < 0.2).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    times = []
    for i in range(n):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model({"categorical": ids[i]}), labels[i]).backward()
        optimizer.step()
        if i >= SPARSE_WARMUP:
            times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "ms_per_step": 1e3 * statistics.median(times),
                "peak_mb": _peak_rss_mb() - baseline,
                "parameters": parameter_count(model),
                "num_threads": torch.get_num_threads(),
            }
        )
    )
    return 0


def sparse_scale(args: argparse.Namespace, overrides: list[str]) -> int:
    """Step time and peak memory per table size, dense Adam against sparse tables + SparseAdam; ratios per mode."""
    if overrides:
        raise ConfigError(f"--sparse-scale builds its own model and takes no Hydra overrides, got {overrides}.")
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--sizes must be comma-separated positive integers, got {args.sizes!r}.")
    configs = [(mode, rows) for rows in sizes for mode in SPARSE_MODES]
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):  # interleaved rounds, each measurement in a fresh process (its own peak RSS)
        for mode, rows in configs:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--sparse-scale-one", f"{mode}:{rows}"]
            cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} with {rows} rows failed:\n{proc.stderr[-2000:]}")
            runs[(mode, rows)].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ms = {c: statistics.median(r["ms_per_step"] for r in rs) for c, rs in runs.items()}
    mb = {c: statistics.median(r["peak_mb"] for r in rs) for c, rs in runs.items()}
    small, large = min(sizes), max(sizes)
    ratios = {
        mode: {"time": ms[(mode, large)] / ms[(mode, small)], "memory": mb[(mode, large)] / mb[(mode, small)]}
        for mode in SPARSE_MODES
    }
    threads = runs[configs[0]][0]["num_threads"]
    table = Table(
        title=f"id tables (user + item, dim {SPARSE_DIM}) + MLP, batch {args.batch_size}: median of {args.steps} "
        f"steps x {args.repeats} round(s), {threads} thread(s)"
    )
    table.add_column("rows per table", justify="right")
    for mode in SPARSE_MODES:
        table.add_column(f"{mode} ms/step", justify="right")
        table.add_column(f"{mode} peak MB", justify="right")
    table.add_column("dense / sparse time", justify="right")
    for rows in sizes:
        cells = []
        for mode in SPARSE_MODES:
            cells += [f"{ms[(mode, rows)]:.2f}", f"{mb[(mode, rows)]:.0f}"]
        table.add_row(f"{rows:,}", *cells, f"{ms[('dense', rows)] / ms[('sparse', rows)]:.1f}x")
    table.add_row(
        f"{large:,} / {small:,}",
        *[f"{ratios[m][k]:.2f}x" for m in SPARSE_MODES for k in ("time", "memory")],
        "",
    )
    Console(width=140).print(table)
    growth = ratios["sparse"]["time"]
    verdict = "met" if growth <= SPARSE_TARGET else "not met"
    print(f"sparse step time {large:,} / {small:,} rows: {growth:.2f}x (target <= {SPARSE_TARGET}x: {verdict})")
    if args.json is not None:
        write_json(
            args.json,
            {
                "sizes": sizes,
                "embedding_dim": SPARSE_DIM,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "repeats": args.repeats,
                "num_threads": threads,
                "ms_per_step": {f"{m}@{r}": v for (m, r), v in ms.items()},
                "peak_mb": {f"{m}@{r}": v for (m, r), v in mb.items()},
                "parameters": {f"{m}@{r}": rs[0]["parameters"] for (m, r), rs in runs.items()},
                "ratios": ratios,
                "target": SPARSE_TARGET,
            },
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "consider more workers" and similar hints are about the user's setup, not this measurement
    warnings.filterwarnings("ignore", module=r"lightning\.")
    if args.sparse_scale_one:
        mode = sparse_scale_one
    elif args.sparse_scale:
        mode = sparse_scale
    elif args.methods:
        mode = method_step_times
    elif args.conflict:
        mode = conflict_overhead
    elif args.one_vs_many:
        mode = one_vs_many
    else:
        mode = throughput
    try:
        return mode(args, overrides)
    except (MTLError, HydraException, OmegaConfBaseException) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
