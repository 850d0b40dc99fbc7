"""The tuned-scalarization front: static-weight runs (``loss=fixed``, e.g. ``hparams_search=scalarization``)
against which every other method of the same data is placed (``mtl-compare --front``).

Xin et al. ("Do Current Multi-Task Optimization Methods in Deep Learning Even Help?", NeurIPS 2022) and Kurin
et al. ("In Defense of the Unitary Scalarization for Deep Multi-Task Learning", NeurIPS 2022) show that a sweep
of static weights traces a front that most adaptive methods do not cross. Every number here is a test metric of
the checkpoint each run selected on validation (the pipeline tests its best-by-validation checkpoint).

- **Front**: the static-weight groups (runs differing only by seed) whose mean test metrics over the K metrics
  (those of Δm) no other static group weakly dominates.
- **Best static weights**: the static group with the best mean validation ``val_best/<metric>`` (chosen
  on validation, never on test); ``Δm% vs best static`` = Maninis et al.'s Δm with it as the reference.
- **Distance to the front** (signed, in % of the best static weights' values): in units
  ``u_k(x) = 100·s_k·x_k / |b_k|`` (s_k = +1 if higher is better, else −1; b the best static weights),
  ``d(m) = min_{f ∈ F} max_k (u_k(m) − u_k(f))``, the additive ε-indicator I_ε+(F, {m}) of Zitzler et al.
  ("Performance Assessment of Multiobjective Optimizers", IEEE TEC 2003) with the sign turned so that
  **positive = beyond the front** (every static group is behind m by ≥ d on some metric: the front would have to
  gain d on every metric to reach m) and **negative = behind it** (a static group is better by ≥ |d| on every
  metric). Front members have d = 0.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mtl_experiments.compare.comparison import Comparison, compare
from mtl_experiments.compare.groups import Group, data_key
from mtl_experiments.compare.runs import RunData, Selection, load_runs
from mtl_experiments.compare.stats import delta_m, mean_std
from mtl_experiments.errors import ConfigError
from mtl_experiments.summary_names import best_key, old_best_key

FRONT_LOSS = "fixed"  # the static-weight runs: loss=fixed (hparams_search=scalarization or fixed_weights)
RUN_ID = re.compile(r"[0-9a-f]{32}")
ROLES = ("front", "method", "single-task")


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``points`` [N, K] (higher is better everywhere) that no other row weakly dominates
    (≥ on every column and > on one). Rows with a NaN are never on the front."""
    points = np.asarray(points, dtype=np.float64)
    ok = ~np.isnan(points).any(axis=1)
    mask = np.zeros(len(points), dtype=bool)
    for i in np.flatnonzero(ok):
        others = points[ok & (np.arange(len(points)) != i)]
        dominated = ((others >= points[i]).all(axis=1) & (others > points[i]).any(axis=1)).any()
        mask[i] = not dominated
    return mask


def front_distance(point: Sequence[float], front: np.ndarray) -> float:
    """``d(m) = min_f max_k (m_k − f_k)`` over the rows ``f`` of ``front`` (higher is better everywhere):
    ≤ 0 iff some row weakly dominates ``m`` (−d: by how much on every metric), > 0 iff none does (the front
    must gain d on every metric to weakly dominate ``m``). Zitzler et al. 2003's I_ε+(F, {m}). NaN with no
    usable row or a NaN in ``point``."""
    m = np.asarray(point, dtype=np.float64)
    f = np.asarray(front, dtype=np.float64).reshape(-1, m.size)
    f = f[~np.isnan(f).any(axis=1)]
    if not len(f) or np.isnan(m).any():
        return math.nan
    return float((m[None, :] - f).max(axis=1).min())


