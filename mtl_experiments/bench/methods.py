"""Training step time of every loss weighting method relative to ``loss=equal`` (``--methods``).

Every method of ``conf/loss/*.yaml`` (or ``--methods-list a,b``) trains the same model on the same data, for
each task count in ``--tasks`` (default 2 and 4; tasks beyond the config's are added as binary tasks ``y3``,
``y4``, ...). The time is that of the training steps alone (``timing.StepTimer``: batch start to batch end,
without fit set-up or epoch ends), per step; after one untimed warm-up epoch each, the (task count, method)
runs are interleaved for ``--repeats`` rounds and the table reports medians and ratios to ``equal``.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mtl_experiments.bench.build import CONFIG_DIR, compose_config, load_data, step_ms
from mtl_experiments.bench.timing import interleaved, medians


def task_overrides(cfg: DictConfig, num_tasks: int) -> list[str]:
    """Overrides that give the config ``num_tasks`` tasks (extra ones binary, named y3, y4, ...)."""
    have = list(cfg.data.tasks)
    if num_tasks < len(have):
        return [f"~data.tasks.{name}" for name in have[num_tasks:]]
    return [f"+data.tasks.y{i + 1}={{kind: binary}}" for i in range(len(have), num_tasks)]


def report(ms: dict[tuple[int, str], float], methods: list[str], task_counts: list[int], title: str) -> None:
    table = Table(title=title)
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


def run(overrides: list[str], methods_list: str | None, tasks: str, epochs: int, repeats: int) -> dict:
    """Per-step training time of each loss method relative to ``equal``, per task count (``tasks``: "2,4")."""
    methods = methods_list.split(",") if methods_list else sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))
    methods = ["equal", *[m for m in methods if m != "equal"]]
    task_counts = [int(t) for t in tasks.split(",")]
    base = compose_config(overrides)
    setups = {}
    for t in task_counts:
        for method in methods:
            cfg = compose_config([*overrides, *task_overrides(base, t), f"loss={method}"])
            setups[(t, method)] = (cfg, load_data(cfg))
    for cfg, datamodule in setups.values():  # warm-up, untimed
        step_ms(cfg, datamodule, 1)
    runs = {key: (lambda setup=setup: step_ms(*setup, epochs)) for key, setup in setups.items()}
    ms = medians(interleaved(runs, repeats))
    report(ms, methods, task_counts, f"step time per loss method ({epochs} epoch(s) x {repeats} round(s), median)")
    return {
        "overrides": overrides,
        "epochs": epochs,
        "repeats": repeats,
        "num_threads": torch.get_num_threads(),
        "ms_per_step": {f"{m}@T{t}": v for (t, m), v in ms.items()},
        "ratio_to_equal": {f"{m}@T{t}": v / ms[(t, "equal")] for (t, m), v in ms.items()},
    }
