"""The rules ``schema.py`` checks config values with: each a ``(key, value) -> value`` callable over the ``checks``
vocabulary (``rule(checks.positive_int)``, ``one_of(...)``, ``nullable(...)``), plus the ones many groups share.
Imports nothing heavy (no torch, Lightning or MLflow)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError

Check = Callable[[str, Any], Any]


def rule(check: Callable[..., Any], **kwargs: Any) -> Check:
    """``check(key, value, **kwargs)`` as a one-argument-pair rule."""
    return lambda key, value: check(key, value, **kwargs)


def nullable(check: Check) -> Check:
    """``null`` passes; anything else goes through ``check``."""
    return lambda key, value: None if value is None else check(key, value)


def one_of(*options: Any, hint: str | None = None) -> Check:
    return rule(checks.choice, options=list(options), hint=hint)


def any_of(what: str, hint: str | None, *tests: Callable[[Any], bool]) -> Check:
    """Passes when one of ``tests`` holds (for settings that take, e.g., a number or a name)."""

    def check(key: str, value: Any) -> Any:
        if not any(test(value) for test in tests):
            checks.fail(key, what, value, hint)
        return value

    return check


def is_int(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def is_fraction(value: Any) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def number_or_mapping(check: Check) -> Check:
    """A number, or ``{name: number}`` with each value checked (``data.correlation`` of several signals)."""

    def both(key: str, value: Any) -> Any:
        if isinstance(value, Mapping | DictConfig):
            return {k: check(f"{key}.{k}", v) for k, v in checks.mapping(key, value).items()}
        return check(key, value)

    return both


def checks_ok(check: Check, value: Any) -> bool:
    try:
        check("", value)
    except ConfigError:
        return False
    return True


def texts(key: str, value: Any) -> Any:
    """A list of names (columns, files, file patterns)."""
    if not isinstance(value, list | ListConfig) or not all(isinstance(v, str) and v for v in value):
        checks.fail(key, "a list of names", value, "e.g. [age, city]")
    return value


def mapping_of(check: Check) -> Check:
    """``{name: value}`` with each value checked (``data.hash_buckets``, ``loss.leak``)."""
    return lambda key, value: {k: check(f"{key}.{k}", v) for k, v in checks.mapping(key, value).items()}


TEXT, MAYBE_TEXT, FRACTION = rule(checks.text), nullable(rule(checks.text)), rule(checks.fraction)
OPEN_FRACTION, EMA = rule(checks.fraction, open_low=True, open_high=True), rule(checks.fraction, open_high=True)
POSITIVE, NON_NEGATIVE = rule(checks.positive_number), rule(checks.non_negative_number)
COUNT = rule(checks.positive_int)
