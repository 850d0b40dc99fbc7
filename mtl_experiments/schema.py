"""The one early check of the whole config: every group's values, the top-level keys and the conflicts between
groups, before Lightning, MLflow or torch is imported and before any run exists (``cli.main`` calls ``validate``
first; ``pipeline.check_startup`` again, for callers of ``train(cfg)``). A bad value is one ``ConfigError`` in the
``checks`` vocabulary (``<key> must be ..., got ... (<hint>)``), which the CLI prints as one line, exit code 2.

What is checked where:

- ``trainer``, ``optimizer``, ``scheduler``, ``module``, ``features``, ``callbacks`` and the top-level keys: every
  key the YAML files of these groups define, by name (``GROUPS``, ``TOP``): type and range.
- ``data``, ``backbone``, ``loss`` (one Python class per option, each checking its own values in its constructor
  with the same ``checks``): the keys every option shares a meaning for (``SHARED``, e.g. ``batch_size``,
  ``*_dims``, ``dropout``, ``loss.weights``), each option's own keys (``schema_options.OPTIONS``, e.g.
  ``loss.temperature`` of loss=dwa; a test enrols every key of every option), and no key the chosen option's YAML
  lacks (``+data.split`` on a dataset without split modes would reach the constructor as an unexpected argument).
- Between groups: ``trainer.min_epochs <= trainer.max_epochs``; a retrieval task needs a dataset with items; a
  cold/temporal split needs the ids or timestamps it holds out.

Datasets declare what they offer by their settings: one with ``split`` is an interaction log (user and item ids,
timestamps); one that also has ``id_columns`` / ``timestamp_column`` (``data=tabular``) has them only where named.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from mtl_experiments import checks
from mtl_experiments.data.splits import COLD_KEY, SPLIT_MODES
from mtl_experiments.errors import ConfigError
from mtl_experiments.schema_options import OPTIONS
from mtl_experiments.schema_rules import (
    COUNT,
    MAYBE_TEXT,
    POSITIVE,
    TEXT,
    Check,
    any_of,
    checks_ok,
    is_fraction,
    is_int,
    nullable,
    number_or_mapping,
    one_of,
    rule,
    texts,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
SKIP = object()  # a value that cannot be resolved yet (e.g. ${hydra:...} outside a Hydra job): not judged here


EPOCHS_HINT = "a number of epochs, e.g. trainer.max_epochs=20; -1: until early stopping"
BATCHES = any_of(
    "a fraction in [0, 1] or a number of batches >= 0",
    "e.g. 0.25 or 10",
    is_fraction,
    lambda v: is_int(v, 0),
)
PRECISIONS = ("64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16", "bf16-true")
DEVICES = any_of(
    "a number of devices >= 1, -1 (all), 'auto', or a list of device indices",
    "e.g. trainer.devices=1",
    lambda v: is_int(v, 1) or v == -1 or v == "auto",
    lambda v: isinstance(v, list | ListConfig) and len(v) > 0 and all(is_int(i, 0) for i in v),
    lambda v: isinstance(v, str) and all(p.strip().isdigit() for p in v.split(",") if p.strip()),
)

# Every key of conf/{trainer,optimizer,scheduler,module,features,callbacks}/*.yaml, and common extras
# (tests/test_schema.py checks each YAML key has a rule here).
TRAINER: dict[str, Check] = {
    "_target_": rule(checks.text),
    "default_root_dir": nullable(rule(checks.text)),
    "accelerator": one_of(
        "auto", "cpu", "gpu", "cuda", "mps", hint="trainer=gpu (or trainer.accelerator=gpu) for a GPU, cpu otherwise"
    ),
    "devices": DEVICES,
    "num_nodes": rule(checks.positive_int, hint="machines, e.g. 1"),
    "strategy": rule(checks.text, hint="ddp (trainer=ddp) or auto"),
    "min_epochs": nullable(rule(checks.non_negative_int, hint="e.g. trainer.min_epochs=1")),
    "max_epochs": any_of("an integer >= 1, or -1", EPOCHS_HINT, lambda v: is_int(v, 1) or v == -1),
    "max_steps": rule(checks.integer, low=-1, hint="-1: no limit"),
    "log_every_n_steps": rule(checks.positive_int, hint="each logged step is one write to the store, e.g. 50"),
    "check_val_every_n_epoch": nullable(rule(checks.positive_int, hint="e.g. 1")),
    "val_check_interval": nullable(BATCHES),
    "limit_train_batches": nullable(BATCHES),
    "limit_val_batches": nullable(BATCHES),
    "limit_test_batches": nullable(BATCHES),
    "num_sanity_val_steps": rule(checks.integer, low=-1, hint="0: none, -1: the whole validation set"),
    "deterministic": any_of("true, false or 'warn'", None, lambda v: isinstance(v, bool) or v == "warn"),
    "benchmark": nullable(rule(checks.boolean)),
    "enable_model_summary": rule(checks.boolean),
    "enable_progress_bar": rule(checks.boolean),
    "enable_checkpointing": rule(checks.boolean),
    "precision": one_of(*PRECISIONS, hint="32 (default), bf16-mixed or 16-mixed"),
    "gradient_clip_val": one_of(
        None, hint="use module.gradient_clip_val: the training step clips (manual optimization)"
    ),
    "accumulate_grad_batches": one_of(1, hint="the training step makes one optimizer step per batch"),
}
OPTIMIZER: dict[str, Check] = {
    "_target_": rule(checks.text),
    "_partial_": rule(checks.boolean),
    "lr": rule(checks.positive_number, hint="the learning rate, e.g. optimizer.lr=0.001"),
    "weight_decay": rule(checks.non_negative_number, hint="0 disables it, e.g. 0.0001"),
    "momentum": rule(checks.fraction, open_high=True, hint="e.g. 0.9"),
    "dampening": rule(checks.fraction),
    "nesterov": rule(checks.boolean),
    "amsgrad": rule(checks.boolean),
    "eps": rule(checks.positive_number, hint="e.g. 1e-08"),
    "betas": any_of(
        "two numbers in [0, 1)",
        "e.g. [0.9, 0.999]",
        lambda v: (
            isinstance(v, list | ListConfig)
            and len(v) == 2
            and all(checks_ok(rule(checks.fraction, open_high=True), b) for b in v)
        ),
    ),
}
SCHEDULER: dict[str, Check] = {
    "scheduler": rule(checks.mapping, hint="a torch.optim.lr_scheduler class, its _target_ and settings"),
    "interval": one_of("epoch", "step", hint="when the scheduler steps"),
    "frequency": rule(checks.positive_int),
    "monitor": rule(checks.text, hint="a validation metric, e.g. ${optimized_metric}"),
    "scheduler._target_": rule(checks.text),
    "scheduler._partial_": rule(checks.boolean),
    "scheduler.factor": rule(checks.fraction, open_low=True, hint="the learning rate's multiplier, e.g. 0.5"),
    "scheduler.total_iters": rule(checks.non_negative_int),
    "scheduler.T_max": rule(checks.positive_int, hint="epochs (interval=epoch) or steps of the cosine"),
    "scheduler.eta_min": rule(checks.non_negative_number),
    "scheduler.mode": one_of("min", "max", "auto", hint="leave it ${optimized_mode}"),
    "scheduler.patience": rule(checks.non_negative_int, hint="validations without improvement, e.g. 2"),
    "scheduler.threshold": rule(checks.non_negative_number),
    "scheduler.cooldown": rule(checks.non_negative_int),
    "scheduler.min_lr": rule(checks.non_negative_number),
}
MODULE: dict[str, Check] = {
    "_target_": rule(checks.text),
    "gradient_clip_val": rule(checks.non_negative_number, hint="0: off"),
    "gradient_clip_algorithm": one_of("norm", "value"),
    "train_metrics": rule(checks.boolean),
    "nonfinite": one_of("stop", "skip"),
    "max_consecutive_nonfinite": rule(checks.positive_int),
    "conflict": rule(checks.mapping),
    "conflict.every_n_steps": rule(checks.non_negative_int, hint="0 = off"),
    "conflict.source": one_of("params", "representation"),
    "conflict.affinity_every_n_steps": rule(checks.non_negative_int, hint="0 = off"),
    "conflict.track_every_n_steps": rule(checks.non_negative_int, hint="0 = off"),
    "conflict.ema_beta": rule(checks.fraction, open_high=True, hint="e.g. 0.95"),
    "conflict.accumulate_steps": rule(checks.positive_int, hint="e.g. 20"),
    "conflict.initial_steps": rule(checks.positive_int, hint="tracked steps the initial_* estimators average, e.g. 12"),
    "divergence": rule(checks.mapping),
    "divergence.action": one_of("off", "warn", "stop"),
    "divergence.loss_factor": nullable(rule(checks.positive_number, hint="null = off")),
    "divergence.rising_steps": nullable(rule(checks.positive_int, hint="null = off")),
    "divergence.max_param_norm": nullable(rule(checks.positive_number, hint="null = off")),
    "divergence.max_grad_norm": nullable(rule(checks.positive_number, hint="null = off")),
}
FEATURES: dict[str, Check] = {
    "_target_": rule(checks.text),
    "embedding_dim": rule(checks.positive_int, hint="e.g. 8"),
    "embedding_dims": nullable(rule(checks.mapping, hint="e.g. {state_prev_res: 16}")),
    "new_users": one_of("random", "mean", "features"),
    "new_items": one_of("random", "mean", "features", "pretrained"),
    "id_dropout": rule(checks.fraction, open_high=True),
    "item_vectors": nullable(rule(checks.text, hint="a .npy or Parquet file")),
    "item_vectors_trainable": rule(checks.boolean),
    "sparse": rule(checks.boolean, hint="true with optimizer=sparse_adam"),
}
# the callbacks of conf/callbacks/default.yaml, by entry name (other callbacks check their own settings)
CALLBACKS: dict[str, Check] = {
    "model_checkpoint.save_top_k": rule(checks.integer, low=-1, hint="-1: all, 0: none"),
    "model_checkpoint.save_last": any_of(
        "true, false or 'link'", None, lambda v: v is None or isinstance(v, bool) or v == "link"
    ),
    "last_checkpoint.every_n_minutes": nullable(rule(checks.positive_number, hint="null: off")),
    "last_checkpoint.every_n_train_steps": nullable(rule(checks.non_negative_int, hint="0: off")),
    "last_checkpoint.log_to_mlflow": rule(checks.boolean),
    "early_stopping.patience": rule(checks.non_negative_int, hint="validations without improvement, e.g. 5"),
    "early_stopping.min_delta": rule(checks.non_negative_number),
}
TOP: dict[str, Check] = {
    "seed": rule(checks.integer, low=0, high=2**32 - 1, hint="the run's seed, e.g. seed=0"),
    "experiment_name": rule(checks.text, hint="the MLflow experiment, e.g. experiment_name=my-study"),
    "run_name": nullable(rule(checks.text)),
    "optimized_metric": rule(checks.text, hint="a validation metric, e.g. val/mean_auroc"),
    "optimized_mode": one_of("auto", "max", "min", hint="leave optimized_mode=auto"),
    "resume": nullable(rule(checks.text, hint="an MLflow run id or a checkpoint path")),
}
GROUPS: dict[str, dict[str, Check]] = {
    "trainer": TRAINER,
    "optimizer": OPTIMIZER,
    "scheduler": SCHEDULER,
    "module": MODULE,
    "features": FEATURES,
}


def task_kinds() -> list[str]:
    """The task kinds: the files of ``mtl_experiments/tasks/`` (found without importing the package: torch)."""
    spec = importlib.util.find_spec("mtl_experiments.tasks")
    return sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations) if m.name != "base")


def check_tasks(key: str, value: Any) -> Any:
    """``{name: {kind: <kind>, ...}}``: each task a mapping whose kind is a file of ``mtl_experiments/tasks/``."""
    if value is None:
        return None
    for name, task in checks.mapping(key, value, hint="e.g. 'data.tasks={y1: {kind: binary}}'").items():
        task = checks.mapping(f"{key}.{name}", task, hint="{kind: binary} and, optionally, label: <column>")
        kinds = task_kinds()
        checks.choice(f"{key}.{name}.kind", task.get("kind"), kinds, hint=f"valid kinds are {kinds}")
    return value


def check_weights(key: str, value: Any) -> Any:
    hint = "one weight per task, e.g. loss.weights={y1: 1.0, y2: 2.0}"
    if isinstance(value, dict) and "_target_" in value:
        return value  # an object Hydra builds (hparams_search=scalarization's simplex point): its own checks
    for name, weight in checks.mapping(key, value, hint=hint).items():
        checks.non_negative_number(f"{key}.{name}", weight)
    return value


# Keys that mean the same in every option of a group (fnmatch patterns, first match wins); each option's
# constructor narrows them (e.g. synthetic's num_sines may be 0, recsys_synthetic's latent_dim >= 3).
SHARED: dict[str, list[tuple[str, Check]]] = {
    "data": [
        ("batch_size", rule(checks.positive_int, hint="rows per training batch, e.g. 256")),
        ("eval_batch_size", nullable(rule(checks.positive_int, hint="null: 4 x batch_size"))),
        ("num_*", rule(checks.non_negative_int)),
        ("*_dim", rule(checks.positive_int)),
        ("*_fraction", rule(checks.fraction)),
        ("*seed", rule(checks.integer, low=0, high=2**32 - 1)),
        ("correlation", number_or_mapping(rule(checks.number, low=-1.0, high=1.0, hint="it is a cosine"))),
        ("*_std", rule(checks.non_negative_number)),
        ("tasks", check_tasks),
        ("cache", rule(checks.boolean)),
        ("download", rule(checks.boolean)),
        ("root", TEXT),
        ("cache_dir", MAYBE_TEXT),
        ("*path", MAYBE_TEXT),
        ("split", one_of(*SPLIT_MODES, hint="random, or a cold-start or temporal split")),
        ("categorical", nullable(texts)),
        ("numeric", nullable(texts)),
        ("id_columns", nullable(rule(checks.mapping))),
        ("timestamp_column", MAYBE_TEXT),
    ],
    "backbone": [
        ("num_*", rule(checks.positive_int)),
        ("tower_dims", rule(checks.sizes, allow_empty=True, hint="[]: the heads read the backbone directly")),
        ("hidden_dims", rule(checks.sizes, allow_empty=True)),
        ("*_dims", rule(checks.sizes, hint="layer sizes, e.g. [64, 32]")),
        ("dropout", rule(checks.fraction, open_high=True)),
        ("activation", rule(checks.text, hint="a torch.nn activation class name, e.g. ReLU")),
    ],
    "loss": [
        ("weights", nullable(check_weights)),
        ("*lr", rule(checks.positive_number)),
        ("grad_source", one_of("params", "representation")),
        ("eps", POSITIVE),
        ("max_iters", COUNT),
        ("seed", nullable(rule(checks.integer, low=0, high=2**32 - 1, hint="null: the run's seed"))),
    ],
}


def value_at(node: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` (dotted) as plain Python, ``SKIP`` where it cannot be resolved yet."""
    try:
        value = OmegaConf.select(node, key, throw_on_missing=True)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
    except (InterpolationResolutionError, MissingMandatoryValue, ValueError):
        return SKIP


