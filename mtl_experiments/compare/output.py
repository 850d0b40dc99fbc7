"""Output of a comparison: the Markdown report, the CSV, the Pareto plot (task A vs task B test metric)
and logging the files to the sweep's parent run."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl_experiments.compare.comparison import BASELINE_LOSS, CONFLICT_COLUMNS, Comparison
from mtl_experiments.compare.groups import STL_BACKBONE, Group, data_key
from mtl_experiments.compare.runs import Selection
from mtl_experiments.compare.stats import mean_std, pareto_front
from mtl_experiments.errors import ConfigError

OUTPUT_FILES = ("comparison.md", "comparison.csv", "pareto.png")


def _fmt(mean: float, std: float, digits: int = 4, sign: bool = False) -> str:
    if math.isnan(mean):
        return ""
    # a value that rounds to zero is shown unsigned: the baseline's own Δm (±1e-16 in floating point) is "0.00"
    spec = f"{'+' if sign and round(mean, digits) != 0 else ''}.{digits}f"
    mean = 0.0 if round(mean, digits) == 0 else mean
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


def _header(c: Comparison) -> list[str]:
    """What was read, how many runs and groups, and how the columns and Δm are defined."""
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
    counted = sum(len(g.runs) for g in c.groups)
    repeats = f" ({len(sel.runs) - counted} repeating another's config and seed, counted once)" if c.warnings else ""
    lines = [
        f"# Run comparison: {', '.join(sel.experiments) or 'no experiment'}",
        "",
        f"Read {'; '.join(where)}.",
        f"{len(sel.runs)} FINISHED run(s){repeats} in {len(c.groups)} group(s) of runs that differ only by seed; "
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
            "cos₀ a-b: cosine of the tasks' per-sample loss gradients w.r.t. their outputs early in training "
            "(`conflict/mean/initial_output_cosine/<a>-<b>`, the summary that tracks task relatedness, "
            "docs/results.md); "
            "cos a-b: mean per-step gradient cosine over training (`conflict/mean/cosine/<a>-<b>`, noisy); "
            "conflict a-b: share of measured steps with cosine < 0 (`conflict/mean/rate/<a>-<b>`)."
        )
    return lines + [f"Note: {n}" for n in c.notes] + [f"Warning: {w}" for w in c.warnings]


def _table(c: Comparison) -> str:
    """One row per group: varying columns, n and seeds, metrics as mean ± std, Δm% and conflict summaries."""
    header = [*c.choice_columns, *c.param_columns, "n", "seeds"]
    header += [f"{k}{_arrow(c.directions[k])}" for k in c.metric_keys]
    header += ["Δm% ↑", "Δm baseline"]
    pair_cols = []
    for pair in c.conflict_pairs:
        for kind, title in CONFLICT_COLUMNS:
            if f"conflict/mean/{kind}/{pair}" in c.conflict_keys:
                pair_cols.append(f"conflict/mean/{kind}/{pair}")
                header.append(f"{title} {pair}")
    rows = []
    for g in c.groups:
        row = [g.shown(col) for col in c.choice_columns]
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
    return _md_table(header, rows)


def to_markdown(c: Comparison) -> str:
    """The comparison as a Markdown document: a header saying what was read and how Δm is defined, then
    one row per group."""
    return "\n".join(_header(c)) + "\n\n" + _table(c) + "\n"


def default_pareto_metrics(c: Comparison) -> tuple[str, str]:
    """The first metric of each of the first two tasks (by name): the model-selection metric
    (``optimized_metric``, e.g. auroc) where the task reports it, else the first its kind declares."""
    tasks = c.tasks
    if len(tasks) < 2:
        raise ConfigError(f"A Pareto plot needs two tasks; the runs report test metrics of {tasks} only.")
    return tuple(next(k for k in c.metric_keys if k.startswith(f"{t}/")) for t in tasks[:2])  # type: ignore[return-value]


def pareto_keys(c: Comparison, metrics: Sequence[str] | None) -> tuple[str, str]:
    """The (x, y) metrics of the Pareto plot: ``metrics`` (two of ``c.metric_keys``), else the default."""
    if not metrics:
        return default_pareto_metrics(c)
    if len(metrics) != 2 or any(m not in c.metric_keys for m in metrics):
        raise ConfigError(f"--pareto takes two of {c.metric_keys} separated by a comma, e.g. y1/auroc,y2/auroc.")
    return metrics[0], metrics[1]


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
FRONT_STYLES = ("-", "--", ":", "-.")


def pareto_styles(groups: Sequence[Group]) -> tuple[dict[str, Any], dict[str, str]]:
    """({method: colour}, {backbone: marker}): a distinct colour per method (``loss``) and marker per backbone, in
    order of first appearance (tab10, tab20 beyond ten methods; markers repeat only beyond twelve backbones)."""
    from matplotlib import colormaps

    methods = list(dict.fromkeys(g.choices.get("loss", "?") for g in groups))
    backbones = list(dict.fromkeys(g.choices.get("backbone", "?") for g in groups))
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    colours = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    return colours, {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(backbones)}


def _legend_handles(colours: dict[str, Any], markers: dict[str, str], fronts: list) -> list:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=c, label=f"loss={m}") for m, c in colours.items()]
    handles += [Line2D([], [], ls="", marker=k, color="0.3", label=f"backbone={b}") for b, k in markers.items()]
    return handles + fronts


def pareto_plot(c: Comparison, metrics: Sequence[str] | None = None):
    """Task A vs task B test metric, one point per group with std-over-seeds error bars: a colour per method, a marker
    per backbone; the non-dominated groups (per data config, directions from higher_is_better) ringed and joined by
    that data config's front line; labels placed so that none collides (``compare/labels.py``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: works headless and inside notebooks alike

    from mtl_experiments.compare.labels import place_labels

    x_key, y_key = pareto_keys(c, metrics)
    hib = (c.directions[x_key] is not False, c.directions[y_key] is not False)
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours, markers = pareto_styles(c.groups)
    by_data: dict[tuple, list[Group]] = defaultdict(list)
    for g in c.groups:
        by_data[data_key(g.params)].append(g)
    shown, fronts = [], []
    for i, groups in enumerate(by_data.values()):
        stats = [(g.stat(f"test/{x_key}"), g.stat(f"test/{y_key}")) for g in groups]
        front = pareto_front([(sx[0], sy[0]) for sx, sy in stats], hib)
        for g, (sx, sy), on_front in zip(groups, stats, front, strict=True):
            if math.isnan(sx[0]) or math.isnan(sy[0]):
                continue
            ax.errorbar(
                sx[0], sy[0], xerr=0 if math.isnan(sx[1]) else sx[1], yerr=0 if math.isnan(sy[1]) else sy[1],
                fmt=markers[g.choices.get("backbone", "?")], color=colours[g.choices.get("loss", "?")],
                alpha=1.0 if on_front else 0.5, capsize=3, markersize=8 if on_front else 6,
                markeredgecolor="black" if on_front else "none",
            )  # fmt: skip
            shown.append(((sx[0], sy[0]), g.short_label))
        pts = sorted((sx[0], sy[0]) for (sx, sy), f in zip(stats, front, strict=True) if f)
        if pts:
            data_label = groups[0].data_label or groups[0].shown("data") or "data"
            style = FRONT_STYLES[i % len(FRONT_STYLES)]
            fronts += ax.plot(*zip(*pts, strict=True), style, color="0.4", lw=1, label=f"front ({data_label})")
    ax.set_xlabel(f"test {x_key} ({'higher' if hib[0] else 'lower'} is better)")
    ax.set_ylabel(f"test {y_key} ({'higher' if hib[1] else 'lower'} is better)")
    ax.set_title("Groups (mean ± std over seeds); ringed and joined: non-dominated")
    ax.grid(alpha=0.3)
    ax.margins(0.12)  # room for the labels of the outermost points
    fig.legend(handles=_legend_handles(colours, markers, fronts), loc="outside right upper", fontsize=8)
    fig.canvas.draw()  # the layout is final before labels are measured
    if shown:
        place_labels(ax, [p for p, _ in shown], [t for _, t in shown])
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
