"""Training curves of the compared runs for the notebook: every logged step of a metric family (task
weights, gradient cosines) per run, and one panel per group."""

from __future__ import annotations

import math

import pandas as pd

from mtl_experiments.compare.comparison import Comparison


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
