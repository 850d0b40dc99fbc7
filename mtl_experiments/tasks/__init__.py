"""Task kinds. ``kind: <name>`` in a data config names the module ``mtl_experiments/tasks/<name>.py``
(the same one-name-one-file rule as ``conf/<group>/<name>.yaml``), whose ``<Name>Task`` class owns the
head, the loss, the metrics and the prediction of that kind. Adding a kind = adding one file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from torch import nn

from mtl_experiments.errors import ConfigError
from mtl_experiments.tasks.base import Task

__all__ = ["Task", "available_kinds", "build_task", "build_tasks"]


def available_kinds() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def build_task(name: str, cfg: Mapping) -> Task:
    # names become metric keys ("val/<task>/auroc", "<a>-<b>" pairs) and nn.ModuleDict keys
    if not name.isidentifier() or hasattr(nn.Module, name):
        raise ConfigError(
            f"Invalid task name {name!r}: a task name must be a Python identifier (letters, digits, _) "
            "that is not a torch.nn.Module attribute such as 'train' or 'eval'."
        )
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", None)
    if kind not in available_kinds():
        raise ConfigError(
            f"Task '{name}' has kind {kind!r}; valid kinds are {available_kinds()} (set data.tasks.{name}.kind=<kind>)."
        )
    module = importlib.import_module(f"{__name__}.{kind}")
    cls = getattr(module, "".join(part.title() for part in kind.split("_")) + "Task")
    try:
        return cls(name=name, **cfg)
    except TypeError as e:
        raise ConfigError(f"Task '{name}' ({kind}): invalid option(s) {sorted(cfg)}: {e}") from e


def build_tasks(cfg: Mapping) -> dict[str, Task]:
    """``{name: {kind: ..., ...}}`` -> ``{name: Task}`` in config order (the order of loss vectors)."""
    if not cfg:
        raise ConfigError("data.tasks is empty: define at least one task, e.g. data.tasks={y1: {kind: binary}}.")
    return {str(name): build_task(str(name), task_cfg) for name, task_cfg in cfg.items()}
