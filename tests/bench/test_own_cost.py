"""bench/own_cost: the part timers add each call's CPU time under its label and leave the methods as they were."""

from __future__ import annotations

import time

from mtl_experiments.bench import own_cost


class Base:
    def inherited(self) -> str:
        return "base"


class Child(Base):
    def own(self, x: int) -> int:
        end = time.thread_time() + 0.002  # busy, so the thread's CPU clock moves
        while time.thread_time() < end:
            pass
        return 2 * x


def test_timed_parts_counts_cpu_time_per_label_and_restores_the_methods():
    own, inherited = Child.__dict__["own"], "inherited" in Child.__dict__
    parts = ((Child, "own", "own"), (Child, "inherited", "inherited"))
    with own_cost.timed_parts(parts) as seconds:
        child = Child()
        assert child.own(3) == 6 and child.own(1) == 2 and child.inherited() == "base"
    assert seconds["own"] >= 0.004 and 0 <= seconds["inherited"] < seconds["own"]
    assert Child.__dict__["own"] is own and ("inherited" in Child.__dict__) is inherited  # as before
    assert Child().own(2) == 4


def test_own_cost_reports_both_fits_and_the_parts_of_the_step(capsys):
    us = own_cost.main(["--epochs", "1", "--rounds", "1", "data.num_samples=600"])
    assert {"ours: fit", "floor: fit", "ours: training_step", "floor: training_step", "grads.plan"} <= set(us)
    assert us["ours: training_step"] <= us["ours: fit"] and all(v >= 0 for v in us.values())
    assert "ours - floor" in capsys.readouterr().out
    assert "manual_backward" not in own_cost.module.MTLModule.__dict__  # the inherited hook is not left wrapped