def check_node(node: DictConfig, prefix: str, rules: Mapping[str, Check]) -> None:
    """Each key of ``rules`` present in ``node``; keys with no rule are left to their consumer."""
    for key, check in rules.items():
        if OmegaConf.select(node, key, default=SKIP, throw_on_resolution_failure=False) is SKIP:
            continue
        value = value_at(node, key)
        if value is not SKIP:
            check(f"{prefix}.{key}", value)


def key_rule(group: str, option: Any, key: str) -> Check | None:
    """The rule of ``<group>.<key>``: the chosen option's own (``OPTIONS``), else the first ``SHARED`` pattern."""
    own = OPTIONS.get(group, {}).get(str(option), {}).get(key)
    return own or next((c for pattern, c in SHARED[group] if fnmatch.fnmatchcase(key, pattern)), None)


def check_shared(node: DictConfig, group: str, option: Any = None) -> None:
    for key in node:
        if str(key).startswith("_"):
            continue
        check = key_rule(group, option, str(key))
        value = value_at(node, str(key)) if check is not None else SKIP
        if value is not SKIP:
            check(f"{group}.{key}", value)


@functools.cache
def option_keys(group: str, option: str) -> frozenset[str] | None:
    """The top-level keys of ``conf/<group>/<option>.yaml`` (``None``: no such file, e.g. a config of one's own)."""
    path = CONF / group / f"{option}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    return frozenset(str(k) for k in node) if isinstance(node, DictConfig) else None


