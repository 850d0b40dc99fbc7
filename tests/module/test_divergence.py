"""Divergence detection (``module.divergence``): the rules by hand, their config, and real runs (``optimizer.lr=1e6``
is caught by warn and by stop; a normal run triggers nothing)."""

from __future__ import annotations

import logging

import pytest
import torch

from mtl_experiments.divergence import DivergenceConfig, DivergenceDetector, global_norm
from mtl_experiments.errors import ConfigError, DivergenceError
from mtl_experiments.pipeline import train


def detector(action: str = "warn", **rules) -> DivergenceDetector:
    return DivergenceDetector(["a", "b"], DivergenceConfig.from_mapping({"action": action, **rules}))


def fired(findings) -> list[tuple[str, str]]:
    return [(f.rule, f.subject) for f in findings]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtl_experiments.divergence"]


# -- the rules by hand ------------------------------------------------------------------------------
def test_loss_factor_compares_with_the_first_epoch_mean_of_healthy_steps():
    d = detector(loss_factor=10, rising_steps=None)
    assert d.check_losses([1.0, 2.0], step=1, epoch=0) == []  # no reference yet
    assert d.check_losses([3.0, 2.0], step=2, epoch=0) == []  # 3 <= 10 x 1
    flagged = d.check_losses([20.5, 2.0], step=3, epoch=0)  # reference of a: (1 + 3) / 2 = 2; 20.5 > 20
    assert fired(flagged) == [("loss_factor", "a")]
    assert flagged[0].text == "task a: loss 20.5 > 10 x its first-epoch mean 2"
    d.end_epoch()  # the reference is fixed: a = 2 (the flagged 20.5 never entered it), b = 2
    assert d.check_losses([19.0, 20.0], step=4, epoch=1) == []  # 20 is not > 20
    assert d.check_losses([19.0, 2.0], step=5, epoch=1) == []  # 19 did not raise a's reference either
    assert fired(d.check_losses([21.0, 20.1], step=6, epoch=1)) == [("loss_factor", "a"), ("loss_factor", "b")]


def test_rising_counts_strict_increases_in_a_row():
    d = detector(loss_factor=None, rising_steps=3)
    for step, loss in enumerate([1.0, 2.0, 3.0], start=1):  # streaks 0, 1, 2
        assert d.check_losses([loss, 1.0], step=step, epoch=0) == []  # b stays equal: never rising
    assert fired(d.check_losses([4.0, 1.0], step=4, epoch=0)) == [("rising_steps", "a")]  # the 3rd rise
    assert fired(d.check_losses([5.0, 1.0], step=5, epoch=0)) == [("rising_steps", "a")]
    assert d.check_losses([4.9, 1.0], step=6, epoch=0) == []  # a fall resets the streak
    assert d.check_losses([5.0, 1.0], step=7, epoch=0) == []


def test_norm_bounds_are_off_unless_set():
    assert detector().check_norm("grad", 1e30, step=1, epoch=0) == []
    d = detector(max_param_norm=10.0, max_grad_norm=4.0)
    assert d.check_norm("grad", 4.0, step=1, epoch=0) == []
    assert fired(d.check_norm("grad", 4.5, step=1, epoch=0)) == [("max_grad_norm", "gradient")]
    assert fired(d.check_norm("param", 11.0, step=1, epoch=0)) == [("max_param_norm", "parameters")]


def test_global_norm_by_hand():
    assert global_norm([torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]).item() == 5.0
    sparse = torch.sparse_coo_tensor([[0, 2]], [6.0, 8.0], (5,), check_invariants=True)
    assert global_norm([sparse]).item() == 10.0
    assert global_norm([]).item() == 0.0


def test_warn_names_task_step_and_rule_once_per_task_and_rule(caplog):
    d = detector(loss_factor=10, rising_steps=None)
    d.check_losses([1.0, 1.0], step=1, epoch=0)
    with caplog.at_level(logging.WARNING, logger="mtl_experiments.divergence"):
        d.check_losses([50.0, 1.0], step=2, epoch=0)
        d.check_losses([60.0, 1.0], step=3, epoch=0)  # a again: not repeated
        d.check_losses([70.0, 80.0], step=4, epoch=0)  # b for the first time
    messages = warnings_of(caplog)
    assert len(messages) == 2
    assert "Training is diverging at step 2 (epoch 0): task a: loss 50 > 10 x its first-epoch mean 1" in messages[0]
    assert "(module.divergence.loss_factor)" in messages[0] and "task b" not in messages[0]
    assert "step 4 (epoch 0): task b: loss 80" in messages[1] and "task a" not in messages[1]


