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


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="--rows must be"):
        stream_scale.parse_rows("1e6,x")
    with pytest.raises(ConfigError, match="no Hydra overrides"):
        stream_scale.run("2000", 2, 0, 1, "/nonexistent", overrides=["data=stream"])
    assert stream_scale.parse_rows("1e6,2000") == [1_000_000, 2000]
