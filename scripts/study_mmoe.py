"""The MMoE §5 synthetic study (Ma et al., KDD 2018): tables and plots from one MLflow store.

Reads the finished runs of the study's experiments (conf/experiment/mmoe_synthetic/, docs/results.md) and prints
Markdown tables: per task correlation and backbone, the test metric of the checkpoint chosen on validation as
mean ± sample std over seeds, the paired difference to Shared-Bottom on the same data (runs with the same seed
share the data, data.seed = seed) and the last epoch's training MSE; with ``--ablation`` the runs grouped by
task kind and backbone sizes (the paper's or the backbone's defaults). ``--out PREFIX`` also draws
``PREFIX_test.png`` (test metric against correlation) and ``PREFIX_train_loss.png`` (training loss against step,
mean over seeds, one panel per correlation, as the paper's Figure 4).

    python scripts/study_mmoe.py --tracking-uri sqlite:///mmoe_synthetic.db --out docs/mmoe_synthetic
    python scripts/study_mmoe.py --tracking-uri sqlite:///mmoe_synthetic.db --ablation --correlation 0.5 \
        --experiment mmoe-synthetic --experiment mmoe-synthetic-ablation
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from mlflow.tracking import MlflowClient

BACKBONES = ("shared_bottom", "omoe", "mmoe")  # the paper's order; the first is the paired reference
COLOURS = {"shared_bottom": "tab:gray", "omoe": "tab:blue", "mmoe": "tab:red"}


def collect(client: MlflowClient, experiment: str) -> list[dict]:
    """One row per finished training run: backbone, correlation, task kind, sizes, seed, its summary metrics."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"Error: no experiment {experiment!r} in this store (run the study's sweep first).")
    rows = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=10000):
        p, m = run.data.params, run.data.metrics
        if "data.correlation" not in p:  # a sweep's parent run
            continue
        sizes = p.get("backbone.expert_dims") or p.get("backbone.bottom_dims")
        rows.append(
            {
                "run_id": run.info.run_id,
                "backbone": run.data.tags.get("backbone"),
                "correlation": float(p["data.correlation"]),
                "kind": p.get("data.tasks.y1.kind"),
                "sizes": f"{sizes} / towers {p.get('backbone.tower_dims')}",
                "seed": int(p["seed"]),
                "experiment": run.data.tags.get("experiment"),
                "metrics": m,
            }
        )
    return rows


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def paired(rows: list[dict], metric: str, group=lambda r: r["correlation"], reference="shared_bottom") -> dict:
    """``{(group, backbone): [metric(backbone, seed) - metric(reference, seed)]}`` over the seeds run by both in
    the same group (by default the correlation; the same seed means the same data)."""
    by_key = {(group(r), r["backbone"], r["seed"]): r["metrics"].get(metric) for r in rows}
    out = defaultdict(list)
    for (g, b, s), v in sorted(by_key.items()):
        ref = by_key.get((g, reference, s))
        if b != reference and v is not None and ref is not None:
            out[(g, b)].append(v - ref)
    return out


