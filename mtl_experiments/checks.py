"""One vocabulary for checking config values: each check returns the value converted (``int``, ``float``, ...)
or raises ConfigError in one message style, ``<key> must be <what>, got <value>.`` with an optional hint
(``e.g. 0.025``, ``0 disables it``) that says how to fix it.

Used by every constructor that takes a config value, so a bad value reads the same wherever it is caught::

    self.lr = checks.positive_number("loss.lr", lr, hint="the learning rate of GradNorm's weights, e.g. 0.025")

Booleans are refused where a number is asked for (``True`` is an ``int`` to Python, never to a user), and so are
non-finite numbers unless ``finite=False``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from mtl_experiments.errors import ConfigError


def fail(key: str, what: str, value: Any, hint: str | None = None) -> None:
    """Raise ``ConfigError("<key> must be <what>, got <value>[ (<hint>)].")``."""
    raise ConfigError(f"{key} must be {what}, got {value!r}" + (f" ({hint})" if hint else "") + ".")


def _number(key: str, value: Any, what: str, hint: str | None, finite: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(key, what, value, hint)
    out = float(value)
    if math.isnan(out) or (finite and not math.isfinite(out)):  # NaN is never a setting, even where inf is
        fail(key, what, value, hint)
    return out


def number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    hint: str | None = None,
) -> float:
    """A real number in [low, high] (``low_open`` / ``high_open``: the bound itself excluded)."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    what = "a finite number" if finite else "a number"
    if low is not None and high is not None:
        what = f"a number in {lo}, {hi}"
    elif low is not None:
        what = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        what = f"a finite number {'<' if high_open else '<='} {high:g}"
    out = _number(key, value, what, hint, finite)
    if low is not None and (out < low or (low_open and out == low)):
        fail(key, what, value, hint)
    if high is not None and (out > high or (high_open and out == high)):
        fail(key, what, value, hint)
    return out


def positive_number(key: str, value: Any, hint: str | None = None) -> float:
    """A finite number > 0."""
    return number(key, value, low=0.0, low_open=True, hint=hint)


def non_negative_number(key: str, value: Any, hint: str | None = None) -> float:
    """A finite number >= 0."""
    return number(key, value, low=0.0, hint=hint)


def fraction(
    key: str, value: Any, *, open_high: bool = False, open_low: bool = False, hint: str | None = None
) -> float:
    """A number in [0, 1] (``open_high``: [0, 1); ``open_low``: (0, 1])."""
    return number(key, value, low=0.0, high=1.0, low_open=open_low, high_open=open_high, hint=hint)


def integer(key: str, value: Any, *, low: int | None = None, high: int | None = None, hint: str | None = None) -> int:
    """A whole number in [low, high]; ``2.0`` is accepted as 2, ``2.5`` and ``"2"`` are not."""
    what = "an integer" + (f" >= {low}" if low is not None and high is None else "")
    if low is not None and high is not None:
        what = f"an integer in [{low}, {high}]"
    elif high is not None:
        what = f"an integer <= {high}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(key, what, value, hint)
    if not math.isfinite(float(value)) or float(value) != int(value):
        fail(key, what, value, hint)
    out = int(value)
    if (low is not None and out < low) or (high is not None and out > high):
        fail(key, what, value, hint)
    return out


def positive_int(key: str, value: Any, hint: str | None = None) -> int:
    """An integer >= 1."""
    return integer(key, value, low=1, hint=hint)


def non_negative_int(key: str, value: Any, hint: str | None = None) -> int:
    """An integer >= 0."""
    return integer(key, value, low=0, hint=hint)


def boolean(key: str, value: Any, hint: str | None = None) -> bool:
    """``true`` or ``false`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        fail(key, "true or false", value, hint)
    return value


def text(key: str, value: Any, hint: str | None = None) -> str:
    """A non-empty string (a name, a path, an id)."""
    if not isinstance(value, str) or not value.strip():
        fail(key, "a non-empty string", value, hint)
    return value


def mapping(key: str, value: Any, hint: str | None = None) -> dict:
    """A mapping ``{name: value}`` (a YAML dict), returned as a plain dict."""
    if isinstance(value, str | bytes) or not hasattr(value, "items"):
        fail(key, "a mapping {name: value}", value, hint)
    return dict(value.items())


def choice(key: str, value: Any, options: Iterable[Any], hint: str | None = None) -> Any:
    """One of ``options``."""
    options = list(options)
    if value not in options:
        fail(key, f"one of {options}", value, hint)
    return value


def sizes(key: str, value: Any, *, allow_empty: bool = False, hint: str | None = None) -> list[int]:
    """A list of positive layer sizes (``[64, 32]``)."""
    what = ("a list" if allow_empty else "a non-empty list") + " of positive integer sizes"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | Iterable):
        fail(key, what, value, hint)
    items = list(value)
    if not items and not allow_empty:
        fail(key, what, value, hint)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
            fail(key, what, items, hint)
    return [int(v) for v in items]


def optional(check, key: str, value: Any, *args, **kwargs) -> Any:
    """``None`` passes; anything else goes through ``check``."""
    return None if value is None else check(key, value, *args, **kwargs)
