"""Compare tracked runs across methods, backbones and seeds (``mtl-compare``, ``scripts/compare_runs.py``).

Reads runs from any MLflow tracking URI (filtered by experiment, sweep parent run or tags), keeps the
FINISHED ones (and says which it skipped and why), groups runs that differ only by seed, and reports per
group: the configuration choices that vary across groups, per-task test metrics as mean ± std over seeds
(sample std, ddof=1), Δm% against the single-task runs of the same data, and the gradient-conflict
summaries. Writes Markdown, CSV and a Pareto plot (task A vs task B test metric).

Δm% (Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; as used by
Liu et al., NeurIPS 2021 and Navon et al., ICML 2022), **signed so that positive means better than
single-task**::

    Δm% = 100/K · Σ_k s_k · (M_m,k − M_b,k) / |M_b,k|,   s_k = +1 if higher is better for metric k, else −1

over the K (task, metric) test metrics. The papers write (−1)^{l_k} with l_k = 1 when higher is better,
so their Δm is ours negated (lower is better there). M_b is the mean over seeds of the single-task runs
(``backbone=single_task``) whose data config (every ``data.*`` param except ``data.shuffle_seed``)
matches, preferring ``loss=equal``; with no such runs Δm is reported as unavailable, never invented.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mtl_experiments.errors import ConfigError, MTLError, TrackingError

# Params that follow the run's seed: runs differing only in these are repeats of one configuration.
SEED_PARAMS = frozenset({"seed", "data.shuffle_seed", "loss.seed"})
# Params that differ per run but are not configuration (output locations, a resumed checkpoint, names and
# tags the user gives runs): runs differing only in these still group together.
PER_RUN_PARAMS = frozenset(
    {
        "run_name",
        "logger.mlflow.run_name",
        "logger.mlflow.tracking_uri",
        "paths.output_dir",
        "trainer.default_root_dir",
        "callbacks.model_checkpoint.dirpath",
        "callbacks.last_checkpoint.dirpath",
        "ckpt_path",
        "resume",
    }
)
PER_RUN_PREFIXES = ("hydra.", "logger.mlflow.tags")
# Choice tags always shown; other Hydra choice tags are shown when they vary.
MAIN_CHOICES = ("data", "backbone", "loss")
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "mtl.role"
SWEEP_PARENT = "sweep_parent"
STL_BACKBONE = "single_task"
BASELINE_LOSS = "equal"
NO_BASELINE = "n/a: no single_task runs of this data"
OUTPUT_FILES = ("comparison.md", "comparison.csv", "pareto.png")


# --------------------------------------------------------------------------------------------- metrics


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


def _metric_order(params: Mapping[str, str], task: str) -> list[str]:
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


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class RunData:
    """What the comparison needs of one MLflow run (latest metric values)."""

    run_id: str
    run_name: str
    status: str
    experiment_id: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def from_mlflow(cls, run) -> RunData:
        return cls(
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            status=run.info.status,
            experiment_id=run.info.experiment_id,
            start_time=run.info.start_time or 0,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
        )

    def test_metrics(self) -> dict[str, float]:
        """``{"<task>/<metric>": value}`` from ``test/<task>/<metric>``: not ``test/mean_*`` and not the evaluation
        segments' keys (``test/cold_user/<task>/<metric>``, ``test/warm/mean_auroc``)."""
        out = {}
        for key, value in self.metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "test" and not parts[2].startswith("mean_"):
                out[f"{parts[1]}/{parts[2]}"] = value
        return out


@dataclass
class Selection:
    """The runs read from the store, and the ones skipped (reason -> run ids)."""

    tracking_uri: str
    runs: list[RunData]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    experiments: list[str] = field(default_factory=list)
    parent_id: str | None = None
    filters: list[str] = field(default_factory=list)
    segment: str | None = None  # the evaluation segment whose test metrics are compared (None: the whole split)


