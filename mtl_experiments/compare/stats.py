"""Statistics of the comparison: metric directions from the task kinds, mean ± std over seeds, Δm% and the
Pareto front."""

from __future__ import annotations

import functools
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any


@functools.cache
def _kind_directions(kind: str, options: tuple[tuple[str, Any], ...] = ()) -> dict[str, bool]:
    """``{metric: higher_is_better}`` as the task kind's torchmetrics declare it ({} if it cannot be built)."""
    from mtl_experiments.tasks import build_task

    try:
        task = build_task("t", {"kind": kind, **dict(options)})
        task.group_by = "user_id"  # every metric the kind can log, those that need user ids (gauc) included
        return {name: bool(m.higher_is_better) for name, m in task.metrics().items() if m.higher_is_better is not None}
    except Exception:  # noqa: BLE001 - a kind that needs options we do not have: fall back to the name map
        return {}


@functools.cache
def metric_directions() -> dict[str, bool]:
    """``{metric name: higher_is_better}`` over every task kind in ``mtl_experiments.tasks`` that builds
    without options; names two kinds disagree on are left out (they are resolved per run by kind)."""
    from mtl_experiments.tasks import available_kinds

    seen: dict[str, set[bool]] = defaultdict(set)
    for kind in available_kinds():
        for name, hib in _kind_directions(kind).items():
            seen[name].add(hib)
    return {name: next(iter(v)) for name, v in seen.items() if len(v) == 1}


def _task_options(params: Mapping[str, str], task: str) -> tuple[str | None, tuple[tuple[str, Any], ...]]:
    import yaml

    prefix = f"data.tasks.{task}."
    kind, options = None, []
    for key, value in params.items():
        if not key.startswith(prefix) or "." in key[len(prefix) :]:
            continue
        opt = key[len(prefix) :]
        if opt == "kind":
            kind = value
        elif value != "None":
            try:
                options.append((opt, yaml.safe_load(value)))
            except yaml.YAMLError:
                options.append((opt, value))
    return kind, tuple(sorted(options, key=lambda kv: kv[0]))


def direction(params: Mapping[str, str], key: str) -> bool | None:
    """Higher is better for ``<task>/<metric>`` of a run with these params: from the task's kind (and
    options) as logged in ``data.tasks.<task>.*``, else from the metric name over all kinds."""
    task, metric = key.split("/", 1)
    kind, options = _task_options(params, task)
    if kind is not None:
        dirs = _kind_directions(kind, options) or _kind_directions(kind)
        if metric in dirs:
            return dirs[metric]
    return metric_directions().get(metric)


def metric_order(params: Mapping[str, str], task: str) -> list[str]:
    """The metric names ``task``'s kind declares, in its order ([] when the run logged no kind)."""
    kind, options = _task_options(params, task)
    return list(_kind_directions(kind, options) or _kind_directions(kind)) if kind else []


def delta_m(model: Mapping[str, float], baseline: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """Δm% of ``model`` against ``baseline`` (Maninis et al., CVPR 2019), **positive = better**::

        Δm% = 100/K · Σ_k s_k · (M_m,k − M_b,k) / |M_b,k|,  s_k = +1 if higher is better else −1

    over the K keys of ``higher_is_better`` (each must be in ``model`` and ``baseline``). ``|M_b|`` equals
    the papers' ``M_b`` for the non-negative metrics used here and keeps the sign meaning for others.
    A zero baseline value gives NaN (the relative change is undefined).
    """
    if not higher_is_better:
        raise ValueError("delta_m needs at least one metric")
    total = 0.0
    for key, hib in higher_is_better.items():
        base = baseline[key]
        if base == 0:
            return math.nan
        total += (1.0 if hib else -1.0) * (model[key] - base) / abs(base)
    return 100.0 * total / len(higher_is_better)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: Sequence[bool] = (True, True)) -> list[bool]:
    """Mask of the non-dominated points: none other is at least as good on both axes and better on one."""
    signs = [1.0 if h else -1.0 for h in higher_is_better]
    scored = [(signs[0] * x, signs[1] * y) for x, y in points]
    mask = []
    for i, (x, y) in enumerate(scored):
        if math.isnan(x) or math.isnan(y):
            mask.append(False)
            continue
        dominated = any(
            qx >= x and qy >= y and (qx > x or qy > y)
            for j, (qx, qy) in enumerate(scored)
            if j != i and not (math.isnan(qx) or math.isnan(qy))
        )
        mask.append(not dominated)
    return mask
