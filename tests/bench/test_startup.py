"""bench/startup.py (``scripts/benchmark.py --startup``): real ``train.py`` processes timed with their exit codes
checked, a misbehaving sample reported as an error instead of a time, and the census child's phases on a tiny
census folder (the figures themselves: docs/results.md)."""

from __future__ import annotations

import pytest

from mtl_experiments.bench import startup
from mtl_experiments.bench.timing import PACKAGE_ROOT
from mtl_experiments.errors import ConfigError
from scripts import benchmark

KEYS = {"command", "exit_code", "seconds", "median_s", "min_s", "max_s", "per_interpreter", "per_import_torch"}


def test_config_error_and_help_samples_are_timed_with_their_exit_codes(capsys):
    wanted = ("interpreter", "config_value_error", "help")
    samples = tuple(s for s in startup.cli_samples(PACKAGE_ROOT / "train.py") if s.name in wanted)
    result = startup.run(repeats=1, samples=samples, census=False)
    assert set(result) == {"repeats", "load_average", "samples", "census_skipped", "goals", "errors"}
    assert result["errors"] == [] and result["census_skipped"] and len(result["load_average"]) == 2
    assert list(result["samples"]) == list(wanted)
    for s in result["samples"].values():
        assert set(s) == KEYS and len(s["seconds"]) == 1 and s["median_s"] > 0 and s["per_import_torch"] is None
    value_error = result["samples"]["config_value_error"]
    assert value_error["exit_code"] == 2 and value_error["command"].endswith("train.py optimizer.lr=-1")
    assert value_error["per_interpreter"] == value_error["median_s"] / result["samples"]["interpreter"]["median_s"]
    assert [g["what"] for g in result["goals"]] == ["config_value_error"] and result["goals"][0]["limit_s"] == 2.0
    out = capsys.readouterr().out
    assert "goal config_value_error <= 2 s" in out and "optimizer.lr=-1" in out


def test_a_sample_that_exits_0_where_2_is_expected_is_an_error_not_a_time(capsys):
    wrong = startup.Sample("exits_0", ("-c", "pass"), exit_code=2)
    writes = startup.Sample("writes", ("-c", "open('mlflow.db', 'w').close()"))
    right = startup.Sample("interpreter", ("-c", "pass"))
    with pytest.raises(startup.SampleError, match="2 start-up sample") as caught:
        startup.run(repeats=1, samples=(wrong, writes, right), census=False)
    result = caught.value.result
    assert result["errors"] == [
        "exits_0 (python -c pass): exited 0, expected 2: (no stderr)",
        "writes (python -c \"open('mlflow.db', 'w').close()\"): left mlflow.db in its working folder (a refused "
        "config records nothing)",
    ]
    assert result["samples"]["exits_0"]["median_s"] is None and result["samples"]["exits_0"]["seconds"] == []
    assert result["samples"]["interpreter"]["median_s"] > 0
    assert "FAILED" in capsys.readouterr().out


def test_problem_names_a_traceback_extra_lines_and_a_missing_error_line():
    one_line = startup.Sample("v", ("train.py", "optimizer.lr=-1"), exit_code=2, one_line=True)
    group = startup.Sample("g", ("train.py", "loss=x"), exit_code=2)
    assert startup.problem(one_line, 2, "Error: optimizer.lr must be > 0, got -1\n", []) is None
    assert startup.problem(group, 2, "Error: Could not find 'loss/x'\n\nAvailable options:\n\tequal\n", []) is None
    assert "traceback" in startup.problem(group, 2, "Traceback (most recent call last):\nKeyError: 1\n", [])
    assert "expected its one 'Error:' line" in startup.problem(one_line, 2, "Error: a\nmore\n", [])
    assert "does not start with 'Error:'" in startup.problem(group, 2, "usage: ...\n", [])
    assert startup.problem(one_line, 1, "", []) == "exited 1, expected 2: (no stderr)"


def test_census_child_times_its_phases_and_sees_the_cache_hit_on_the_second_load(census_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_CENSUS_ROOT", str(census_root))
    monkeypatch.setenv("MTL_CACHE_DIR", str(tmp_path / "cache"))
    assert startup.census_absent() is None
    first, second = startup.measure_census(), startup.measure_census()
    assert not first["cache_hit"] and second["cache_hit"]  # the first load filled the cache
    assert first["rows"] == second["rows"] == {"train": 80, "val": 20, "test": 20}
    assert all(second[k] > 0 for k in ("compose_s", "import_s", "load_s"))
    monkeypatch.setenv("MTL_CENSUS_ROOT", str(tmp_path / "absent"))
    assert "census-income.data" in startup.census_absent()


def test_overrides_are_refused():
    with pytest.raises(ConfigError, match="no Hydra overrides"):
        startup.run(1, overrides=["loss=equal"], samples=(), census=False)


def test_benchmark_script_dispatches_startup_and_keeps_it_a_measurement_of_its_own():
    args, overrides = benchmark.parse_args(["--startup", "--repeats", "5"])
    assert benchmark.measurement(args) is benchmark.startup and args.repeats == 5 and overrides == []
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--startup", "--methods"])