@functools.cache
def options_with(key: str) -> tuple[str, ...]:
    """The options of ``key``'s group whose YAML has ``key`` (``data.split`` -> kuairand, movielens, ...)."""
    group, _, rest = key.partition(".")
    found = []
    for path in sorted((CONF / group).glob("*.yaml")) if rest else []:
        if OmegaConf.select(OmegaConf.load(path), rest, default=SKIP) is not SKIP:
            found.append(path.stem)
    return tuple(found)


def check_known_keys(cfg: DictConfig, choices: Mapping[str, Any]) -> None:
    """A key the chosen option's YAML lacks (``+data.split=cold_user`` on data=synthetic) would reach its
    constructor as an unexpected argument: refused here, naming the options that have it."""
    for group in SHARED:
        node, option = cfg.get(group), choices.get(group)
        known = option_keys(group, str(option)) if option and isinstance(node, DictConfig) else None
        for key in sorted(set(map(str, node)) - known) if known is not None else []:
            others = options_with(f"{group}.{key}")
            where = f"; {group}={', '.join(others)} have it (choose one first)" if others else ""
            raise ConfigError(
                f"{group}.{key} is not a setting of {group}={option}{where}; its settings: {sorted(known)}."
            )


def dataset_name(cfg: DictConfig, choices: Mapping[str, Any]) -> str:
    return f"data={choices['data']}" if choices.get("data") else f"the dataset {cfg.data.get('_target_')}"


