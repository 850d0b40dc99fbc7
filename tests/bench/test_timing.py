"""bench.timing's Stopwatch: wall, process CPU and thread CPU time of the same span (no timed assertions: only
which clock counts what)."""

from __future__ import annotations

import time

from mtl_experiments.bench.timing import Seconds, Stopwatch


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_stopwatch_counts_work_in_cpu_time_and_waiting_only_in_wall_time():
    clock = Stopwatch()
    _busy(0.05)
    time.sleep(0.2)  # waiting: wall time only
    span = clock.elapsed()
    assert isinstance(span, Seconds) and isinstance(span, float)
    assert span.cpu >= 0.05 and span.thread >= 0.05  # the busy loop's CPU time, on this thread
    assert float(span) >= 0.25 > max(span.cpu, span.thread)  # the sleep is in the wall time, not in the CPU time
    assert 1.0 / span == 1.0 / float(span)  # a float: callers dividing by the wall time are unchanged
