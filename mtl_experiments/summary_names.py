"""The names of a run's one-value summaries from model selection, shared by what logs them (``pipeline``,
``selection``) and what reads them (``compare/``).

MLflow 3's run page ("Model metrics") groups charts into sections by the metric name's prefix (all before the last
``/``) and orders the sections by code point (checked in a real browser: tests/tracking/test_ui.py). A summary is a
chart of one point; named ``val_best/...`` its section sorts after every ``train/...`` and ``val/...`` curve section
(``_`` comes after ``/``), where ``best/...`` came first on the page.
"""

from __future__ import annotations

BEST = "val_best"
OLD_BEST = "best"  # the name before: mtl-compare still reads it from older stores


def best_key(metric: str) -> str:
    """The run's best value of the validation metric ``metric``: ``val/mean_auroc`` -> ``val_best/mean_auroc``."""
    return f"{BEST}/{metric.removeprefix('val/')}"


def old_best_key(metric: str) -> str:
    return f"{OLD_BEST}/{metric}"


def best_epoch_key(task: str) -> str:
    """The epoch of ``task``'s own best checkpoint (``callbacks.selection.mode=per_task``)."""
    return f"{BEST}_epoch/{task}"