def _check_readable(uri: str) -> None:
    from mtl_experiments import tracking

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():  # MLflow would silently create an empty store here
            raise TrackingError(
                f"No MLflow store at {path}. Pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store "
                "your runs were tracked in, e.g. sqlite:////abs/path/mlflow.db or http://host:5000."
            )
    else:
        tracking.check_tracking_uri(uri)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def latest_sweep(client, experiment_ids: list[str]) -> str:
    """The run id of the most recently started sweep parent run (tag ``mtl.role=sweep_parent``)."""
    found = client.search_runs(
        experiment_ids,
        f"tags.`{ROLE_TAG}` = '{SWEEP_PARENT}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise ConfigError(
            f"No sweep parent run (tag {ROLE_TAG}={SWEEP_PARENT}) in the selected experiment(s); run a sweep "
            "with `python train.py -m ...` or pass --parent / --experiment instead."
        )
    return found[0].info.run_id


def load_runs(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    parent: str | None = None,
    latest: bool = False,
    tags: Mapping[str, str] | None = None,
    segment: str | None = None,
) -> Selection:
    """Runs of ``experiment`` (default: all; or the parent's), children of ``parent`` (or of the latest
    sweep) and with all ``tags``; only FINISHED runs with test metrics are kept, the rest listed by reason.
    ``segment`` (``warm``, ``cold_user``, ``cold_item``): compare on that evaluation segment's test metrics
    (``test/<segment>/<task>/<metric>``, read as ``test/<task>/<metric>``) instead of the whole test split's."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mtl_experiments.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db (made absolute)
    _check_readable(uri)
    client = MlflowClient(uri)
    try:
        if experiment:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                names = sorted(e.name for e in client.search_experiments())
                raise ConfigError(f"No experiment {experiment!r} in {uri}; it has {names}.")
            exp_ids, exp_names = [exp.experiment_id], [exp.name]
        elif parent:
            parent_run = client.get_run(parent)
            exp_ids = [parent_run.info.experiment_id]
            exp_names = [client.get_experiment(exp_ids[0]).name]
        else:
            exps = client.search_experiments()
            exp_ids, exp_names = [e.experiment_id for e in exps], [e.name for e in exps]
        if latest:
            parent = latest_sweep(client, exp_ids)
        filters = [f"tags.`{PARENT_TAG}` = {_quote(parent)}"] if parent else []
        filters += [f"tags.`{k}` = {_quote(str(v))}" for k, v in (tags or {}).items()]
        filter_string = " and ".join(filters)
        runs, token = [], None
        while True:
            page = client.search_runs(
                exp_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
            runs += [RunData.from_mlflow(r) for r in page]
            token = page.token
            if not token:
                break
    except MlflowException as e:
        raise TrackingError(f"Reading runs from {uri} failed: {e.message}") from e

    if segment:
        prefix = f"test/{segment}/"
        for run in runs:  # the segment's test metrics take the place of the whole split's
            test = {f"test/{k[len(prefix) :]}": v for k, v in run.metrics.items() if k.startswith(prefix)}
            run.metrics = {**{k: v for k, v in run.metrics.items() if not k.startswith("test/")}, **test}
    kept, skipped = [], defaultdict(list)
    for run in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
        if run.tags.get(ROLE_TAG) == SWEEP_PARENT:
            skipped["sweep parent run (holds no results)"].append(run.run_id)
        elif run.status != "FINISHED":
            skipped[f"status {run.status}"].append(run.run_id)
        elif not run.test_metrics():
            skipped[f"no test/{segment + '/' if segment else ''}<task>/<metric> metrics"].append(run.run_id)
        else:
            kept.append(run)
    return Selection(uri, kept, dict(skipped), exp_names, parent, filters, segment)


# ------------------------------------------------------------------------------------------ grouping


def config_params(params: Mapping[str, str]) -> dict[str, str]:
    """The params that define a configuration: all but the seed-following and per-run ones."""
    return {
        k: v
        for k, v in params.items()
        if k not in SEED_PARAMS and k not in PER_RUN_PARAMS and not k.startswith(PER_RUN_PREFIXES)
    }


def group_key(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(config_params(params).items()))


def data_key(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The data config: every ``data.*`` param except ``data.shuffle_seed`` (which follows the seed)."""
    return tuple(sorted((k, v) for k, v in params.items() if k.startswith("data.") and k != "data.shuffle_seed"))


def _is_choice_tag(key: str) -> bool:
    # Hydra's choices are logged as plain tags named after the config group (no dots); everything else
    # (mlflow.*, version.*, loss.<option>, mtl.*) is namespaced, and `overrides` differs per seed.
    return "." not in key and key != "overrides"


