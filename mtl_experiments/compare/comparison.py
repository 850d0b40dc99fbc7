"""The comparison: groups of runs with their labels, per-task test metrics in display order, Δm% against
the single-task baseline of the same data, conflict summaries, and the table of raw numbers (the CSV)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mtl_experiments.compare.groups import MAIN_CHOICES, Group, data_key, drop_duplicates, group_runs, varying_columns
from mtl_experiments.compare.runs import RunData, Selection
from mtl_experiments.compare.stats import delta_m, direction, mean_std, metric_order
from mtl_experiments.errors import ConfigError

BASELINE_LOSS = "equal"
NO_BASELINE = "n/a: no single_task runs of this data"


@dataclass
class Comparison:
    """Groups with their statistics; ``table`` holds the raw numbers (the CSV)."""

    selection: Selection
    groups: list[Group]
    metric_keys: list[str]  # "<task>/<metric>", display order
    directions: dict[str, bool | None]
    choice_columns: list[str]
    param_columns: list[str]
    conflict_keys: list[str]  # every "conflict/mean/..." summary present
    conflict_pairs: list[str]  # "<a>-<b>"
    metrics_filter: list[str] | None
    notes: list[str]
    table: pd.DataFrame
    warnings: list[str] = field(default_factory=list)  # repeated config + seed runs counted once

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(k.split("/", 1)[0] for k in self.metric_keys))


def primary_metric(runs: Iterable[RunData]) -> str | None:
    """The metric name the runs selected their checkpoint on (``optimized_metric`` ``val/mean_auroc`` or
    ``val/y1/auroc`` -> ``auroc``), the most common one if they differ; None for ``val/loss``."""
    names = Counter()
    for run in runs:
        parts = run.params.get("optimized_metric", "").split("/")
        if len(parts) == 2 and parts[1].startswith("mean_"):
            names[parts[1][len("mean_") :]] += 1
        elif len(parts) == 3:
            names[parts[2]] += 1
    return names.most_common(1)[0][0] if names else None


def _metric_keys(runs: Sequence[RunData]) -> tuple[list[str], dict[str, bool | None]]:
    """The test metric keys in task order (by name) and each kind's metric order, and their directions."""
    directions: dict[str, bool | None] = {}
    order: dict[str, list[str]] = {}
    for run in runs:
        for key in run.test_metrics():
            if key not in directions:
                directions[key] = direction(run.params, key)
            task = key.split("/", 1)[0]
            order.setdefault(task, metric_order(run.params, task))

    primary = primary_metric(runs)

    def position(key: str) -> tuple[str, int, str]:
        # the model-selection metric first, then the kind's metrics (torchmetrics sorts them by name)
        task, metric = key.split("/", 1)
        kind_order = order[task]
        rank = 0 if metric == primary else 1 + (kind_order.index(metric) if metric in kind_order else len(kind_order))
        return task, rank, metric

    return sorted(directions, key=position), directions


# the conflict summaries shown per pair: the headline that tracks task relatedness (metrics.conflict.HEADLINE, not
# imported: it would load torch into mtl-compare; tests/compare pins them equal), the per-step cosine and rate
CONFLICT_COLUMNS = (("initial_output_cosine", "cos₀"), ("cosine", "cos"), ("rate", "conflict"))


def _conflict_keys(runs: Sequence[RunData]) -> tuple[list[str], list[str]]:
    """(every ``conflict/mean/...`` summary logged, the ``<a>-<b>`` pairs with a cosine or rate)."""
    keys = sorted({k for r in runs for k in r.metrics if k.startswith("conflict/mean/")})
    shown = tuple(f"conflict/mean/{kind}/" for kind, _ in CONFLICT_COLUMNS)
    pairs = sorted({k.rsplit("/", 1)[1] for k in keys if k.startswith(shown)})
    return keys, pairs


def _select_baseline(group: Group, candidates: Sequence[Group]) -> Group | None:
    """Single-task group of the same data config: loss=equal first, then the closest other config
    (most equal non-data, non-backbone, non-loss params), then the most seeds."""
    own = {k: v for k, v in group.params.items() if not k.startswith(("data.", "backbone.", "loss."))}

    def rank(c: Group):
        shared = sum(1 for k, v in c.params.items() if own.get(k) == v)
        return (c.choices.get("loss") == BASELINE_LOSS, shared, len(c.runs), c.label)

    matching = [c for c in candidates if data_key(c.params) == data_key(group.params)]
    return max(matching, key=rank) if matching else None


def _labels(group: Group, choice_cols: list[str], param_cols: list[str], data_varies: bool) -> tuple[str, str]:
    """(method part, data part) of a group's label, from the columns that vary across groups."""
    choices = group.choices
    method = [f"{choices.get('backbone', '?')}/{choices.get('loss', '?')}"]
    method += [f"{k}={choices.get(k)}" for k in choice_cols if k not in MAIN_CHOICES]
    method += [f"{k}={group.params.get(k)}" for k in param_cols if not k.startswith("data.")]
    data = [f"data={group.shown('data') or '?'}"] if data_varies else []
    data += [f"{k}={group.params.get(k)}" for k in param_cols if k.startswith("data.")]
    return " ".join(method), " ".join(data)


