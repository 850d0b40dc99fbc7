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

The rooms: ``stats`` (metric directions, mean ± std, Δm%, Pareto front), ``runs`` (reading runs from
MLflow), ``groups`` (grouping over seeds, varying columns), ``comparison`` (the groups' statistics and
table), ``output`` (Markdown, CSV, Pareto plot), ``histories`` (training curves for the notebook), ``cli``.
"""

from mtl_experiments.compare.cli import build_parser, main
from mtl_experiments.compare.comparison import BASELINE_LOSS, NO_BASELINE, Comparison, compare, primary_metric
from mtl_experiments.compare.groups import (
    MAIN_CHOICES,
    PER_RUN_PARAMS,
    PER_RUN_PREFIXES,
    SEED_PARAMS,
    STL_BACKBONE,
    Group,
    config_params,
    data_key,
    drop_duplicates,
    group_key,
    group_runs,
    varying_columns,
)
from mtl_experiments.compare.histories import metric_histories, plot_histories
from mtl_experiments.compare.output import (
    OUTPUT_FILES,
    default_pareto_metrics,
    log_to_parent,
    pareto_keys,
    pareto_plot,
    pareto_styles,
    skipped_summary,
    to_markdown,
    write_outputs,
)
from mtl_experiments.compare.runs import (
    PARENT_TAG,
    ROLE_TAG,
    SWEEP_PARENT,
    RunData,
    Selection,
    check_readable,
    latest_sweep,
    load_runs,
)
from mtl_experiments.compare.stats import delta_m, direction, mean_std, metric_directions, metric_order, pareto_front

__all__ = [
    "BASELINE_LOSS",
    "MAIN_CHOICES",
    "NO_BASELINE",
    "OUTPUT_FILES",
    "PARENT_TAG",
    "PER_RUN_PARAMS",
    "PER_RUN_PREFIXES",
    "ROLE_TAG",
    "SEED_PARAMS",
    "STL_BACKBONE",
    "SWEEP_PARENT",
    "Comparison",
    "Group",
    "RunData",
    "Selection",
    "build_parser",
    "check_readable",
    "compare",
    "config_params",
    "data_key",
    "drop_duplicates",
    "default_pareto_metrics",
    "delta_m",
    "direction",
    "group_key",
    "group_runs",
    "latest_sweep",
    "load_runs",
    "log_to_parent",
    "main",
    "mean_std",
    "metric_directions",
    "metric_histories",
    "metric_order",
    "pareto_front",
    "pareto_keys",
    "pareto_plot",
    "pareto_styles",
    "plot_histories",
    "primary_metric",
    "skipped_summary",
    "to_markdown",
    "varying_columns",
    "write_outputs",
]