def check_epochs(cfg: DictConfig) -> None:
    low, high = value_at(cfg, "trainer.min_epochs"), value_at(cfg, "trainer.max_epochs")
    if isinstance(low, int) and isinstance(high, int) and high != -1 and low > high:
        raise ConfigError(
            f"trainer.min_epochs={low} exceeds trainer.max_epochs={high}; lower trainer.min_epochs or raise "
            "trainer.max_epochs."
        )


def check_dataset_offers(cfg: DictConfig, choices: Mapping[str, Any]) -> None:
    """What the tasks and the split ask of the dataset: item ids (retrieval, cold_item), user ids (cold_user),
    timestamps (temporal). An interaction log (its YAML has ``split``) has all three; ``id_columns`` /
    ``timestamp_column`` (data=tabular) offer them only where named."""
    data = cfg.data
    if not isinstance(data, DictConfig):
        return
    columns = value_at(data, "id_columns") if "id_columns" in data else {}
    columns = columns if isinstance(columns, dict) else {}
    tasks = value_at(data, "tasks") if "tasks" in data else None
    for name, task in (tasks or {}).items() if isinstance(tasks, dict) else ():
        if isinstance(task, dict) and task.get("kind") == "retrieval":
            if "split" not in data:
                logs = [o for o in options_with("data.split") if o not in options_with("data.id_columns")]
                instead = f"use data={', '.join(logs)} (or data=tabular with data.id_columns.item_id=<column>)"
                raise ConfigError(
                    f"data.tasks.{name}.kind=retrieval needs item ids, which {dataset_name(cfg, choices)} does not "
                    f"have; {instead}."
                )
            if "id_columns" in data and "item_id" not in columns:
                raise ConfigError(
                    f"data.tasks.{name}.kind=retrieval names items, so {dataset_name(cfg, choices)} needs the item id "
                    "column: set data.id_columns.item_id=<column>."
                )
    split = value_at(data, "split") if "split" in data else "random"
    if "id_columns" in data and split in COLD_KEY and COLD_KEY[split] not in columns:
        raise ConfigError(
            f"data.split={split} holds {COLD_KEY[split][:-3]}s out of training, so it needs "
            f"data.id_columns.{COLD_KEY[split]}=<column> (or data.split=random)."
        )
    if "timestamp_column" in data and split == "temporal" and not value_at(data, "timestamp_column"):
        raise ConfigError("data.split=temporal orders rows by time: set data.timestamp_column=<column>.")