def _set_delta_m(g: Group, keys: list[str], stl: Sequence[Group], directions: dict[str, bool | None]) -> None:
    """``g``'s Δm% per run over ``keys`` against its single-task baseline, or the note why there is none."""
    g.delta_m_keys = keys
    g.baseline = _select_baseline(g, stl)
    if g.baseline is None:
        g.delta_m_note = NO_BASELINE
        return
    if not keys:
        g.delta_m_note = "n/a: no test metric selected for Δm"
        return
    missing = [k for k in keys if not g.baseline.values(f"test/{k}")]
    if missing:
        g.delta_m_note = f"n/a: the single_task runs lack {', '.join(missing)}"
        return
    base = {k: mean_std(g.baseline.values(f"test/{k}"))[0] for k in keys}
    dirs = {k: bool(directions[k]) for k in keys}
    g.delta_m_values = [delta_m(r.test_metrics(), base, dirs) for r in g.runs]
    g.delta_m_note = "baseline itself" if g.baseline is g else f"vs {g.baseline.label} (n={len(g.baseline.runs)})"


def _delta_m_keys(g: Group, metric_keys: list[str], directions: dict, wanted: set[str] | None) -> list[str]:
    """The K metrics of ``g``'s Δm: those every run reports, with a known direction, matching ``wanted``."""
    own_keys = [k for k in metric_keys if all(f"test/{k}" in r.metrics for r in g.runs)]
    return [
        k
        for k in own_keys
        if directions[k] is not None and (wanted is None or k in wanted or k.split("/", 1)[1] in wanted)
    ]


def _row(g: Group, c: Comparison) -> dict[str, Any]:
    """The CSV row of one group: its columns, mean/std/n per test metric, Δm% and the conflict summaries."""
    row: dict[str, Any] = {"group": g.label}
    row.update({col: g.shown(col) for col in c.choice_columns})
    row.update({p: g.params.get(p) for p in c.param_columns})
    row.update(n=len(g.runs), seeds=",".join(g.seeds), run_ids=",".join(r.run_id for r in g.runs))
    for k in c.metric_keys:
        mean, std, n = g.stat(f"test/{k}")
        row.update({f"test/{k}_mean": mean, f"test/{k}_std": std, f"test/{k}_n": n})
    dm_mean, dm_std = mean_std(g.delta_m_values)
    row.update(
        {
            "delta_m_pct_mean": dm_mean,
            "delta_m_pct_std": dm_std,
            "delta_m_metrics": ",".join(g.delta_m_keys),
            "delta_m_baseline": g.delta_m_note,
        }
    )
    for k in c.conflict_keys:
        mean, std, _ = g.stat(k)
        row.update({f"{k}_mean": mean, f"{k}_std": std})
    return row


def check_metrics(wanted: set[str] | None, metric_keys: Sequence[str]) -> None:
    """Every ``--metrics`` entry names a test metric the runs report (``auroc`` or ``y1/auroc``): a typo must not
    silently leave Δm unavailable."""
    names = sorted({k.split("/", 1)[1] for k in metric_keys})
    unknown = sorted(w for w in wanted or () if w not in metric_keys and w not in names)
    if unknown:
        raise ConfigError(
            f"--metrics must name test metrics the runs report, got {', '.join(unknown)} (choose from "
            f"{', '.join(names)}, or per task {', '.join(metric_keys)})."
        )


def compare(selection: Selection, metrics: Sequence[str] | None = None) -> Comparison:
    """Group ``selection``'s runs by configuration and compute every statistic of the table.

    ``metrics`` (metric names such as ``auroc``, or ``<task>/<metric>``) restricts the K metrics Δm
    averages over; by default all test metrics of a group with a known direction."""
    runs, repeats = drop_duplicates(selection.runs)
    groups = group_runs(runs)
    notes: list[str] = []
    if not groups:
        raise ConfigError("No FINISHED runs with test metrics match the selection; nothing to compare.")
    metric_keys, directions = _metric_keys(runs)
    wanted = set(metrics) if metrics else None
    check_metrics(wanted, metric_keys)
    unknown = [k for k in metric_keys if directions[k] is None]
    if unknown:
        notes.append(f"Left out of Δm (no higher_is_better known for their task kind): {', '.join(unknown)}.")
    conflict_keys, conflict_pairs = _conflict_keys(runs)

    choice_cols, param_cols = varying_columns(groups)
    data_varies = len({g.choices.get("data") for g in groups}) > 1
    for g in groups:
        g.short_label, g.data_label = _labels(g, choice_cols, param_cols, data_varies)
        g.label = f"{g.short_label} {g.data_label}".strip()
    groups.sort(key=lambda g: (str(sorted(data_key(g.params))), not g.is_single_task, g.label))

    # Δm against the single-task baseline of the same data
    stl = [g for g in groups if g.is_single_task]
    for g in groups:
        _set_delta_m(g, _delta_m_keys(g, metric_keys, directions, wanted), stl, directions)

    c = Comparison(
        selection=selection,
        groups=groups,
        metric_keys=metric_keys,
        directions=directions,
        choice_columns=choice_cols,
        param_columns=param_cols,
        conflict_keys=conflict_keys,
        conflict_pairs=conflict_pairs,
        metrics_filter=list(metrics) if metrics else None,
        notes=notes,
        table=pd.DataFrame(),
        warnings=repeats,
    )
    c.table = pd.DataFrame([_row(g, c) for g in groups])
    return c
