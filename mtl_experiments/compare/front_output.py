"""Output of ``mtl-compare --front``: the Markdown report (the front, then every method and the single-task runs
placed on it), the CSV (one row per group) and the plot (two test metrics: the static weights, their front, each
method's mean ± std)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtl_experiments.compare.front import Entry, Front, front_compare, non_dominated
from mtl_experiments.compare.output import pareto_keys, skipped_summary
from mtl_experiments.compare.runs import Selection
from mtl_experiments.compare.stats import mean_std
from mtl_experiments.summary_names import best_key

FRONT_FILES = ("front.md", "front.csv", "front.png")


def _fmt(values: Sequence[float] | float, digits: int = 4, sign: bool = False) -> str:
    mean, std = (values, math.nan) if isinstance(values, float) else mean_std(values)
    if math.isnan(mean):
        return ""
    spec = f"{'+' if sign else ''}.{digits}f"
    return f"{mean:{spec}}" if math.isnan(std) else f"{mean:{spec}} ± {std:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows])


def _metric_cells(f: Front, e: Entry) -> list[str]:
    return [_fmt(e.group.values(f"test/{k}")) for k in f.keys]


def _distance_cell(e: Entry) -> str:
    runs = _fmt(e.distance_runs, digits=2, sign=True)
    return f"{e.distance:+.2f} (runs {runs})" if not math.isnan(e.distance) else ""


def _header(f: Front) -> list[str]:
    sel = f.comparison.selection
    n_front = sum(len(e.group.runs) for e in f.role("front"))
    arrows = ", ".join(f"{k} {'↑' if f.directions[k] else '↓'}" for k in f.keys)
    return [
        "# Methods against the tuned-scalarization front",
        "",
        f"Read store `{sel.tracking_uri}`, experiment(s) {', '.join(sel.experiments) or '-'}; "
        f"{len(f.role('front'))} static-weight group(s) ({n_front} runs), {len(f.role('method'))} method group(s), "
        f"{len(f.role('single-task'))} single-task group(s); {skipped_summary(sel)}.",
        "",
        f"Test metrics of each run's checkpoint selected on validation (`{f.selection_metric}`), mean ± std over "
        f"seeds. K = {len(f.keys)} metrics: {arrows}.",
        f"**Best static weights** (chosen on validation: best mean `{best_key(f.selection_metric)}`): "
        f"{f.best.label} (n={len(f.best.group.runs)}).",
        "**Front**: the static-weight groups no other static group weakly dominates on the K mean test metrics. "
        "**d** = signed distance to the front, in % of the best static weights' values (Zitzler et al. 2003's "
        "additive ε-indicator): positive = beyond the front, negative = a static weighting is better by |d| % "
        "on every metric; of the mean point, and (runs) mean ± std of each seed's point.",
        "**Δm% vs best static** / **Δm% vs STL** (Maninis et al., CVPR 2019; positive = better): over the K metrics "
        "against the best static weights / against the single-task runs of the same data.",
        "The front is the upper envelope of the static groups' test means: with few seeds its noise favours it.",
        *[f"Note: {n}" for n in f.notes],
    ]


def to_markdown(f: Front) -> str:
    """Two tables: the static-weight groups (the front starred), then the methods and single-task groups."""
    keys = [f"{k} {'↑' if f.directions[k] else '↓'}" for k in f.keys]
    sel = f"{f.selection_metric} (selection)"
    rows = []
    for e in sorted(f.role("front"), key=lambda e: tuple(-v for v in e.weights.values())):
        star = ("front" if e.on_front else "") + (", best (val)" if e is f.best else "")
        rows.append([e.label, star, len(e.group.runs), _fmt(e.selection), *_metric_cells(f, e)])
        rows[-1] += [_fmt(e.dm_best, 2, True), _fmt(e.group.delta_m_values, 2, True), _distance_cell(e)]
    front = _table(["static weights", "on front", "n", sel, *keys, "Δm% vs best static", "Δm% vs STL", "d %"], rows)
    rows = []
    for e in sorted(
        f.role("method") + f.role("single-task"), key=lambda e: -e.distance if not math.isnan(e.distance) else 0
    ):
        place = "" if math.isnan(e.distance) else ("beyond / on the front" if e.distance >= 0 else "behind the front")
        rows.append([e.label, e.role, len(e.group.runs), _fmt(e.selection), *_metric_cells(f, e), _distance_cell(e)])
        rows[-1] += [place, _fmt(e.dm_best, 2, True), _fmt(e.group.delta_m_values, 2, True) or e.group.delta_m_note]
    header = ["method", "kind", "n", sel, *keys, "d %", "place", "Δm% vs best static", "Δm% vs STL"]
    return (
        "\n".join(_header(f)) + "\n\n## Static weights\n\n" + front + "\n\n## Methods\n\n" + _table(header, rows) + "\n"
    )


def to_frame(f: Front) -> pd.DataFrame:
    """One row per group: role, label, weights, validation selection metric, metric means/stds, d, Δm%s."""
    rows = []
    for e in f.entries:
        row: dict[str, Any] = {"role": e.role, "label": e.label, "group": e.group.label, "n": len(e.group.runs)}
        row.update({f"weight/{t}": w for t, w in e.weights.items()})
        row.update({best_key(f.selection_metric): e.selection, "on_front": e.on_front, "best_static": e is f.best})
        for k in f.keys:
            mean, std = mean_std(e.group.values(f"test/{k}"))
            row.update({f"test/{k}_mean": mean, f"test/{k}_std": std})
        row.update(distance_pct=e.distance, distance_runs_mean=mean_std(e.distance_runs)[0])
        row.update(distance_runs_std=mean_std(e.distance_runs)[1])
        row.update(dict(zip(("dm_best_static_mean", "dm_best_static_std"), mean_std(e.dm_best), strict=True)))
        row.update(dict(zip(("dm_stl_mean", "dm_stl_std"), mean_std(e.group.delta_m_values), strict=True)))
        row.update(dm_stl_baseline=e.group.delta_m_note, run_ids=",".join(r.run_id for r in e.group.runs))
        rows.append(row)
    return pd.DataFrame(rows)


def _point(e: Entry, x: str, y: str) -> tuple[float, float, float, float]:
    (mx, sx), (my, sy) = mean_std(e.group.values(f"test/{x}")), mean_std(e.group.values(f"test/{y}"))
    return mx, my, 0.0 if math.isnan(sx) else sx, 0.0 if math.isnan(sy) else sy


def _draw_front(ax, f: Front, x: str, y: str, colorbar: bool) -> None:
    """Static groups coloured by the x task's weight, their 2-D front as a line, the best weights starred."""
    static = f.role("front")
    pts = np.array([_point(e, x, y) for e in static])
    x_task = x.split("/", 1)[0]
    colours = [e.weights.get(x_task, math.nan) for e in static]
    ax.errorbar(pts[:, 0], pts[:, 1], xerr=pts[:, 2], yerr=pts[:, 3], fmt="none", ecolor="0.75", zorder=1)
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=colours, cmap="viridis", vmin=0, s=30, zorder=2, label="static weights")
    if colorbar:
        ax.figure.colorbar(sc, ax=ax, label=f"static weight of {x_task}")
    signs = np.array([1.0 if f.directions[x] else -1.0, 1.0 if f.directions[y] else -1.0])
    on = non_dominated(pts[:, :2] * signs)
    line = pts[on][np.argsort(pts[on][:, 0])]
    ax.plot(
        line[:, 0], line[:, 1], "-", color="0.3", lw=1.2, zorder=1, label="front in these 2 metrics (joins its points)"
    )
    bx, by, _, _ = _point(f.best, x, y)
    ax.scatter([bx], [by], marker="*", s=220, facecolors="none", edgecolors="k", zorder=3, label="best static (val)")