TASK_KEYED = ("weights", "leak")  # loss settings keyed by task name (loss=fixed's weights, loss=graddrop's leak)


def check_task_keys(cfg: DictConfig) -> None:
    """A loss setting keyed by task names only names tasks the data config defines (when it lists them)."""
    tasks = value_at(cfg, "data.tasks") if OmegaConf.select(cfg, "data.tasks", default=None) is not None else None
    loss = cfg.get("loss")
    if not isinstance(tasks, dict) or not isinstance(loss, DictConfig):
        return
    for key in TASK_KEYED:
        values = value_at(loss, key) if key in loss else None
        unknown = sorted(set(values) - set(tasks)) if isinstance(values, dict) and "_target_" not in values else []
        if unknown:
            raise ConfigError(
                f"loss.{key} names unknown task(s) {unknown}; the tasks are {list(tasks)} "
                "(e.g. loss." + key + "={" + ",".join(f"{t}:1.0" for t in tasks) + "})."
            )


def hydra_choices(cfg: DictConfig) -> dict[str, Any]:
    """The config options chosen for this run (``data: synthetic``, ...), from Hydra's runtime."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    return dict(choices) if choices is not None else {}


def validate(cfg: DictConfig, choices: Mapping[str, Any] | None = None) -> None:
    """Every value of ``cfg`` this module knows, then the conflicts between groups; the first problem is raised
    as a ``ConfigError``. Imports nothing heavy: it runs before Lightning, MLflow and torch are loaded."""
    choices = hydra_choices(cfg) if choices is None else choices
    for key, check in TOP.items():
        value = value_at(cfg, key) if key in cfg else SKIP
        if value is not SKIP:
            check(key, value)
    for group, rules in GROUPS.items():
        if isinstance(cfg.get(group), DictConfig):
            check_node(cfg[group], group, rules)
    if isinstance(cfg.get("callbacks"), DictConfig):
        check_node(cfg.callbacks, "callbacks", CALLBACKS)
    check_known_keys(cfg, choices)
    for group in SHARED:
        if isinstance(cfg.get(group), DictConfig):
            check_shared(cfg[group], group, choices.get(group))
    check_epochs(cfg)
    check_dataset_offers(cfg, choices)
    check_task_keys(cfg)
    metric = value_at(cfg, "optimized_metric") if "optimized_metric" in cfg else SKIP
    if isinstance(metric, str) and not metric.startswith("val/"):
        raise ConfigError(
            f"optimized_metric={metric!r} is not a validation metric; choose a val/... metric, e.g. "
            "val/mean_auroc (validation metrics only: never select on test)."
        )


def composition_message(text: str) -> str:
    """Hydra's message for an override it could not apply, as one line that says what to use instead: a key the
    chosen option lacks (``data.split=cold_user`` on data=synthetic) names the options that have it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    override = next((line.split(" use +", 1)[1] for line in lines if " use +" in line), None)
    if override is not None and any("is not in struct" in line for line in lines):
        key = override.split("=", 1)[0]
        group = key.partition(".")[0]
        others = options_with(key) if (CONF / group).is_dir() else []
        where = (
            f"{group}={', '.join(others)} have it: choose one first (e.g. {group}={others[0]} {override}); "
            if others
            else ""
        )
        return f"{key} is not a setting of the chosen {group} option; {where}a new key needs a leading +: +{override}."
    keep = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(keep)
