"""Run plots logged as MLflow artifacts: the mean pairwise gradient cosine and weights / gradient norms.

Drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure``, rendered by Agg), never
``pyplot``: no global backend state, no display needed, safe on servers and in tests. Matplotlib is
imported only when a plot is drawn, so importing the package stays fast.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

COSINE_PLOT = "conflict_cosine.png"
WEIGHTS_PLOT = "weights_grad_norms.png"
ARTIFACT_DIR = "plots"
log = logging.getLogger(__name__)


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def cosine_heatmap(cosine: Tensor, task_names: Sequence[str], path: Path, steps: int | None = None) -> Path:
    """T×T heat map of the mean pairwise cosine, each cell annotated; red = conflict (< 0), blue = aligned."""
    values = cosine.detach().double().cpu().numpy()
    t = len(task_names)
    fig = _figure(figsize=(1.6 + 0.9 * t, 1.2 + 0.8 * t))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(t), labels=list(task_names), rotation=45, ha="right")
    ax.set_yticks(range(t), labels=list(task_names))
    for i in range(t):
        for j in range(t):
            ax.text(
                j,
                i,
                f"{values[i, j]:.2f}",
                ha="center",
                va="center",
                color="white" if abs(values[i, j]) > 0.6 else "black",
            )
    fig.colorbar(image, ax=ax, label="cos(g_i, g_j)")
    ax.set_title("mean gradient cosine" + (f"\n({steps} measured steps)" if steps else ""), fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def weights_and_grad_norms(
    steps: Sequence[int], weights: Tensor, grad_norms: Tensor, task_names: Sequence[str], path: Path
) -> Path:
    """Two panels over training steps: each task's loss weight and its gradient norm (log scale)."""
    fig = _figure(figsize=(7.0, 5.0))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, name in enumerate(task_names):
        top.plot(steps, weights[:, i].numpy(), marker=".", label=name)
        bottom.plot(steps, grad_norms[:, i].numpy(), marker=".", label=name)
    top.set_ylabel("weight w_t")
    bottom.set_ylabel("‖g_t‖")
    if bool((grad_norms > 0).all()):
        bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    top.legend(title="task", fontsize=8)
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    top.set_title("loss weights and task gradient norms (measured steps)", fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def write_run_plots(module, directory: Path) -> list[Path]:
    """Both plots of ``module``'s conflict tracker into ``directory``; none when nothing was measured."""
    tracker = getattr(module, "conflict_tracker", None)
    if tracker is None or not tracker.history:
        return []
    names = tracker.task_names
    steps = [s for s, _, _ in tracker.history]
    weights = torch.stack([w for _, w, _ in tracker.history])
    norms = torch.stack([n for _, _, n in tracker.history])
    return [
        cosine_heatmap(tracker.mean_cosine(), names, directory / COSINE_PLOT, steps=len(steps)),
        weights_and_grad_norms(steps, weights, norms, names, directory / WEIGHTS_PLOT),
    ]


def log_run_artifacts(logger, module) -> list[str]:
    """Log the plots of a trained ``module`` to ``logger``'s MLflow run as ``plots/*.png``.

    ``logger``: Lightning's ``MLFlowLogger`` (anything with ``experiment`` = MlflowClient and ``run_id``).
    Returns the artifact paths logged (empty when the run measured no conflict metrics). A failure is
    logged as a warning, not raised: a plot must not turn a finished training run into a failed one.
    """
    from mtl_experiments import tracking

    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_run_plots(module, Path(tmp))
            if paths:  # through the logger when it buffers (a store away mid-run: into its fallback folder)
                tracking.log_artifacts(logger, tmp, ARTIFACT_DIR)
    except Exception as e:  # noqa: BLE001 - reported, and the run's metrics are already stored
        log.warning("Could not log the run's plots as MLflow artifacts: %s", e)
        return []
    return [f"{ARTIFACT_DIR}/{p.name}" for p in paths]
