"""Rebuilding a stored config safely: the only way a config read from a checkpoint or a run becomes objects.

Checkpoints and runs are shared, so a stored config may come from anyone, and Hydra's ``instantiate`` calls whatever
a ``_target_`` names: a crafted config naming ``torch.load`` (of a pickle), ``builtins.open`` or ``pathlib.Path.touch``
would run it. So a stored config is first resolved (a resolver such as ``oc.decode`` could otherwise produce a
target after the check), then every ``_target_`` in it, at any depth (``_args_``, ``_partial_`` nodes, lists, dicts
inside lists), must be one that the project's own ``conf/**/*.yaml`` names (``allowed_targets``); anything else is
refused before anything is built, and only the checked plain container is instantiated.

New checkpoints also carry a target-free recipe, ``checkpoint["mtl"]["recipe"] = {"overrides": [...]}``: the run's
config group choices and value overrides (``recipe``), rebuilt through Hydra's compose API from this version's
config groups (``compose_recipe``) and checked like any other config (an override can set a ``_target_`` too).
``from_checkpoint`` prefers the recipe, then the stored full config, then the run's config artifact.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtl_experiments.errors import ConfigError

# the folder train.py composes from (cli.CONFIG_DIR); not imported from cli, whose pipeline import would make
# a cycle as soon as anything the pipeline uses (resume) loads a stored config through this module
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# what a recipe leaves out: where and how a run was trained, not what model it built
NOT_IN_RECIPE = ("logger", "paths", "trainer", "callbacks", "hparams_search", "resume")
FIX = (
    "only the targets of its own conf/ groups are built when a model is loaded, so this file was not written by "
    "train.py or was altered: do not load it; rebuild the model with train.py from the run's overrides instead"
)


class RecipeError(ConfigError):
    """A recipe this version's config groups cannot compose (an option or key renamed since): the stored full
    config may still rebuild the model."""


@functools.cache
def allowed_targets(config_dir: str = CONFIG_DIR) -> frozenset[str]:
    """Every ``_target_`` named in the shipped ``conf/**/*.yaml`` (our classes, the torch optimizers and
    schedulers, the Lightning callbacks and loggers our configs name), read once."""
    found: set[str] = set()
    for path in sorted(Path(config_dir).rglob("*.yaml")):
        found.update(t for _, t in _targets(yaml.safe_load(path.read_text())) if isinstance(t, str))
    return frozenset(found)


def _nodes(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, node) of a plain container and of everything in it, at any depth."""
    yield where, node
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _nodes(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _nodes(value, f"{where}[{i}]")


def _targets(container: Any) -> Iterator[tuple[str, Any]]:
    """(key path, target) of every ``_target_`` in a plain container."""
    for where, node in _nodes(container):
        if isinstance(node, Mapping) and "_target_" in node:
            yield where or "the top level", node["_target_"]


def check_targets(container: Any, source: str = "This checkpoint's config") -> None:
    """ConfigError naming every ``_target_`` of a resolved plain container that this project does not build
    (or that is no string), and every string that would be an interpolation again (an escaped ``\\${...}``)."""
    allowed = allowed_targets()
    refused = [(t, where) for where, t in _targets(container) if not isinstance(t, str) or t not in allowed]
    if refused:
        names = ", ".join(f"{t if isinstance(t, str) else repr(t)} (at {where})" for t, where in refused)
        raise ConfigError(f"{source} names {names}, which this project does not build; {FIX}.")
    escaped = [where for where, node in _nodes(container) if isinstance(node, str) and "${" in node]
    if escaped:
        raise ConfigError(
            f"{source} holds an interpolation that survives resolution (at {', '.join(escaped)}), which "
            f"train.py never writes; {FIX}."
        )


def checked(config: str | Mapping | DictConfig, source: str = "This checkpoint's config") -> DictConfig:
    """The config, resolved and checked (``check_targets``), as a config made from the checked plain container."""
    try:
        cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
        container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else None
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{source} cannot be read: {' '.join(str(e).split())[:300]}.") from None
    if container is None:
        raise ConfigError(f"{source} is no mapping of config groups (got a {type(cfg).__name__}); {FIX}.")
    check_targets(container, source)
    return OmegaConf.create(container)


# -- recipes: a config as group choices and overrides, no targets ---------------------------------------------
def _top(key: str) -> str:
    return re.split(r"[./@]", key.lstrip("~+"), maxsplit=1)[0]


def _kept(key: str) -> bool:
    top = _top(key)
    return top not in NOT_IN_RECIPE and not top.startswith("hydra")


def recipe(choices: Mapping[str, str | None], overrides: Sequence[str]) -> dict[str, list[str]] | None:
    """The target-free description of a run stored in its checkpoints (``checkpoint["mtl"]["recipe"]``):
    ``{"overrides": [...]}``, the chosen option of every config group not chosen on the command line (so a
    later change of a default does not change the model), then the run's Hydra task overrides as typed.
    ``logger``, ``paths``, ``trainer``, ``callbacks``, ``hydra``, ``hparams_search`` and ``resume`` are left out:
    they say where and how the run trained, not what it built.

    ``choices`` / ``overrides``: ``HydraConfig.get().runtime.choices`` and ``.overrides.task``
    (``pipeline.hydra_context``). None without choices: a config Hydra did not compose (built in code) has no
    recipe that would rebuild it, and an empty one would compose the defaults instead."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not choices:
        return None

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    typed = {o.key_or_group for o in parsed}
    pinned = [f"{g}={o}" for g, o in choices.items() if o is not None and g not in typed and _kept(g)]
    return {"overrides": pinned + [o.input_line for o in parsed if _kept(o.key_or_group)]}


def compose_recipe(stored: Any, source: str = "This checkpoint's recipe") -> DictConfig:
    """The config a recipe describes, composed from this version's ``conf/`` (``compose("train", overrides)``,
    outside any running Hydra app), then resolved and checked like any other stored config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = stored.get("overrides") if isinstance(stored, Mapping) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{source} is not {{'overrides': [<group=option or key=value>, ...]}}; {FIX}.")
    if GlobalHydra.instance().is_initialized():
        raise ConfigError(
            f"{source} cannot be composed inside a running Hydra app or an open Hydra compose context; "
            "call GlobalHydra.instance().clear() first, or load the model outside it."
        )
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    except HydraException as e:
        reason = " ".join(str(e).split("Config search path")[0].split())[:400]
        raise RecipeError(
            f"{source} cannot be composed from this version's configs ({reason}); it was written by another version "
            "of the project: use that version, or a checkpoint that carries its full config."
        ) from None
    OmegaConf.update(cfg, "paths.output_dir", None, force_add=True)  # ${hydra:...}: there is no run here
    return checked(cfg, source)


def from_checkpoint(
    mtl: Mapping[str, Any] | None, fallback: Callable[[], str | None] | None = None, what: str = "This checkpoint"
) -> tuple[DictConfig | None, str | None]:
    """(the checked config a checkpoint's ``mtl`` entry describes, a note) or (None, None) when it carries none:
    its recipe, else its full config, else ``fallback()`` (the run's config artifact). A recipe this version
    cannot compose gives way to the full config, with a note; a refused target never gives way."""
    mtl = mtl if isinstance(mtl, Mapping) else {}
    note = None
    if mtl.get("recipe") is not None:
        try:
            return compose_recipe(mtl["recipe"], f"{what}'s recipe"), None
        except RecipeError as e:
            if not mtl.get("config"):
                raise
            note = f"{e} Rebuilt from its full config instead"
    if mtl.get("config"):
        return checked(mtl["config"], f"{what}'s config"), note
    stored = fallback() if fallback is not None else None
    if stored:
        return checked(stored, "The run's config artifact (config/config.yaml)"), None
    return None, None
