"""The conflict-estimator study (docs/results.md): each conflict summary against the synthetic tasks' correlation.

Reads the FINISHED runs of one experiment from one MLflow store (a sweep over ``data.correlation`` and ``seed``),
prints a Markdown table (mean ± std over seeds per correlation, and Spearman's ρ between the correlation and the
summary over every run) and draws the summaries against the correlation into a PNG::

    python train.py -m data.correlation=0,0.25,0.5,0.75,1.0 seed=0,1,2 experiment_name=conflict-estimators
    python scripts/conflict_estimators_study.py --experiment conflict-estimators \
        --out docs/figures/conflict_estimators.png
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from mtl_experiments.metrics.conflict import HEADLINE  # noqa: E402

ESTIMATORS = (
    "cosine",
    "rate",
    "ema_cosine",
    "accumulated_cosine",
    "layer_cosine/bottom.0",
    "layer_cosine/bottom.2",
    "initial_cosine",
    "output_cosine",
    "initial_output_cosine",
)


def summaries(client: MlflowClient, experiment: str, pair: str) -> dict[str, dict[float, list[float]]]:
    """``{estimator: {correlation: [run summary per seed]}}`` of the experiment's finished correlation runs."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"experiment {experiment!r} is not in this store; run the sweep in the docstring first")
    out: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=10000):
        corr = run.data.params.get("data.correlation")
        if corr is None:  # the sweep's parent run
            continue
        for name in ESTIMATORS:
            value = run.data.metrics.get(f"conflict/mean/{name}/{pair}")
            if value is not None:
                out[name][float(corr)].append(value)
    return out


def table(values: dict[str, dict[float, list[float]]]) -> str:
    corrs = sorted({c for by in values.values() for c in by})
    lines = [
        "| summary `conflict/mean/...` | "
        + " | ".join(f"ρ_task = {c:g}" for c in corrs)
        + " | Spearman ρ (all runs) |",
        "| --- | " + " | ".join("---:" for _ in corrs) + " | ---: |",
    ]
    for name, by in values.items():
        xs = [c for c in corrs for _ in by.get(c, [])]
        ys = [v for c in corrs for v in by.get(c, [])]
        cells = [f"{np.mean(by[c]):+.3f} ± {np.std(by[c], ddof=1) if len(by[c]) > 1 else 0:.3f}" for c in corrs]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {spearmanr(xs, ys).statistic:+.2f} |")
    return "\n".join(lines)


def plot(values: dict[str, dict[float, list[float]]], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by in values.items():
        corrs = sorted(by)
        means = [np.mean(by[c]) for c in corrs]
        stds = [np.std(by[c], ddof=1) if len(by[c]) > 1 else 0.0 for c in corrs]
        ax.errorbar(corrs, means, yerr=stds, marker="o", capsize=3, label=name, lw=2.5 if name == HEADLINE else 1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("task correlation cos(w1, w2) (data.correlation)")
    ax.set_ylabel("run summary (mean ± std over seeds)")
    ax.set_title("Conflict estimators vs task correlation (synthetic, shared_bottom)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="conflict-estimators")
    parser.add_argument("--pair", default="y1-y2")
    parser.add_argument("--out", default="docs/figures/conflict_estimators.png")
    args = parser.parse_args()
    values = summaries(MlflowClient(args.tracking_uri), args.experiment, args.pair)
    print(table(values))
    plot(values, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