def units(values: Mapping[str, float], reference: Mapping[str, float], hib: Mapping[str, bool]) -> np.ndarray:
    """``u_k = 100·s_k·x_k / |b_k|`` over the keys of ``hib`` (NaN where a value is missing or b_k = 0): differences
    of u are per-metric relative changes in % of the reference, higher always better."""
    out = []
    for key, up in hib.items():
        base, x = reference.get(key, math.nan), values.get(key, math.nan)
        out.append(math.nan if base == 0 or math.isnan(base) else (1.0 if up else -1.0) * 100.0 * x / abs(base))
    return np.array(out)


@dataclass
class Entry:
    """One group placed against the front."""

    group: Group
    role: str  # front | method | single-task
    label: str
    weights: dict[str, float]  # mean train/weight/<task> (the static weights; a method's last weights)
    selection: float  # mean val_best/<metric> (validation)
    on_front: bool = False
    distance: float = math.nan  # d of the group's mean point
    distance_runs: list[float] = field(default_factory=list)  # d of each run's point
    dm_best: list[float] = field(default_factory=list)  # Δm% of each run vs the best static weights


@dataclass
class Front:
    """The static-weight front and every other group of its data placed on it."""

    comparison: Comparison
    keys: list[str]  # the K metrics "<task>/<metric>" of the front, Δm and the distance
    directions: dict[str, bool]
    selection_metric: str
    best: Entry
    entries: list[Entry]
    notes: list[str] = field(default_factory=list)

    def role(self, role: str) -> list[Entry]:
        return [e for e in self.entries if e.role == role]


def group_means(g: Group, keys: Sequence[str]) -> dict[str, float]:
    return {k: mean_std(g.values(f"test/{k}"))[0] for k in keys}


def _weights(g: Group, tasks: Sequence[str]) -> dict[str, float]:
    found = {t: mean_std(g.values(f"train/weight/{t}"))[0] for t in tasks}
    return {t: w for t, w in found.items() if not math.isnan(w)}


def weights_label(weights: Mapping[str, float]) -> str:
    return "w=(" + ", ".join(f"{w:.2f}" for w in weights.values()) + ")" if weights else "w=?"


def method_label(g: Group) -> str:
    """The group's label without the columns only the static runs set (``hparams_search=None``, ...)."""
    return " ".join(part for part in g.short_label.split() if not part.endswith(("=None", "=")))


def _selection(g: Group, metric: str) -> float:
    return mean_std(g.values(best_key(metric)) or g.values(old_best_key(metric)))[0]


def _selection_metric(front_groups: Sequence[Group]) -> tuple[str, bool]:
    """(``optimized_metric``, higher is better) the static runs selected their checkpoints on; one for all."""
    found = {
        (r.params.get("optimized_metric", ""), r.params.get("optimized_mode", "")) for g in front_groups for r in g.runs
    }
    if len(found) != 1:
        raise ConfigError(
            f"--front's static-weight runs must share one optimized_metric to pick the best weights on validation, "
            f"got {sorted(found)} (select one setting with --tag or --experiment)."
        )
    metric, mode = found.pop()
    if mode not in ("max", "min"):
        raise ConfigError(f"optimized_mode of the static-weight runs must be logged as max or min, got {mode!r}.")
    return metric, mode == "max"


def _front_keys(front_groups: Sequence[Group]) -> list[str]:
    """The K metrics every static group's Δm uses (in display order)."""
    keys = list(front_groups[0].delta_m_keys)
    keys = [k for k in keys if all(k in g.delta_m_keys for g in front_groups)]
    if not keys:
        raise ConfigError(
            "The static-weight runs share no test metric with a known direction; check --metrics (e.g. auroc)."
        )
    return keys