@dataclass
class Group:
    """Runs that differ only by seed."""

    key: tuple[tuple[str, str], ...]
    runs: list[RunData]
    label: str = ""  # what varies across groups: method part (short_label) + data part (data_label)
    short_label: str = ""
    data_label: str = ""
    baseline: Group | None = None
    delta_m_note: str = ""
    delta_m_keys: list[str] = field(default_factory=list)
    delta_m_values: list[float] = field(default_factory=list)

    @property
    def params(self) -> dict[str, str]:
        return dict(self.key)

    @property
    def choices(self) -> dict[str, str]:
        out: dict[str, list[str]] = defaultdict(list)
        for run in self.runs:
            for k, v in run.tags.items():
                if _is_choice_tag(k) and v not in out[k]:
                    out[k].append(v)
        return {k: "|".join(v) for k, v in out.items()}

    @property
    def seeds(self) -> list[str]:
        return sorted((r.params.get("seed", "?") for r in self.runs), key=lambda s: (len(s), s))

    @property
    def is_single_task(self) -> bool:
        backbone = self.choices.get("backbone")
        if backbone is not None:
            return backbone == STL_BACKBONE
        return f".{STL_BACKBONE}." in self.params.get("backbone._target_", "")

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]

    def stat(self, metric: str) -> tuple[float, float, int]:
        values = self.values(metric)
        return (*mean_std(values), len(values))


