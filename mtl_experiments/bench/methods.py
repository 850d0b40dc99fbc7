"""Training step time of every loss weighting method relative to ``loss=equal`` (``--methods``).

Every method of ``conf/loss/*.yaml`` (or ``--methods-list a,b``) trains the same model on the same data, for
each task count in ``--tasks`` (default 2 and 4; tasks beyond the config's are added as binary tasks ``y3``,
``y4``, ...), on each model of ``--models`` (default both realistic ones, ``MODELS``):

- ``recsys``: the recommender MMoE (``data=recsys_synthetic backbone=mmoe``: user/item/feature embedding tables,
  8 experts of 64, towers of 32, batch 512; 88.9k parameters, 30.2k of them the shared experts);
- ``mmoe665k``: the MMoE of ``backbone=mmoe`` with experts of [512, 60] on the default synthetic data (input 100,
  batch 256): 665k parameters, 660k shared, so ``G`` has 660k columns;
- ``config``: the config as given (only the command's overrides; what ``--methods`` timed before).

The conflict metrics are off in the two presets (``module.conflict.every_n_steps=0``, ``track_every_n_steps=0``:
they cost every method alike and would blur the ratios); an override on the command line still wins.

The time is that of the training steps alone (``timing.StepTimer``: batch start to batch end, without fit set-up
or epoch ends), per step; after one untimed warm-up epoch each, the (model, task count, method) runs are
interleaved for ``--repeats`` rounds. Each round's ratio pairs a method with ``equal`` of the same round (a slow
phase of the machine hits both); the table reports the median ratio and its spread (min-max over rounds).

Beside each ratio, the floor of the method's family, measured in the same rounds:
- loss-level methods (one backward of a weighted sum): ``equal`` itself, 1.00x;
- per-task-gradient methods (``needs_task_grads``): ``GradientFloor`` (``bench.floor``), which computes ``G``
  (the T per-task backward passes over the shared parameters, ``grads.task_gradients``) and applies their plain
  sum: no method that needs ``G`` can be faster; what a method costs above it is its aggregation.
"""

from __future__ import annotations

import statistics

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from mtl_experiments.bench.build import CONFIG_DIR, compose_config, load_data, step_ms
from mtl_experiments.bench.timing import interleaved

NO_CONFLICT = ["module.conflict.every_n_steps=0", "module.conflict.track_every_n_steps=0"]
MODELS = {
    "recsys": ["data=recsys_synthetic", "backbone=mmoe", *NO_CONFLICT],
    "mmoe665k": ["backbone=mmoe", "backbone.expert_dims=[512,60]", *NO_CONFLICT],
    "config": [],
}
DEFAULT_MODELS = "recsys,mmoe665k"
GRAD_FLOOR = "gradient_floor"  # the per-task-gradient floor's row (bench.floor.GradientFloor)
GRAD_FLOOR_TARGET = "mtl_experiments.bench.floor.GradientFloor"


def task_overrides(cfg: DictConfig, num_tasks: int) -> list[str]:
    """Overrides that give the config ``num_tasks`` tasks (extra ones binary, named y3, y4, ...)."""
    have = list(cfg.data.tasks)
    if num_tasks < len(have):
        return [f"~data.tasks.{name}" for name in have[num_tasks:]]
    return [f"+data.tasks.y{i + 1}={{kind: binary}}" for i in range(len(have), num_tasks)]


def needs_task_grads(cfg: DictConfig) -> bool:
    """Whether the configured method computes per-task gradients (its family's floor is ``GradientFloor``)."""
    return bool(getattr(get_class(cfg.loss._target_), "needs_task_grads", False))


def method_config(overrides: list[str], base: DictConfig, num_tasks: int, method: str) -> DictConfig:
    """The config of one (task count, method); ``GRAD_FLOOR`` is ``loss=equal`` with ``GradientFloor`` instead."""
    cfg = compose_config(
        [*overrides, *task_overrides(base, num_tasks), f"loss={'equal' if method == GRAD_FLOOR else method}"]
    )
    if method == GRAD_FLOOR:
        with open_dict(cfg):
            cfg.loss = {"_target_": GRAD_FLOOR_TARGET}
    return cfg