def _split_groups(c: Comparison, front_ids: set[str]) -> tuple[list[Group], list[Group], list[Group], list[str]]:
    """(static-weight groups, method groups, single-task groups, notes); only the front's data config."""
    static = [g for g in c.groups if all(r.run_id in front_ids for r in g.runs)]
    if not static:
        raise ConfigError(
            f"--front found no FINISHED static-weight runs (loss={FRONT_LOSS}); run "
            "`python train.py -m hparams_search=scalarization` first, or name its sweep / experiment."
        )
    data = {data_key(g.params) for g in static}
    if len(data) > 1:
        names = sorted({g.choices.get("data", "?") for g in static})
        raise ConfigError(
            f"--front's static-weight runs must share one data config, got {len(data)} ({', '.join(names)}); "
            "select one with --experiment or --tag data=<name>."
        )
    same = [g for g in c.groups if data_key(g.params) in data and g not in static]
    others = len(c.groups) - len(static) - len(same)
    notes = [f"{others} group(s) of another data config left out."] if others else []
    stl = [g for g in same if g.is_single_task]
    methods = [g for g in same if not g.is_single_task and g.choices.get("loss") != FRONT_LOSS]
    extra = [g for g in same if g not in stl and g not in methods]
    if extra:
        notes.append(f"{len(extra)} other loss={FRONT_LOSS} group(s) outside --front shown as methods.")
    return static, methods + extra, stl, notes


def _place(e: Entry, keys: list[str], hib: dict[str, bool], best: dict[str, float], front_u: np.ndarray) -> None:
    """``e``'s distance to the front (its mean point and each run) and Δm% of each run vs the best weights."""
    e.distance = front_distance(units(group_means(e.group, keys), best, hib), front_u)
    for run in e.group.runs:
        metrics = run.test_metrics()
        e.distance_runs.append(front_distance(units(metrics, best, hib), front_u))
        if all(k in metrics for k in keys):
            e.dm_best.append(delta_m(metrics, best, hib))


def build_front(c: Comparison, front_ids: set[str]) -> Front:
    """Place every group of ``c`` against the front of the static-weight runs ``front_ids``."""
    static, methods, stl, notes = _split_groups(c, front_ids)
    keys = _front_keys(static)
    hib = {k: bool(c.directions[k]) for k in keys}
    metric, higher = _selection_metric(static)
    tasks = c.tasks

    def entry(g: Group, role: str) -> Entry:
        w = _weights(g, tasks)
        label = weights_label(w) if role == "front" else method_label(g)
        return Entry(g, role, label, w, _selection(g, metric))

    entries = [entry(g, "front") for g in static]
    scored = [e for e in entries if not math.isnan(e.selection)]
    if not scored:
        raise ConfigError(
            f"No static-weight run logged {best_key(metric)}; the best weights cannot be chosen on validation."
        )
    best = max(scored, key=lambda e: e.selection if higher else -e.selection)
    ref = group_means(best.group, keys)
    front_u = np.array([units(group_means(e.group, keys), ref, hib) for e in entries])
    for e, on in zip(entries, non_dominated(front_u), strict=True):
        e.on_front = bool(on)
    entries += [entry(g, "method") for g in methods] + [entry(g, "single-task") for g in stl]
    for e in entries:
        _place(e, keys, hib, ref, front_u)
    return Front(c, keys, hib, metric, best, entries, notes)


def front_selection(main: Selection, front: str | None) -> tuple[Selection, set[str]]:
    """(``main`` with the static-weight runs of ``front`` added, their run ids). ``front``: a sweep parent's run
    id, an experiment name, or empty/None for the ``loss=fixed`` runs of ``main`` itself."""
    if front:
        kwargs = {"parent": front} if RUN_ID.fullmatch(front) else {"experiment": front}
        extra = load_runs(main.tracking_uri, segment=main.segment, **kwargs)
    else:
        extra = main
    ids = {r.run_id for r in extra.runs if r.tags.get("loss") == FRONT_LOSS}
    have = {r.run_id for r in main.runs}
    runs: list[RunData] = main.runs + [r for r in extra.runs if r.run_id in ids and r.run_id not in have]
    return dataclasses.replace(main, runs=runs), ids


def front_compare(main: Selection, front: str | None, metrics: Sequence[str] | None = None) -> Front:
    """``mtl-compare --front``: the comparison of ``main`` plus the static-weight runs, placed on their front."""
    merged, ids = front_selection(main, front)
    return build_front(compare(merged, metrics=metrics), ids)
