"""bench/stream_scale.py (``scripts/benchmark.py --stream-scale``): one measurement of each contender on a tiny
log, in this process, and the refusals of bad arguments (the figures themselves: docs/results.md)."""

from __future__ import annotations

import pytest

from mtl_experiments.bench import stream_scale
from mtl_experiments.errors import ConfigError
from scripts.make_log import write_log


def test_each_contender_reports_setup_throughput_and_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_scale, "WORLD", {"num_users": 60, "num_items": 30})
    write_log(tmp_path / "log", rows=3000, shards=2, row_group=500, num_users=60, num_items=30)
    stream = stream_scale.measure_one("stream", 3000, str(tmp_path / "log"), steps=2, workers=0)
    memory = stream_scale.measure_one("memory", 3000, str(tmp_path / "log"), steps=2, workers=0)
    assert stream["pass_rows_per_s"] > 0 and memory["pass_rows_per_s"] is None
    for r in (stream, memory):
        assert r["samples_per_s"] > 0 and r["peak_mb"] > 0 and r["setup_s"] > 0
        assert r["steady_samples_per_s"] > 0 and r["first_batch_s"] > 0 and r["warmup"] == 1
        assert r["step_ms"] > 0 and r["between_steps_ms"] > 0
        assert r["cpu_ms_per_step"] > 0 and r["worker_cpu_ms_per_step"] == 0.0  # no workers here


def test_steady_clock_leaves_out_the_start_up_and_the_warm_up_steps(monkeypatch):
    """fit starts at t=0, the first step at 2 s (start-up); each of 6 steps waits 0.25 s for its batch (not the
    first) and trains 0.75 s; warm-up 2 steps: the steady window is the end of step 2 (t=3.75) to the end of step 6
    (t=7.75), 4 steps of 512 rows in 4 s, 3 s of them in the steps."""
    marks = [0.0, 2.0, 2.75] + [t for k in range(1, 6) for t in (2.75 + k - 0.75, 2.75 + k)]
    now = iter(marks)
    monkeypatch.setattr(stream_scale.time, "perf_counter", lambda: next(now))
    clock = stream_scale.SteadyClock(warmup=2)
    clock.on_fit_start(None, None)
    for k in range(6):
        clock.on_train_batch_start(None, None, None, k)
        clock.on_train_batch_end(None, None, None, None, k)
    assert clock.figures(512) == {
        "first_batch_s": 2.0,
        "steady_samples_per_s": 512.0,
        "step_ms": 750.0,
        "between_steps_ms": 250.0,
        "warmup": 2,
    }


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="--rows must be"):
        stream_scale.parse_rows("1e6,x")
    with pytest.raises(ConfigError, match="no Hydra overrides"):
        stream_scale.run("2000", 2, 0, 1, "/nonexistent", overrides=["data=stream"])
    assert stream_scale.parse_rows("1e6,2000") == [1_000_000, 2000]