def main_table(rows: list[dict], metric: str) -> str:
    """Markdown: correlation × backbone, test metric, paired Δ to Shared-Bottom, last-epoch train MSE."""
    deltas = paired(rows, metric)
    lines = [
        f"| correlation | backbone | seeds | {metric} | Δ vs shared_bottom (paired) | beats shared_bottom (seeds) | "
        "train/mean_mse (last epoch) |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["correlation"], r["backbone"])].append(r)
    for c in sorted({k[0] for k in groups}):
        for b in BACKBONES:
            runs = groups.get((c, b), [])
            if not runs:
                continue
            d = deltas.get((c, b), [])
            wins = f"{sum(x < 0 for x in d)}/{len(d)}" if d else "—"
            test = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
            train = [r["metrics"]["train/mean_mse"] for r in runs if "train/mean_mse" in r["metrics"]]
            lines.append(
                f"| {c:g} | {b} | {len(runs)} | {mean_std(test)} | {mean_std(d)} | {wins} | {mean_std(train)} |"
            )
    return "\n".join(lines)


def family(r: dict) -> str:
    return "backbone defaults" if r["experiment"] == "mmoe_synthetic/setting" else "paper (§5)"


def ablation_table(rows: list[dict]) -> str:
    """Markdown: task kind × sizes (the paper's or the backbone's defaults) × backbone, the test metric of that
    kind (MSE or AUROC) and its paired difference to Shared-Bottom of the same kind and sizes."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kind"], family(r), r["backbone"])].append(r)
    lines = [
        "| tasks | sizes | backbone | seeds | test metric | Δ vs shared_bottom (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for (kind, fam, b), runs in sorted(groups.items()):
        metric = "test/mean_mse" if kind == "regression" else "test/mean_auroc"
        values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
        d = paired(rows, metric, group=lambda r: (r["kind"], family(r))).get(((kind, fam), b), [])
        sizes = runs[0]["sizes"]
        lines.append(f"| {kind} | {fam}: {sizes} | {b} | {len(runs)} | {metric} {mean_std(values)} | {mean_std(d)} |")
    return "\n".join(lines)


def figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def plot_test(rows: list[dict], metric: str, path: Path) -> None:
    """Test metric (mean ± std over seeds) against the task correlation, one line per backbone."""
    fig = figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    for b in BACKBONES:
        by_c = defaultdict(list)
        for r in rows:
            if r["backbone"] == b and metric in r["metrics"]:
                by_c[r["correlation"]].append(r["metrics"][metric])
        cs = sorted(by_c)
        means = [statistics.fmean(by_c[c]) for c in cs]
        sds = [statistics.stdev(by_c[c]) if len(by_c[c]) > 1 else 0.0 for c in cs]
        ax.errorbar(cs, means, yerr=sds, marker="o", capsize=3, label=b, color=COLOURS[b])
    ax.set_xlabel("task correlation (cosine of w1, w2)")
    ax.set_ylabel(f"{metric} (best val epoch), mean ± std")
    ax.legend()
    fig.savefig(path, dpi=120)


def plot_train_loss(client: MlflowClient, rows: list[dict], path: Path) -> None:
    """train/loss (y1 + y2 MSE, every logged step) averaged over seeds; one panel per correlation."""
    cs = sorted({r["correlation"] for r in rows})
    fig = figure(figsize=(3.2 * len(cs), 3.2))
    axes = fig.subplots(1, len(cs), sharey=True, squeeze=False)[0]
    for ax, c in zip(axes, cs, strict=True):
        for b in BACKBONES:
            curves = defaultdict(list)
            for r in rows:
                if r["backbone"] == b and r["correlation"] == c:
                    for m in client.get_metric_history(r["run_id"], "train/loss"):
                        curves[m.step].append(m.value)
            steps = sorted(curves)
            ax.plot(steps, [statistics.fmean(curves[s]) for s in steps], label=b, color=COLOURS[b])
        ax.set_yscale("log")
        ax.set_title(f"correlation {c:g}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss y1 + y2 (MSE), mean over seeds")
    axes[0].legend()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", required=True, help="the study's store, e.g. sqlite:///mmoe_synthetic.db")
    ap.add_argument("--experiment", action="append", help="MLflow experiment(s) of the runs (default mmoe-synthetic)")
    ap.add_argument("--correlation", type=float, help="only the runs of this task correlation")
    ap.add_argument("--metric", default="test/mean_mse", help="the reported test metric")
    ap.add_argument("--ablation", action="store_true", help="group by task kind and backbone sizes instead")
    ap.add_argument("--out", type=Path, help="file prefix of the plots, e.g. docs/mmoe_synthetic")
    args = ap.parse_args(argv)
    client = MlflowClient(args.tracking_uri)
    rows = [r for e in args.experiment or ["mmoe-synthetic"] for r in collect(client, e)]
    rows = [r for r in rows if args.correlation is None or r["correlation"] == args.correlation]
    print(ablation_table(rows) if args.ablation else main_table(rows, args.metric))
    if args.out and not args.ablation:
        plot_test(rows, args.metric, Path(f"{args.out}_test.png"))
        plot_train_loss(client, rows, Path(f"{args.out}_train_loss.png"))


if __name__ == "__main__":
    main()
