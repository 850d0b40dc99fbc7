"""The config-check vocabulary: converted values, refused values, and one message style."""

import math

import pytest

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: checks.positive_number("a.b", 2), 2.0),
        (lambda: checks.non_negative_number("a.b", 0), 0.0),
        (lambda: checks.fraction("a.b", 1), 1.0),
        (lambda: checks.integer("a.b", 3.0, low=1), 3),
        (lambda: checks.positive_int("a.b", 7), 7),
        (lambda: checks.non_negative_int("a.b", 0), 0),
        (lambda: checks.boolean("a.b", False), False),
        (lambda: checks.choice("a.b", "x", ["x", "y"]), "x"),
        (lambda: checks.sizes("a.b", [64, 32]), [64, 32]),
        (lambda: checks.sizes("a.b", [], allow_empty=True), []),
        (lambda: checks.optional(checks.positive_int, "a.b", None), None),
        (lambda: checks.number("a.b", math.inf, finite=False), math.inf),
        (lambda: checks.text("a.b", "run-1"), "run-1"),
        (lambda: checks.mapping("a.b", {"y1": 1.0}), {"y1": 1.0}),
    ],
)
def test_accepted_values_come_back_converted(call, expected):
    out = call()
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: checks.positive_number("optimizer.lr", -0.1), "optimizer.lr must be a finite number > 0, got -0.1"),
        (lambda: checks.positive_number("optimizer.lr", "fast"), "got 'fast'"),
        (lambda: checks.positive_number("optimizer.lr", True), "got True"),
        (lambda: checks.positive_number("optimizer.lr", math.nan), "got nan"),
        (lambda: checks.non_negative_number("optimizer.weight_decay", -1), ">= 0, got -1"),
        (lambda: checks.fraction("backbone.dropout", 1, open_high=True), "in [0, 1), got 1"),
        (lambda: checks.integer("backbone.num_experts", 2.5, low=1), "an integer >= 1, got 2.5"),
        (lambda: checks.integer("trainer.max_epochs", "two", low=1), "got 'two'"),
        (lambda: checks.integer("x", 5, low=0, high=3), "an integer in [0, 3], got 5"),
        (lambda: checks.positive_int("trainer.max_epochs", -5), ">= 1, got -5"),
        (lambda: checks.boolean("loss.flag", 1), "true or false, got 1"),
        (lambda: checks.choice("trainer.accelerator", "tpu", ["cpu", "gpu"]), "one of ['cpu', 'gpu'], got 'tpu'"),
        (lambda: checks.sizes("backbone.tower_dims", [8, 0]), "positive integer sizes, got [8, 0]"),
        (lambda: checks.sizes("backbone.tower_dims", "64"), "got '64'"),
        (lambda: checks.sizes("backbone.tower_dims", []), "non-empty"),
        (lambda: checks.text("experiment_name", ""), "experiment_name must be a non-empty string, got ''"),
        (lambda: checks.text("resume", 3), "a non-empty string, got 3"),
        (lambda: checks.mapping("loss.weights", [1, 2]), "loss.weights must be a mapping {name: value}, got [1, 2]"),
        (lambda: checks.mapping("loss.weights", "y1"), "got 'y1'"),
    ],
)
def test_refused_values_say_key_rule_and_value(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    text = str(err.value)
    assert message in text
    assert text.endswith(".") and "\n" not in text


def test_hint_follows_the_value():
    with pytest.raises(ConfigError, match=r"^loss.lr must be .*, got 0 \(e.g. 0.025\)\.$"):
        checks.positive_number("loss.lr", 0, hint="e.g. 0.025")