def _draw_methods(ax, f: Front, x: str, y: str) -> list[tuple[float, float, float, float]]:
    """Each method's and single-task group's mean ± std; returns the points drawn."""
    drawn = []
    for i, e in enumerate(f.role("method") + f.role("single-task")):
        mx, my, sx, sy = _point(e, x, y)
        if math.isnan(mx) or math.isnan(my):
            continue
        marker = "X" if e.role == "single-task" else "o"
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt=marker, color=f"C{i % 10}", capsize=3, ms=7, zorder=4, label=e.label)
        drawn.append((mx, my, sx, sy))
    return drawn


def _zoom(ax, points: Sequence[tuple[float, float, float, float]]) -> None:
    """Limits around ``points`` (mean ± std) with a margin: the methods and the best static weights, where the
    vertices of the simplex (one task trained) would otherwise squeeze everything into a corner."""
    p = np.array(points)
    lo, hi = (p[:, :2] - p[:, 2:]).min(axis=0), (p[:, :2] + p[:, 2:]).max(axis=0)
    pad = np.maximum((hi - lo) * 0.35, 1e-4 * np.maximum(np.abs(hi), 1.0))
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])


def front_plot(f: Front, metrics: Sequence[str] | None = None):
    """Two test metrics (``--pareto``, default the first metric of the first two tasks): the static weights and
    their front, every method's and the single-task runs' mean ± std over seeds; left all, right zoomed on the
    methods."""
    from matplotlib.figure import Figure

    x, y = pareto_keys(f.comparison, metrics)
    fig = Figure(figsize=(14, 6), layout="constrained")
    full, zoom = fig.subplots(1, 2)
    for ax, title in ((full, "all groups"), (zoom, "zoom on the methods")):
        _draw_front(ax, f, x, y, colorbar=ax is zoom)
        drawn = _draw_methods(ax, f, x, y)
        ax.set_xlabel(f"test {x} ({'higher' if f.directions.get(x, True) else 'lower'} is better)")
        ax.set_ylabel(f"test {y} ({'higher' if f.directions.get(y, True) else 'lower'} is better)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    _zoom(zoom, [*drawn, _point(f.best, x, y)])
    zoom.legend(fontsize=7, loc="best")
    fig.suptitle(f"Methods vs the static-weight front (test metrics; checkpoints chosen on {f.selection_metric})")
    return fig


def write_front_outputs(f: Front, out_dir: str | Path, metrics: Sequence[str] | None = None) -> list[Path]:
    """``front.md``, ``front.csv`` and ``front.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv, png = (out / name for name in FRONT_FILES)
    md.write_text(to_markdown(f))
    to_frame(f).to_csv(csv, index=False)
    front_plot(f, metrics).savefig(png, dpi=120)
    return [md, csv, png]


def run_front(args, main: Selection) -> None:
    """``mtl-compare --front [SWEEP_OR_EXPERIMENT]``: ``main`` is the usual selection (the methods); print the
    report, and write the files with ``--out``."""
    f = front_compare(main, args.front, metrics=args.metrics)
    if args.pareto:
        pareto_keys(f.comparison, args.pareto)  # fail on a bad --pareto before writing anything
    print(to_markdown(f))
    if args.out:
        files = write_front_outputs(f, args.out, args.pareto)
        print(f"Wrote {', '.join(str(p) for p in files)}", file=sys.stderr)
