"""What a run prints: a start line (output folder, config summary), a progress bar with the train loss and the
optimized validation metric, one line per validation, a line when early stopping fires and which epoch is tested,
the final table (pipeline.print_results), then a link to the run in the MLflow UI. Library noise is silenced at
its source: each known warning or log line by its own message, never all warnings."""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich import get_console
from rich.table import Table

from mtl_experiments import checks
from mtl_experiments.scrub import redact
from mtl_experiments.tasks.base import LabelType
from mtl_experiments.tracking import ui

log = logging.getLogger(__name__)

SUMMARY_GROUPS = ("experiment", "data", "backbone", "loss", "optimizer", "scheduler", "trainer", "debug")
# Lightning's info lines that say nothing about this run: device availability (the trainer's own choice is in
# the config summary), an advertisement, and the notice that our summary replaces Lightning's default one
LIBRARY_LINES = re.compile(
    r"^(GPU available|TPU available|HPU available|💡 Tip: |Trainer already configured with model summary callbacks)"
)
WARNINGS = (
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; not ours to fix
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the module writes its epoch values whatever log_every_n_steps is; its step values follow the setting
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


class LibraryLines(logging.Filter):
    """Drops Lightning's device-availability lines and its litlogger tip; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not LIBRARY_LINES.match(str(record.getMessage()))


def quiet_libraries() -> None:
    """Silence the known library noise, each by its message (idempotent)."""
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, LibraryLines) for f in rank_zero.filters):
        rank_zero.addFilter(LibraryLines())


def config_line(output_dir: Path, choices: Mapping[str, Any], overrides: list[str], metric: str, mode: str) -> str:
    """``output <dir> · data=... loss=... · <overrides> · selects on <metric> (<mode>)``, secrets masked."""
    # the groups that define the experiment, then any other group not left at its default (paths, hydra, ...)
    shown = [k for k in SUMMARY_GROUPS if choices.get(k) is not None]
    others = [k for k in choices if k not in SUMMARY_GROUPS and "/" not in str(k)]
    shown += [k for k in others if choices[k] not in (None, "default")]
    picked = " ".join(f"{k}={choices[k]}" for k in shown)
    told = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in choices]
    parts = [f"output {Path(output_dir).resolve()}", picked, " ".join(told), f"selects on {metric} ({mode})"]
    return redact(" · ".join(p for p in parts if p))  # credentials in a URI, secret-named keys: never printed


def link_line(logger, ui_url: str | None = None) -> str | None:
    """``Run in the MLflow UI: <link>`` for an MLflow logger's run (None without one); for a file or SQLite store,
    also the command that serves that UI."""
    run_id, experiment_id = getattr(logger, "run_id", None), getattr(logger, "experiment_id", None)
    if not run_id or not experiment_id:
        return None
    uri = getattr(logger, "tracking_uri", None)
    link = ui.run_url(ui.ui_base(uri, ui_url), experiment_id, run_id)
    line = f"Run in the MLflow UI: [link={link}]{link}[/link]"
    serve = ui.open_command(uri) if uri else None
    return line + (f" (serve it with: {serve})" if serve else "")


def sweep_end_lines(tracking_uri: str, experiment_id: str, parent_id: str, ui_url: str | None = None) -> list[str]:
    """What a sweep's end says: its parent run's link and the ``mtl-compare`` command for its runs."""
    link = ui.run_url(ui.ui_base(tracking_uri, ui_url), experiment_id, parent_id)
    store = f" --tracking-uri {redact(tracking_uri)}"
    return [f"Sweep in the MLflow UI: {link}", f"Compare its runs: mtl-compare{store} --parent {parent_id[:8]}"]


def print_run_end(trainer, logger) -> None:
    """After the final table: the run's link, at the UI address of the run's progress bar (``ui_url``)."""
    bar = trainer.progress_bar_callback
    line = link_line(logger, getattr(bar, "ui_url", None))
    if line is not None:
        get_console().print(line, highlight=False, soft_wrap=True)


def print_line(text: str) -> None:
    """One line through rich's console, which the progress bar's live display shares (no torn bar)."""
    get_console().print(text, highlight=False, soft_wrap=True, markup=False)  # overrides like a=[b] are text


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}"


class ConsoleProgressBar(RichProgressBar):
    """Lightning's rich bar showing ``train/loss`` and the optimized validation metric (no ``v_num``); a line per
    validation with the best so far; at the end of fit, whether early stopping fired and which epoch is tested.
    ``ui_url``: where ``mlflow ui`` shows a file or SQLite store (the run's link at the end)."""

    def __init__(self, ui_url: str = ui.DEFAULT_UI, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        hint = "the address `mlflow ui` serves, e.g. http://127.0.0.1:5000"
        if not checks.text("callbacks.progress_bar.ui_url", ui_url, hint).startswith(("http://", "https://")):
            checks.fail("callbacks.progress_bar.ui_url", "an http:// or https:// address", ui_url, hint)
        self.ui_url = ui_url
        self.history: list[tuple[int, float]] = []  # (epoch, optimized metric) per validation
        self.predicted: dict[str, tuple[int, int]] = {}  # binary task -> (test rows predicted 1, labelled rows)

    @staticmethod
    def selection(trainer) -> tuple[str | None, str]:
        """(monitored metric, "max"/"min") of the checkpoint that test restores."""
        ckpt = trainer.checkpoint_callback
        return (getattr(ckpt, "monitor", None), getattr(ckpt, "mode", "max")) if ckpt is not None else (None, "max")

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = trainer.callback_metrics
        monitor, _ = self.selection(trainer)
        return {k: _fmt(metrics[k]) for k in ("train/loss", monitor) if k and k in metrics}

    def best(self, mode: str) -> tuple[int, float] | None:
        finite = [(e, v) for e, v in self.history if math.isfinite(v)]
        if not finite:
            return None
        return max(finite, key=lambda ev: ev[1] if mode == "max" else -ev[1])

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        monitor, mode = self.selection(trainer)
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or not trainer.is_global_zero or not monitor or monitor not in metrics:
            return
        value = float(metrics[monitor])
        self.history.append((trainer.current_epoch, value))
        parts = [f"epoch {trainer.current_epoch}"]
        parts += [f"{k} {_fmt(metrics[k])}" for k in ("train/loss", "val/loss") if k in metrics]
        best_epoch, best_value = self.best(mode) or (trainer.current_epoch, value)
        note = "new best" if best_epoch == trainer.current_epoch else f"best {_fmt(best_value)} at epoch {best_epoch}"
        parts.append(f"{monitor} {_fmt(value)} ({note})")
        print_line(" · ".join(parts))

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        super().on_test_epoch_start(trainer, pl_module)
        self.predicted = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.count_predictions(pl_module, batch)

    def count_predictions(self, pl_module, batch: Mapping[str, Any]) -> None:
        """Adds a test batch's predicted classes (p >= 0.5, the accuracy's threshold) per binary task."""
        binary = {n: t for n, t in pl_module.tasks.items() if t.label_type == LabelType.BINARY}
        if not binary:
            return
        with torch.no_grad():  # the test step keeps no predictions: one more forward of this batch
            out = pl_module.model(batch["features"])
        for name, task in binary.items():
            target = batch["labels"][name]
            rows = task.valid(target)
            rows = torch.ones_like(target, dtype=torch.bool) if rows is None else rows  # None: every row has a label
            positive = int((task.predict(out[name])[rows] >= 0.5).sum())
            seen, total = self.predicted.get(name, (0, 0))
            self.predicted[name] = (seen + positive, total + int(rows.sum()))

    def on_test_end(self, trainer, pl_module) -> None:
        super().on_test_end(trainer, pl_module)
        if trainer.is_global_zero:
            self.warn_one_class()

    def warn_one_class(self) -> None:
        """A binary head that predicts one class for every test row learned the class rate only: its accuracy is
        that rate and would otherwise pass without a word."""
        for name, (positive, total) in self.predicted.items():
            if total and positive in (0, total):
                log.warning(
                    "Task '%s' predicts %s for all %d test rows (p %s 0.5): its head learned the class rate only, "
                    "so its accuracy is that rate. Try loss weights, more epochs or a larger model.",
                    name, "1" if positive else "0", total, ">=" if positive else "<",
                )  # fmt: skip

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        stopper = trainer.early_stopping_callback
        if stopper is not None and stopper.stopped_epoch > 0:
            print_line(
                f"Early stopping after epoch {stopper.stopped_epoch}: {stopper.monitor} did not improve by more than "
                f"{stopper.min_delta} for {stopper.patience} validations."
            )
        monitor, mode = self.selection(trainer)
        best = self.best(mode)
        if best is not None:
            print_line(f"Testing the best checkpoint: epoch {best[0]} ({monitor} {_fmt(best[1])}).")


class ModelSummary(RichModelSummary):
    """Lightning's model summary without its FLOPs column and total (zeros: FLOPs are not counted for this model's
    forward, which takes a dict of tensors). ``enabled``: the trainer's ``enable_model_summary``, which Lightning
    applies to its own default summary only."""

    def __init__(self, enabled: bool = True, max_depth: int = 1, **kwargs: Any) -> None:
        super().__init__(max_depth=max_depth if enabled is not False else 0, **kwargs)  # None: on, as in Lightning

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, *a, **kw):
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style="bold magenta")
        for name, _ in columns:
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        get_console().print(table)
        frozen = total_parameters - trainable_parameters
        print_line(
            f"Params: {get_human_readable_count(trainable_parameters).strip()} trainable, "
            f"{get_human_readable_count(frozen).strip()} frozen ({model_size:.2f} MB)"
        )