def paired_ratios(ms: dict[tuple, list[float]], key: tuple, reference: tuple) -> list[float]:
    """Round-by-round ratios of ``key``'s step time to ``reference``'s (the same round's)."""
    return [a / b for a, b in zip(ms[key], ms[reference], strict=True)]


def summarize(ms: dict[tuple, list[float]], families: dict) -> dict:
    """Per (model, T, method): median ms/step, median paired ratio to equal, its min and max, and the family floor."""
    rows = {}
    for model, t, method in ms:
        equal = (model, t, "equal")
        ratios = paired_ratios(ms, (model, t, method), equal)
        floor = statistics.median(paired_ratios(ms, (model, t, GRAD_FLOOR), equal)) if families[method] else 1.0
        rows[(model, t, method)] = {
            "ms": statistics.median(ms[(model, t, method)]),
            "ratio": statistics.median(ratios),
            "low": min(ratios),
            "high": max(ratios),
            "floor": floor,
        }
    return rows


def report(rows: dict, model: str, methods: list[str], task_counts: list[int], families: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("method")
    table.add_column("family (floor)")
    for t in task_counts:
        table.add_column(f"T={t} ms/step", justify="right")
        table.add_column(f"T={t} / equal (min-max)", justify="right")
        table.add_column(f"T={t} floor", justify="right")
    for method in [*methods, GRAD_FLOOR]:
        family = "G: T backwards" if families[method] else "loss: 1 backward"
        cells = []
        for t in task_counts:
            r = rows[(model, t, method)]
            cells += [f"{r['ms']:.2f}", f"{r['ratio']:.2f}x ({r['low']:.2f}-{r['high']:.2f})", f"{r['floor']:.2f}x"]
        table.add_row(method, family, *cells)
    Console(width=160).print(table)


def run(
    overrides: list[str], methods_list: str | None, tasks: str, epochs: int, repeats: int, models: str = DEFAULT_MODELS
) -> dict:
    """Per-step training time of each loss method relative to ``equal``, per model and task count (``tasks``: "2,4")."""
    methods = methods_list.split(",") if methods_list else sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))
    methods = ["equal", *[m for m in methods if m != "equal"]]
    task_counts = [int(t) for t in tasks.split(",")]
    model_names = models.split(",")
    setups, families = {}, {}
    for model in model_names:
        model_overrides = [*MODELS[model], *overrides]  # the command's overrides win
        base = compose_config(model_overrides)
        for t in task_counts:
            for method in [*methods, GRAD_FLOOR]:
                cfg = method_config(model_overrides, base, t, method)
                families[method] = method == GRAD_FLOOR or needs_task_grads(cfg)
                setups[(model, t, method)] = (cfg, load_data(cfg))
    for cfg, datamodule in setups.values():  # warm-up, untimed
        step_ms(cfg, datamodule, 1)
    runs = {key: (lambda setup=setup: step_ms(*setup, epochs)) for key, setup in setups.items()}
    ms = interleaved(runs, repeats)
    rows = summarize(ms, families)
    for model in model_names:
        title = (
            f"{model}: step time per loss method ({epochs} epoch(s) x {repeats} round(s), median, min-max of rounds)"
        )
        report(rows, model, methods, task_counts, families, title)
    first = model_names[0]  # the keys --methods always wrote: the first model's
    return {
        "overrides": overrides,
        "epochs": epochs,
        "repeats": repeats,
        "num_threads": torch.get_num_threads(),
        "ms_per_step": {f"{m}@T{t}": rows[(first, t, m)]["ms"] for t in task_counts for m in methods},
        "ratio_to_equal": {f"{m}@T{t}": rows[(first, t, m)]["ratio"] for t in task_counts for m in methods},
        "models": {name: MODELS[name] for name in model_names},
        "by_model": {
            name: {f"{m}@T{t}": rows[(name, t, m)] for t in task_counts for m in [*methods, GRAD_FLOOR]}
            for name in model_names
        },
        "families": {m: "task_gradients" if g else "loss" for m, g in families.items()},
    }