def group_runs(runs: Iterable[RunData]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = group_key(run.params)
        groups.setdefault(key, Group(key, []))
        groups[key].runs.append(run)
    return list(groups.values())


def varying_columns(groups: Sequence[Group]) -> tuple[list[str], list[str]]:
    """(choice tags, params) to show: ``data``/``backbone``/``loss`` and any other choice that varies; params
    that vary *within* one value of their group's choice (``loss.c`` across two CAGrad groups, or
    ``data.correlation``), not those a choice already explains (``loss.weights`` exists only for
    ``loss=fixed``); ``_target_`` params and params whose values repeat a shown column's are omitted."""
    choice_values = [g.choices for g in groups]
    keys = sorted({k for c in choice_values for k in c})
    choices = [k for k in MAIN_CHOICES if k in keys]
    choices += [k for k in keys if k not in MAIN_CHOICES and len({c.get(k) for c in choice_values}) > 1]
    params: list[str] = []
    seen_vectors = set()
    all_keys = sorted({k for g in groups for k in g.params}, key=lambda k: (k.count("."), k))
    for key in all_keys:
        if key.endswith("._target_") or key == "_target_":
            continue
        vector = tuple(g.params.get(key) for g in groups)
        if len(set(vector)) < 2 or vector in seen_vectors:
            continue
        prefix = key.split(".", 1)[0]
        if "." in key and prefix in keys:
            # shown only if it varies among groups with the same choice of its config group
            by_choice: dict[str | None, set] = defaultdict(set)
            for c, v in zip(choice_values, vector, strict=True):
                by_choice[c.get(prefix)].add(v)
            if all(len(vs) < 2 for vs in by_choice.values()):
                continue
        params.append(key)
        seen_vectors.add(vector)
    return choices, params


# ----------------------------------------------------------------------------------------- comparison


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
    data = [f"data={choices.get('data', '?')}"] if data_varies else []
    data += [f"{k}={group.params.get(k)}" for k in param_cols if k.startswith("data.")]
    return " ".join(method), " ".join(data)


def compare(selection: Selection, metrics: Sequence[str] | None = None) -> Comparison:
    """Group ``selection``'s runs by configuration and compute every statistic of the table.

    ``metrics`` (metric names such as ``auroc``, or ``<task>/<metric>``) restricts the K metrics Δm
    averages over; by default all test metrics of a group with a known direction."""
    groups = group_runs(selection.runs)
    notes: list[str] = []
    if not groups:
        raise ConfigError("No FINISHED runs with test metrics match the selection; nothing to compare.")

    # metric keys and directions, in task order (by name) and each kind's metric order
    directions: dict[str, bool | None] = {}
    order: dict[str, list[str]] = {}
    for run in selection.runs:
        for key in run.test_metrics():
            if key not in directions:
                directions[key] = direction(run.params, key)
            task = key.split("/", 1)[0]
            order.setdefault(task, _metric_order(run.params, task))

    primary = primary_metric(selection.runs)

    def position(key: str) -> tuple[str, int, str]:
        # the model-selection metric first, then the kind's metrics (torchmetrics sorts them by name)
        task, metric = key.split("/", 1)
        kind_order = order[task]
        rank = 0 if metric == primary else 1 + (kind_order.index(metric) if metric in kind_order else len(kind_order))
        return task, rank, metric

    metric_keys = sorted(directions, key=position)
    unknown = [k for k in metric_keys if directions[k] is None]
    if unknown:
        notes.append(f"Left out of Δm (no higher_is_better known for their task kind): {', '.join(unknown)}.")

    conflict_keys = sorted({k for r in selection.runs for k in r.metrics if k.startswith("conflict/mean/")})
    conflict_pairs = sorted(
        {k.rsplit("/", 1)[1] for k in conflict_keys if k.startswith(("conflict/mean/cosine/", "conflict/mean/rate/"))}
    )

    choice_cols, param_cols = varying_columns(groups)
    data_varies = len({g.choices.get("data") for g in groups}) > 1
    for g in groups:
        g.short_label, g.data_label = _labels(g, choice_cols, param_cols, data_varies)
        g.label = f"{g.short_label} {g.data_label}".strip()
    groups.sort(key=lambda g: (str(sorted(data_key(g.params))), not g.is_single_task, g.label))

    # Δm against the single-task baseline of the same data
    wanted = set(metrics) if metrics else None
    stl = [g for g in groups if g.is_single_task]
    for g in groups:
        own_keys = [k for k in metric_keys if all(f"test/{k}" in r.metrics for r in g.runs)]
        keys = [
            k
            for k in own_keys
            if directions[k] is not None and (wanted is None or k in wanted or k.split("/", 1)[1] in wanted)
        ]
        g.delta_m_keys = keys
        g.baseline = _select_baseline(g, stl)
        if g.baseline is None:
            g.delta_m_note = NO_BASELINE
            continue
        if not keys:
            g.delta_m_note = "n/a: no test metric selected for Δm"
            continue
        missing = [k for k in keys if not g.baseline.values(f"test/{k}")]
        if missing:
            g.delta_m_note = f"n/a: the single_task runs lack {', '.join(missing)}"
            continue
        base = {k: mean_std(g.baseline.values(f"test/{k}"))[0] for k in keys}
        dirs = {k: bool(directions[k]) for k in keys}
        g.delta_m_values = [delta_m(r.test_metrics(), base, dirs) for r in g.runs]
        g.delta_m_note = "baseline itself" if g.baseline is g else f"vs {g.baseline.label} (n={len(g.baseline.runs)})"
    if wanted:
        unmatched = sorted(w for w in wanted if not any(w in (k, k.split("/", 1)[1]) for k in metric_keys))
        if unmatched:
            notes.append(f"--metrics entries matching no test metric: {', '.join(unmatched)}.")

    rows = []
    for g in groups:
        row: dict[str, Any] = {"group": g.label}
        row.update({c: g.choices.get(c) for c in choice_cols})
        row.update({p: g.params.get(p) for p in param_cols})
        row.update(n=len(g.runs), seeds=",".join(g.seeds), run_ids=",".join(r.run_id for r in g.runs))
        for k in metric_keys:
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
        for k in conflict_keys:
            mean, std, _ = g.stat(k)
            row.update({f"{k}_mean": mean, f"{k}_std": std})
        rows.append(row)
    return Comparison(
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
        table=pd.DataFrame(rows),
    )


# --------------------------------------------------------------------------------------------- output


def _fmt(mean: float, std: float, digits: int = 4, sign: bool = False) -> str:
    if math.isnan(mean):
        return ""
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{mean:{spec}}" if math.isnan(std) else f"{mean:{spec}} ± {std:.{digits}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(s: Any) -> str:
        return str("" if s is None else s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _arrow(hib: bool | None) -> str:
    return {True: " ↑", False: " ↓"}.get(hib, "")


def skipped_summary(selection: Selection) -> str:
    if not selection.skipped:
        return "skipped none"
    parts = []
    for reason, ids in sorted(selection.skipped.items()):
        shown = ", ".join(i[:8] for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
        parts.append(f"{len(ids)} {reason} ({shown})")
    return f"skipped {sum(len(v) for v in selection.skipped.values())}: " + "; ".join(parts)


def to_markdown(c: Comparison) -> str:
    """The comparison as a Markdown document: a header saying what was read and how Δm is defined, then
    one row per group."""
    sel = c.selection
    where = [f"store `{sel.tracking_uri}`", f"experiment(s) {', '.join(sel.experiments) or '-'}"]
    if sel.parent_id:
        where.append(f"parent run `{sel.parent_id}`")
    if sel.filters and not sel.parent_id:
        where.append(f"filter `{' and '.join(sel.filters)}`")
    if sel.segment:
        where.append(f"test metrics of the `{sel.segment}` segment only")
    k_sets = {tuple(g.delta_m_keys) for g in c.groups if g.delta_m_values}
    k_text = (
        f"over K = {len(next(iter(k_sets)))} metrics ({', '.join(next(iter(k_sets)))})"
        if len(k_sets) == 1
        else "over the K test metrics each group reports (CSV column delta_m_metrics)"
    )
    lines = [
        "# Run comparison",
        "",
        f"Read {'; '.join(where)}.",
        f"{len(sel.runs)} FINISHED run(s) in {len(c.groups)} group(s) of runs that differ only by seed; "
        f"{skipped_summary(sel)}.",
        "",
        "Test metrics: mean ± std over seeds (sample std, ddof=1; no ± when n = 1); ↑ higher is better, "
        "↓ lower is better.",
        f"Δm% (Maninis et al., CVPR 2019) = 100/K · Σ_k s_k (M_k − M_stl,k) / |M_stl,k|, s_k = +1 if higher is "
        f"better else −1, {k_text}, against the mean over seeds of the `backbone={STL_BACKBONE}` runs of the "
        f"same data config (preferring `loss={BASELINE_LOSS}`). **Positive Δm% = better than single-task** "
        "(the papers' Δm, where lower is better, negated).",
    ]
    if c.conflict_pairs:
        lines.append(
            "cos a-b: mean pairwise gradient cosine over training (`conflict/mean/cosine/<a>-<b>`); "
            "conflict a-b: share of measured steps with cosine < 0 (`conflict/mean/rate/<a>-<b>`)."
        )
    lines += [f"Note: {n}" for n in c.notes]
    header = [*c.choice_columns, *c.param_columns, "n", "seeds"]
    header += [f"{k}{_arrow(c.directions[k])}" for k in c.metric_keys]
    header += ["Δm% ↑", "Δm baseline"]
    pair_cols = []
    for pair in c.conflict_pairs:
        for kind, title in (("cosine", "cos"), ("rate", "conflict")):
            if f"conflict/mean/{kind}/{pair}" in c.conflict_keys:
                pair_cols.append(f"conflict/mean/{kind}/{pair}")
                header.append(f"{title} {pair}")
    rows = []
    for g in c.groups:
        row = [g.choices.get(col, "") for col in c.choice_columns]
        row += [g.params.get(p, "") for p in c.param_columns]
        row += [str(len(g.runs)), ",".join(g.seeds)]
        for k in c.metric_keys:
            mean, std, n = g.stat(f"test/{k}")
            cell = _fmt(mean, std)
            row.append(f"{cell} (n={n})" if cell and n != len(g.runs) else cell)
        if g.delta_m_values:
            row.append(_fmt(*mean_std(g.delta_m_values), digits=2, sign=True))
            row.append(g.delta_m_note)
        else:
            row += ["", g.delta_m_note]
        for key in pair_cols:
            mean, std, _ = g.stat(key)
            row.append(_fmt(mean, std, digits=3))
        rows.append(row)
    return "\n".join(lines) + "\n\n" + _md_table(header, rows) + "\n"


def default_pareto_metrics(c: Comparison) -> tuple[str, str]:
    """The first metric of each of the first two tasks (by name): the model-selection metric
    (``optimized_metric``, e.g. auroc) where the task reports it, else the first its kind declares."""
    tasks = c.tasks
    if len(tasks) < 2:
        raise ConfigError(f"A Pareto plot needs two tasks; the runs report test metrics of {tasks} only.")
    return tuple(next(k for k in c.metric_keys if k.startswith(f"{t}/")) for t in tasks[:2])  # type: ignore[return-value]


def _pareto_keys(c: Comparison, metrics: Sequence[str] | None) -> tuple[str, str]:
    if not metrics:
        return default_pareto_metrics(c)
    if len(metrics) != 2 or any(m not in c.metric_keys for m in metrics):
        raise ConfigError(f"--pareto takes two of {c.metric_keys} separated by a comma, e.g. y1/auroc,y2/auroc.")
    return metrics[0], metrics[1]


def pareto_plot(c: Comparison, metrics: Sequence[str] | None = None):
    """Task A vs task B test metric, one point per group with std-over-seeds error bars; the
    non-dominated groups (per data config, directions from higher_is_better) ringed and connected."""
    from matplotlib.figure import Figure  # no pyplot: works headless and inside notebooks alike

    x_key, y_key = _pareto_keys(c, metrics)
    hib = (c.directions[x_key] is not False, c.directions[y_key] is not False)
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    by_data: dict[tuple, list[Group]] = defaultdict(list)
    for g in c.groups:
        by_data[data_key(g.params)].append(g)
    for i, (_, groups) in enumerate(by_data.items()):
        color = f"C{i % 10}"
        stats = [(g.stat(f"test/{x_key}"), g.stat(f"test/{y_key}")) for g in groups]
        points = [(sx[0], sy[0]) for sx, sy in stats]
        front = pareto_front(points, hib)
        data_label = groups[0].data_label or groups[0].choices.get("data", "data")
        for g, (sx, sy), on_front in zip(groups, stats, front, strict=True):
            if math.isnan(sx[0]) or math.isnan(sy[0]):
                continue
            ax.errorbar(
                sx[0],
                sy[0],
                xerr=0 if math.isnan(sx[1]) else sx[1],
                yerr=0 if math.isnan(sy[1]) else sy[1],
                fmt="o" if on_front else "s",
                color=color,
                alpha=1.0 if on_front else 0.45,
                capsize=3,
                markersize=8 if on_front else 5,
            )
            # the data part is in the legend (one colour per data config), so points carry the method only
            ax.annotate(g.short_label, (sx[0], sy[0]), textcoords="offset points", xytext=(5, 5), fontsize=7)
        pts = sorted(p for p, f in zip(points, front, strict=True) if f)
        if pts:
            ax.plot(*zip(*pts, strict=True), "-", color=color, lw=1.5, label=f"Pareto front ({data_label})")
    ax.set_xlabel(f"test {x_key} ({'higher' if hib[0] else 'lower'} is better)")
    ax.set_ylabel(f"test {y_key} ({'higher' if hib[1] else 'lower'} is better)")
    ax.set_title("Groups (mean ± std over seeds); front: non-dominated groups")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def write_outputs(c: Comparison, out_dir: str | Path, pareto: Sequence[str] | None = None) -> list[Path]:
    """``comparison.md``, ``comparison.csv`` and (with two tasks) ``pareto.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv, png = (out / name for name in OUTPUT_FILES)
    md.write_text(to_markdown(c))
    c.table.to_csv(csv, index=False)
    written = [md, csv]
    if len(c.tasks) >= 2 or pareto:
        pareto_plot(c, pareto).savefig(png, dpi=120)
        written.append(png)
    else:
        print(f"No Pareto plot: the runs report test metrics of one task only ({c.tasks}).", file=sys.stderr)
    return written


def log_to_parent(c: Comparison, files: Sequence[Path], artifact_path: str = "comparison") -> None:
    """Log the output files as artifacts of the sweep's parent run."""
    from mlflow.tracking import MlflowClient

    if not c.selection.parent_id:
        raise ConfigError("--log-to-parent needs --parent RUN_ID or --latest-sweep.")
    client = MlflowClient(c.selection.tracking_uri)
    for path in files:
        client.log_artifact(c.selection.parent_id, str(path), artifact_path)


# ------------------------------------------------------------------------------------------- notebook


def metric_histories(c: Comparison, prefix: str) -> pd.DataFrame:
    """Every logged step of the metrics starting with ``prefix`` (e.g. ``train/weight/``) for all runs:
    columns ``group, run_id, seed, key, name, step, value`` (``name`` is the key without the prefix)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(c.selection.tracking_uri)
    rows = []
    for g in c.groups:
        for run in g.runs:
            for key in sorted(k for k in run.metrics if k.startswith(prefix)):
                for m in client.get_metric_history(run.run_id, key):
                    rows.append((g.label, run.run_id, run.params.get("seed"), key, key[len(prefix) :], m.step, m.value))
    return pd.DataFrame(rows, columns=["group", "run_id", "seed", "key", "name", "step", "value"])


def plot_histories(history: pd.DataFrame, ylabel: str, title: str = ""):
    """One panel per group, one colour per metric, one line per seed (``metric_histories`` output)."""
    from matplotlib.figure import Figure

    if history.empty:
        return None
    groups = list(dict.fromkeys(history["group"]))
    names = list(dict.fromkeys(history["name"]))
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, group in zip(axes.flat, groups, strict=False):
        sub = history[history["group"] == group]
        for i, name in enumerate(names):
            for j, (_, line) in enumerate(sub[sub["name"] == name].groupby("run_id", sort=False)):
                line = line.sort_values("step")
                ax.plot(line["step"], line["value"], color=f"C{i % 10}", alpha=0.8, label=name if j == 0 else None)
        ax.set_title(group, fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------ CLI


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--tag takes key=value, got {text!r}")
    return key, value


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl-compare",
        description=(
            "Compare tracked runs: group runs that differ only by seed; per-task test metrics as mean ± std, "
            "Δm%% against single-task runs of the same data (positive = better), conflict summaries; "
            "Markdown to stdout, optionally Markdown/CSV/Pareto plot files."
        ),
    )
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--experiment", help="experiment name (default: all experiments, or the parent run's)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--parent", metavar="RUN_ID", help="only the child runs of this parent (sweep) run")
    sweep.add_argument(
        "--latest-sweep", action="store_true", help=f"only the children of the latest {ROLE_TAG}={SWEEP_PARENT} run"
    )
    p.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE", help="tag filter (repeat)")
    p.add_argument(
        "--segment",
        help="compare on an evaluation segment's test metrics (warm, cold_user, cold_item) instead of the whole split",
    )
    p.add_argument("--metrics", type=_csv, help="metrics Δm averages over, e.g. auroc,mse or y1/auroc (default: all)")
    p.add_argument("--pareto", type=_csv, help="x,y test metrics of the Pareto plot (default: first metric of 2 tasks)")
    p.add_argument("--out", type=Path, help="write comparison.md, comparison.csv and pareto.png here")
    p.add_argument("--log-to-parent", action="store_true", help="log the files as artifacts of the parent run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mtl-compare`` / ``python scripts/compare_runs.py``; returns the exit code (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_to_parent and not (args.parent or args.latest_sweep):
        parser.error("--log-to-parent needs --parent RUN_ID or --latest-sweep")
    try:
        selection = load_runs(
            args.tracking_uri,
            experiment=args.experiment,
            parent=args.parent,
            latest=args.latest_sweep,
            tags=dict(args.tag),
            segment=args.segment,
        )
        if not selection.runs:
            raise ConfigError(f"No FINISHED runs with test metrics match the selection ({skipped_summary(selection)}).")
        result = compare(selection, metrics=args.metrics)
        if args.pareto:
            _pareto_keys(result, args.pareto)  # fail on a bad --pareto before writing anything
        print(to_markdown(result))
        with tempfile.TemporaryDirectory() as tmp:  # --log-to-parent without --out: files only in MLflow
            if args.out or args.log_to_parent:
                files = write_outputs(result, args.out or tmp, args.pareto)
                if args.out:
                    print(f"Wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
                if args.log_to_parent:
                    log_to_parent(result, files)
                    where = f"parent run {selection.parent_id}, artifact folder comparison/"
                    print(f"Logged {len(files)} files to {where}", file=sys.stderr)
    except MTLError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