def test_stop_raises_one_readable_error():
    d = detector("stop", loss_factor=10, rising_steps=None)
    d.check_losses([1.0, 1.0], step=1, epoch=0)
    with pytest.raises(DivergenceError, match=r"diverged at step 2 \(epoch 0\): task a: loss 50 > 10 x .*loss_factor"):
        d.check_losses([50.0, 1.0], step=2, epoch=0)


def test_off_never_acts(caplog):
    d = detector("off", loss_factor=10)
    d.check_losses([1.0, 1.0], step=1, epoch=0)
    with caplog.at_level(logging.WARNING):
        assert fired(d.check_losses([50.0, 1.0], step=2, epoch=0)) == [("loss_factor", "a")]
    assert warnings_of(caplog) == []
    assert not DivergenceConfig.from_mapping(None).enabled


def test_state_round_trip_continues_as_if_uninterrupted():
    losses = [[1.0, 2.0], [1.5, 2.5], [1.7, 2.6], [30.0, 2.0], [31.0, 2.2], [32.0, 300.0]]
    whole = detector(loss_factor=10, rising_steps=2)
    expected = [fired(whole.check_losses(x, step=i, epoch=0)) for i, x in enumerate(losses)]
    first = detector(loss_factor=10, rising_steps=2)
    got = [fired(first.check_losses(x, step=i, epoch=0)) for i, x in enumerate(losses[:3])]
    state = torch.load(_saved(first.state_dict()), weights_only=True)  # plain containers: weights_only loads it
    resumed = detector(loss_factor=10, rising_steps=2)
    resumed.load_state_dict(state)
    got += [fired(resumed.check_losses(x, step=i, epoch=0)) for i, x in enumerate(losses[3:], start=3)]
    assert got == expected and any(expected)


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"action": "never"}, r"module.divergence.action must be one of \['off', 'warn', 'stop'\], got 'never'"),
        ({"loss_factor": 1}, r"module.divergence.loss_factor must be a finite number > 1, got 1"),
        ({"rising_steps": 0}, r"module.divergence.rising_steps must be an integer >= 1, got 0"),
        ({"max_grad_norm": -1.0}, r"module.divergence.max_grad_norm must be a finite number > 0, got -1.0"),
        ({"k": 5}, r"module.divergence.k is not an option; valid keys: \['action', 'loss_factor'"),
        ("stop", r"module.divergence must be a mapping"),
    ],
)
def test_bad_config_is_refused(cfg, message):
    with pytest.raises(ConfigError, match=message):
        DivergenceConfig.from_mapping(cfg)


# -- real runs --------------------------------------------------------------------------------------
DIVERGING = ["optimizer.lr=1e6", "trainer.max_epochs=1"]


def test_a_huge_learning_rate_is_warned_about_and_the_run_finishes(make_cfg, mlflow_runs, caplog):
    with caplog.at_level(logging.WARNING, logger="mtl_experiments.divergence"):
        train(make_cfg(*DIVERGING))
    (message,) = warnings_of(caplog)  # once for the whole run
    assert message.startswith("Training is diverging at step 2 (epoch 0): task y1: loss ")
    assert "task y2: loss " in message and "(module.divergence.loss_factor)" in message
    assert [r.info.status for r in mlflow_runs()] == ["FINISHED"]


def test_a_huge_learning_rate_stops_the_run_with_stop(make_cfg, mlflow_runs):
    with pytest.raises(DivergenceError, match=r"Training diverged at step 2 \(epoch 0\): task y1: loss .* first-epoch"):
        train(make_cfg(*DIVERGING, "module.divergence.action=stop"))
    assert [r.info.status for r in mlflow_runs()] == ["FAILED"]


def test_a_normal_run_triggers_nothing(make_cfg, mlflow_runs, caplog):
    with caplog.at_level(logging.WARNING, logger="mtl_experiments.divergence"):
        train(make_cfg("module.divergence.max_param_norm=1e4", "module.divergence.max_grad_norm=1e4"))
    assert warnings_of(caplog) == []
    assert [r.info.status for r in mlflow_runs()] == ["FINISHED"]
